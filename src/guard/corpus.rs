//! The labelled corpus (tests/data/guard/): recall per kind and false
//! positives, measured against the goals of docs/privacy-guard.md.

use super::{scan, Kind};

/// At least this share of each kind's positives is found.
const RECALL_GOAL: f64 = 0.99;
/// At most this share of the negative snippets has a finding.
const FALSE_POSITIVE_GOAL: f64 = 0.005;

#[derive(serde::Deserialize)]
struct Positive {
    kind: String,
    value: String,
    text: String,
}

#[derive(serde::Deserialize)]
struct Negative {
    category: String,
    text: String,
}

fn lines<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
    let path = format!("{}/tests/data/guard/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}: {e}: {l}")))
        .collect()
}

#[test]
fn the_labelled_corpus_meets_the_recall_and_false_positive_goals() {
    let positives: Vec<Positive> = lines("positives.jsonl");
    let negatives: Vec<Negative> = lines("negatives.jsonl");
    let mut report = String::new();
    let mut failed = Vec::new();
    for kind in Kind::ALL {
        let of_kind: Vec<&Positive> = positives.iter().filter(|p| p.kind == kind.name()).collect();
        assert!(
            of_kind.len() >= 300,
            "{}: {} positives",
            kind.name(),
            of_kind.len()
        );
        let mut missed = Vec::new();
        for p in &of_kind {
            let at = p
                .text
                .find(&p.value)
                .unwrap_or_else(|| panic!("value not in text: {}", p.text));
            let end = at + p.value.len();
            let found = scan(&p.text)
                .iter()
                .any(|f| f.kind == kind && f.start < end && at < f.end);
            if !found {
                missed.push(crate::excerpt(&p.value, 48));
            }
        }
        let recall = 1.0 - missed.len() as f64 / of_kind.len() as f64;
        report.push_str(&format!(
            "{:<16} {:>4} positives, recall {:.2}%{}\n",
            kind.name(),
            of_kind.len(),
            recall * 100.0,
            if missed.is_empty() {
                String::new()
            } else {
                format!(", missed {:?}", &missed[..missed.len().min(4)])
            }
        ));
        if recall < RECALL_GOAL {
            failed.push(format!(
                "{}: missed {:?}",
                kind.name(),
                &missed[..missed.len().min(8)]
            ));
        }
    }
    assert!(negatives.len() >= 1000);
    let flagged: Vec<(&str, Vec<Kind>, String)> = negatives
        .iter()
        .filter_map(|n| {
            let findings = scan(&n.text);
            (!findings.is_empty()).then(|| {
                let first = findings[0];
                let excerpt = crate::excerpt(&n.text[first.start..first.end], 48);
                (
                    n.category.as_str(),
                    findings.iter().map(|f| f.kind).collect(),
                    excerpt,
                )
            })
        })
        .collect();
    let rate = flagged.len() as f64 / negatives.len() as f64;
    report.push_str(&format!(
        "negatives        {:>4} snippets, {} with a finding ({:.2}%)\n",
        negatives.len(),
        flagged.len(),
        rate * 100.0
    ));
    let mut by_category: std::collections::BTreeMap<(&str, Kind), usize> = Default::default();
    for (category, kinds, _) in &flagged {
        for kind in kinds {
            *by_category.entry((category, *kind)).or_default() += 1;
        }
    }
    for ((category, kind), n) in &by_category {
        report.push_str(&format!("  {category:<22} {:<16} {n}\n", kind.name()));
    }
    for (category, kinds, excerpt) in flagged.iter().take(20) {
        report.push_str(&format!("  {category}: {kinds:?} {excerpt:?}\n"));
    }
    if rate > FALSE_POSITIVE_GOAL {
        failed.push(format!(
            "false positives: {:?}",
            &flagged[..flagged.len().min(12)]
        ));
    }
    println!("{report}");
    assert!(failed.is_empty(), "{report}\n{}", failed.join("\n"));
}
