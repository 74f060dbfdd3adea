//! Counting throughput, single thread: tokenwarden against tiktoken-rs (and
//! bpe-openai, the crate whose vocabularies and encoder tokenwarden builds
//! on), side by side in one run, on a 10 MB mixed corpus and adversarial
//! inputs. Method and results: docs/benchmarks.md.
//!
//! Run: `cargo bench --bench count` (add `-- --quick` for one round).

use std::hint::black_box;
use std::time::{Duration, Instant};

use tokenwarden::tokens::Encoding;

const MIB: f64 = 1024.0 * 1024.0;

/// A small deterministic generator (xorshift64*), so the corpus is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Fill `out` with `bytes` of `source`, repeated.
fn fill(out: &mut String, source: &str, bytes: usize) {
    let start = out.len();
    while out.len() - start < bytes {
        out.push_str(source);
    }
}

/// 10 MB: 4 MB English prose and Markdown, 3 MB Python, 2 MB CJK, 1 MB
/// emoji-laden chat text; and the prose part alone.
fn corpora() -> (String, String) {
    let reference = include_str!("../tests/data/tokens-reference.jsonl");
    let (mut prose, mut code, mut cjk) = (String::new(), String::new(), String::new());
    for line in reference.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let text = v["text"].as_str().unwrap_or_default();
        match v["source"].as_str() {
            Some("license" | "markdown") => prose.push_str(text),
            Some("python") => code.push_str(text),
            Some("cjk") => cjk.push_str(text),
            _ => {}
        }
    }
    // The reference CJK lines are short: add generated sentences of common characters.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let hanzi: Vec<char> = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从".chars().collect();
    let kana: Vec<char> = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコ".chars().collect();
    let mut generated = String::new();
    while generated.len() < 256 * 1024 {
        let sentence = 8 + rng.next() % 20;
        for _ in 0..sentence {
            generated.push(if rng.next().is_multiple_of(4) {
                rng.pick(&kana)
            } else {
                rng.pick(&hanzi)
            });
        }
        generated.push_str(rng.pick(&["。", "、", "！", "？\n", "。\n"]));
    }
    cjk.push_str(&generated);
    let words = [
        "the", "deploy", "is", "done", "great", "work", "team", "let's", "ship", "it", "tomorrow",
        "OK", "thanks", "LGTM",
    ];
    let emoji = ["🎉", "🚀", "👍", "❤️", "😂", "🔥", "✅", "🙏", "👩‍💻", "🇯🇵"];
    let mut chat = String::new();
    while chat.len() < 256 * 1024 {
        for _ in 0..(3 + rng.next() % 10) {
            chat.push_str(rng.pick(&words));
            chat.push(' ');
            if rng.next().is_multiple_of(3) {
                chat.push_str(rng.pick(&emoji));
                chat.push(' ');
            }
        }
        chat.push('\n');
    }
    let mut corpus = String::with_capacity(10_500_000);
    fill(&mut corpus, &prose, 4_000_000);
    fill(&mut corpus, &code, 3_000_000);
    fill(&mut corpus, &cjk, 2_000_000);
    fill(&mut corpus, &chat, 1_000_000);
    let mut prose_only = String::new();
    fill(&mut prose_only, &prose, 4_000_000);
    (corpus, prose_only)
}

/// One implementation's count of a text.
type Counter<'a> = dyn Fn(&str) -> u64 + 'a;

struct Input {
    name: &'static str,
    text: String,
}

fn inputs() -> Vec<Input> {
    let punctuation: String = "!@#$%^&*()-_=+[]{};:,.<>/?|~`"
        .chars()
        .cycle()
        .take(1 << 20)
        .collect();
    let (mixed, prose) = corpora();
    vec![
        Input {
            name: "mixed 10 MB",
            text: mixed,
        },
        Input {
            name: "prose 4 MB",
            text: prose,
        },
        Input {
            name: "1 MiB of 'a'",
            text: "a".repeat(1 << 20),
        },
        Input {
            name: "1 MiB of punctuation",
            text: punctuation,
        },
    ]
}

/// Median throughput of `rounds` runs (after one warm-up run), in MiB/s, and the count.
/// Stops early when one run exceeds `budget`, and reports what it measured.
fn measure(text: &str, rounds: usize, budget: Duration, f: &Counter<'_>) -> (f64, u64, usize) {
    let count = black_box(f(black_box(text)));
    let mut speeds = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let n = black_box(f(black_box(text)));
        let elapsed = start.elapsed();
        assert_eq!(n, count, "counts differ between runs");
        speeds.push(text.len() as f64 / MIB / elapsed.as_secs_f64());
        if elapsed > budget {
            break;
        }
    }
    speeds.sort_by(f64::total_cmp);
    (speeds[speeds.len() / 2], count, speeds.len())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { 7 };
    let budget = Duration::from_secs(20);
    for encoding in Encoding::ALL {
        encoding.warm_up();
    }
    let tiktoken_o200k = tiktoken_rs::o200k_base_singleton();
    let tiktoken_cl100k = tiktoken_rs::cl100k_base_singleton();

    println!("| input | encoding | implementation | MiB/s (median of {rounds}) | tokens |");
    println!("|---|---|---|---:|---:|");
    for input in inputs() {
        for encoding in Encoding::ALL {
            if input.name != "mixed 10 MB" && encoding == Encoding::Cl100kBase {
                continue;
            }
            let (bpe, tiktoken) = match encoding {
                Encoding::O200kBase => (bpe_openai::o200k_base(), tiktoken_o200k),
                Encoding::Cl100kBase => (bpe_openai::cl100k_base(), tiktoken_cl100k),
            };
            let candidates: [(&str, &Counter<'_>); 3] = [
                ("tokenwarden", &|t| encoding.count(t)),
                ("bpe-openai 0.3.2 count", &|t| bpe.count(t) as u64),
                ("tiktoken-rs 0.12.1 encode_ordinary", &|t| {
                    tiktoken.encode_ordinary(t).len() as u64
                }),
            ];
            let mut counts = Vec::new();
            for (name, f) in candidates {
                let (speed, count, runs) = measure(&input.text, rounds, budget, f);
                let runs = if runs < rounds {
                    format!(" ({runs} run)")
                } else {
                    String::new()
                };
                println!(
                    "| {} | {} | {name} | {speed:.1}{runs} | {count} |",
                    input.name,
                    encoding.name()
                );
                counts.push(count);
            }
            assert!(
                counts.windows(2).all(|w| w[0] == w[1]),
                "implementations disagree: {counts:?}"
            );
        }
    }

    // The privacy guard scans what is about to be shared: it should cost less
    // than counting the same text.
    println!();
    println!("| input | work | MiB/s (median of {rounds}) | result |");
    println!("|---|---|---:|---:|");
    for input in inputs().into_iter().take(2) {
        let (count_speed, tokens, _) = measure(&input.text, rounds, budget, &|t| {
            Encoding::O200kBase.count(t)
        });
        println!(
            "| {} | count (o200k_base) | {count_speed:.1} | {tokens} tokens |",
            input.name
        );
        let (scan_speed, findings, _) = measure(&input.text, rounds, budget, &|t| {
            tokenwarden::guard::scan(t).len() as u64
        });
        println!(
            "| {} | privacy guard scan | {scan_speed:.1} | {findings} findings |",
            input.name
        );
    }
}
