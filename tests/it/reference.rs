//! Every reference vector, in both encodings, token id for token id.

use std::path::Path;

use serde::Deserialize;
use tokenwarden::tokens::Encoding;

#[derive(Deserialize)]
struct Vector {
    id: String,
    source: String,
    text: String,
    o200k_base: Vec<u32>,
    cl100k_base: Vec<u32>,
}

const REPO_COPY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/tokens-reference.jsonl"
);
const SHARED_COPY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/tokens/reference.jsonl"
);

fn vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(REPO_COPY).unwrap_or_else(|e| panic!("{REPO_COPY}: {e}"));
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1))
        })
        .collect()
}

#[test]
fn repo_copy_matches_the_shared_copy() {
    // The shared copy sits beside the repo in CI and in development; on a
    // machine without it there is nothing to compare.
    if Path::new(SHARED_COPY).exists() {
        let shared = std::fs::read(SHARED_COPY).unwrap_or_default();
        let ours = std::fs::read(REPO_COPY).unwrap_or_default();
        assert!(
            shared == ours,
            "tests/data/tokens-reference.jsonl differs from {SHARED_COPY}: copy it again"
        );
    }
}

#[test]
fn every_vector_encodes_to_tiktokens_ids_in_both_encodings() {
    let vectors = vectors();
    assert!(vectors.len() >= 400, "only {} vectors", vectors.len());
    let mut failures = Vec::new();
    for v in &vectors {
        for (encoding, expected) in [
            (Encoding::O200kBase, &v.o200k_base),
            (Encoding::Cl100kBase, &v.cl100k_base),
        ] {
            let ids = encoding.encode(&v.text);
            let count = encoding.count(&v.text);
            if &ids != expected || count != expected.len() as u64 {
                let first = ids.iter().zip(expected.iter()).position(|(a, b)| a != b);
                failures.push(format!(
                    "{} ({}) {}: {} ids, count {}, expected {}; first difference at {first:?}",
                    v.id,
                    v.source,
                    encoding.name(),
                    ids.len(),
                    count,
                    expected.len()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn adversarial_vectors_are_covered() {
    // The suite must include the inputs that made older tokenizers quadratic.
    let vectors = vectors();
    let longest = vectors
        .iter()
        .filter(|v| v.source == "adversarial")
        .map(|v| v.text.len())
        .max();
    assert!(
        longest.unwrap_or(0) >= 10_000,
        "no long adversarial input: {longest:?}"
    );
}
