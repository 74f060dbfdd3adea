//! `tokenwarden batch --config FILE --project P INPUT.jsonl > OUTPUT.jsonl`:
//! a file of requests run as one of the project's batches, through the
//! gateway's own machinery (kept in the ledger, paced into the free
//! allowance, each line metered as a live call), without a server.
//!
//! The batch carries the input's fingerprint (SHA-256 of the endpoint and
//! the file) in its metadata: run again after an interruption, the command
//! finds that batch and goes on with it; run again after it ended, it
//! prints the same output without running anything. Progress goes to
//! stderr; the output and error lines (OpenAI's batch output format) to
//! `out`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::gateway::auth::Caller;
use crate::gateway::batches::run::Runner;
use crate::gateway::batches::{self, Batch, Order};
use crate::gateway::{Gateway, SystemClock};
use crate::store::{BatchRow, FILE_PART};

/// The metadata key that holds the input's fingerprint.
const FINGERPRINT: &str = "tokenwarden_batch_input";
/// How often the batch's progress is read.
const POLL: Duration = Duration::from_millis(250);
/// How often progress is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// What to run.
pub struct Args {
    /// The project, by name or id.
    pub project: String,
    /// The org, when projects of several orgs have that name.
    pub org: Option<String>,
    pub input: PathBuf,
    /// The lines' endpoint; by default the first line's `url`.
    pub endpoint: Option<String>,
    pub completion_window: String,
}

/// How a run ended.
#[derive(Debug)]
pub struct Summary {
    pub batch: Batch,
    /// Whether this run found the batch an earlier run started.
    pub resumed: bool,
}

/// Run `args.input` as a batch of its project, write its output and error
/// lines to `out`.
pub async fn run(config: Config, args: &Args, out: impl Write) -> anyhow::Result<Summary> {
    let store = crate::store::open(&config.store, true).await?;
    let gateway = Gateway::with_runner(
        config,
        store,
        Arc::new(SystemClock),
        Runner::for_one_batch(),
    )
    .await?;
    let caller = caller(&gateway, &args.project, args.org.as_deref())?;
    let endpoint = match &args.endpoint {
        Some(e) => e.clone(),
        None => first_url(&args.input)?,
    };
    let fingerprint = fingerprint(&args.input, &endpoint)?;
    let (mut batch, resumed) = match earlier(&gateway, &caller, &fingerprint).await? {
        Some(batch) => (batch, true),
        None => (
            begin(&gateway, &caller, args, endpoint, &fingerprint).await?,
            false,
        ),
    };
    if batch.status == "failed" {
        anyhow::bail!("{}", failure(&batch));
    }
    gateway.batches.run_only(&batch.id);
    if resumed && !ended(&batch.status) {
        eprintln!(
            "batch {}: going on from where an earlier run stopped",
            batch.id
        );
    }
    batch = follow(&gateway, &caller, batch).await?;
    print_files(&gateway, &caller, &batch, out).await?;
    gateway.store.flush().await?;
    Ok(Summary { batch, resumed })
}

/// The caller of the project named (or with id) `project`.
fn caller(gateway: &Gateway, project: &str, org: Option<&str>) -> anyhow::Result<Caller> {
    let live = gateway.live();
    let found: Vec<(usize, usize)> = live
        .config
        .orgs
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.retired && org.is_none_or(|org| *o.name == *org))
        .flat_map(|(i, o)| {
            o.projects
                .iter()
                .enumerate()
                .filter(|(_, p)| p.active() && (*p.name == *project || *p.id == *project))
                .map(move |(j, _)| (i, j))
        })
        .collect();
    match found[..] {
        [(org, project)] => Ok(Caller {
            org,
            project,
            key_id: "cli".into(),
            live,
            batch: None,
        }),
        [] => anyhow::bail!("--project {project:?}: no active project has that name or id"),
        _ => anyhow::bail!(
            "--project {project:?}: projects of several orgs have that name; add --org"
        ),
    }
}

/// The `url` of the file's first line.
fn first_url(input: &Path) -> anyhow::Result<String> {
    use std::io::BufRead;
    let file = std::fs::File::open(input).with_context(|| input.display().to_string())?;
    // The first line, and no more of the file than the largest line may be.
    let mut line = String::new();
    std::io::BufReader::new(file)
        .take(FILE_PART as u64)
        .read_line(&mut line)?;
    let value: Value = serde_json::from_str(&line).with_context(|| {
        format!(
            "{}: the first line is not a JSON object (or pass --endpoint)",
            input.display()
        )
    })?;
    value["url"].as_str().map(str::to_owned).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the first line has no url (or pass --endpoint)",
            input.display()
        )
    })
}

/// Up to [`FILE_PART`] bytes of `input`; `None` at its end.
fn read_part(input: &mut std::fs::File) -> std::io::Result<Option<Bytes>> {
    let mut part = Vec::with_capacity(FILE_PART);
    input.take(FILE_PART as u64).read_to_end(&mut part)?;
    Ok((!part.is_empty()).then(|| Bytes::from(part)))
}

/// SHA-256 of the endpoint, a newline and the file, in hex.
fn fingerprint(input: &Path, endpoint: &str) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(input).with_context(|| input.display().to_string())?;
    let mut hash = Sha256::new();
    hash.update(endpoint.as_bytes());
    hash.update(b"\n");
    while let Some(part) = read_part(&mut file).with_context(|| input.display().to_string())? {
        hash.update(&part);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The newest batch an earlier run of this input started, unless it failed,
/// was cancelled, or was cut while its input was being checked (then the
/// input runs anew).
async fn earlier(
    gateway: &Gateway,
    caller: &Caller,
    fingerprint: &str,
) -> anyhow::Result<Option<Batch>> {
    let (org, project) = caller.owner()?;
    let rows: Vec<BatchRow> = gateway.store.batches(Some(org), Some(project)).await?;
    Ok(rows
        .iter()
        .filter_map(Batch::from_row)
        .filter(|b| {
            b.metadata
                .as_ref()
                .is_some_and(|m| m[FINGERPRINT] == fingerprint)
                && !matches!(
                    b.status.as_str(),
                    "failed" | "cancelled" | "cancelling" | "validating"
                )
        })
        .max_by_key(|b| b.created_at))
}

/// Keep the input as a batch file and start its batch.
async fn begin(
    gateway: &Gateway,
    caller: &Caller,
    args: &Args,
    endpoint: String,
    fingerprint: &str,
) -> anyhow::Result<Batch> {
    let name = args
        .input
        .file_name()
        .map_or_else(|| "input.jsonl".into(), |n| n.to_string_lossy());
    let input =
        std::fs::File::open(&args.input).with_context(|| args.input.display().to_string())?;
    // The file a part at a time (a blocking read: this process runs only
    // this batch).
    let chunks = futures_util::stream::unfold(input, |mut input| async move {
        match read_part(&mut input) {
            Ok(Some(part)) => Some((Ok(part), input)),
            Ok(None) => None,
            Err(e) => Some((
                Err(crate::gateway::error::ApiError::InvalidRequest {
                    message: format!("the input could not be read: {e}"),
                    param: None,
                    code: None,
                }),
                input,
            )),
        }
    });
    let file = crate::gateway::files::keep(gateway, caller, &name, chunks).await?;
    let order = Order {
        endpoint,
        completion_window: args.completion_window.clone(),
        metadata: Some(json!({
            FINGERPRINT: fingerprint,
            "filename": crate::excerpt(&name, 256),
        })),
    };
    Ok(batches::start(gateway, caller, &file, order).await?)
}

fn ended(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "expired" | "cancelled")
}

/// A failed batch's errors, a line each.
fn failure(batch: &Batch) -> String {
    let mut text = format!("batch {} failed:", batch.id);
    let errors = batch.errors.as_ref().map(|e| &e["data"]);
    for e in errors
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(20)
    {
        let line = e["line"]
            .as_u64()
            .map_or(String::new(), |l| format!("line {l}: "));
        text.push_str(&format!(
            "\n  {line}{}",
            e["message"].as_str().unwrap_or("")
        ));
    }
    text
}

/// The batch, read again.
async fn reread(gateway: &Gateway, caller: &Caller, id: &str) -> anyhow::Result<Batch> {
    let (org, project) = caller.owner()?;
    gateway
        .store
        .batches(Some(org), Some(project))
        .await?
        .iter()
        .find(|b| b.id == id)
        .and_then(Batch::from_row)
        .ok_or_else(|| anyhow::anyhow!("batch {id} is gone from the ledger"))
}

/// Show the batch's progress until it ends; the batch as it ended.
async fn follow(gateway: &Gateway, caller: &Caller, mut batch: Batch) -> anyhow::Result<Batch> {
    let total = batch.request_counts.total;
    let mut progress = Progress::new(total);
    while !ended(&batch.status) {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            signal = tokio::signal::ctrl_c() => {
                signal?;
                progress.finish();
                anyhow::bail!("interrupted: run the same command again to go on with batch {}", batch.id);
            }
        }
        batch = reread(gateway, caller, &batch.id).await?;
        let counts = gateway
            .store
            .batch_counts(batch_org(caller)?, batch.id.clone())
            .await?;
        let left: u64 = counts
            .iter()
            .filter(|(state, _)| state == "pending" || state == "running")
            .map(|(_, n)| n)
            .sum();
        let waits = gateway
            .batches
            .waits_until(&batch.id)
            .filter(|until| *until > gateway.clock.now_ms().div_euclid(1000));
        progress.show(total.saturating_sub(left), waits);
    }
    progress.finish();
    Ok(batch)
}

fn batch_org(caller: &Caller) -> anyhow::Result<String> {
    Ok(caller.owner()?.0)
}

/// Write the output file's lines, then the error file's, to `out`.
async fn print_files(
    gateway: &Gateway,
    caller: &Caller,
    batch: &Batch,
    mut out: impl Write,
) -> anyhow::Result<()> {
    let org = batch_org(caller)?;
    for id in [&batch.output_file_id, &batch.error_file_id]
        .into_iter()
        .flatten()
    {
        let mut from = 0;
        loop {
            let parts = gateway
                .store
                .file_parts(org.clone(), id.clone(), from, 4)
                .await?;
            for part in &parts {
                out.write_all(part)?;
            }
            if parts.len() < 4 {
                break;
            }
            from += 4;
        }
    }
    out.flush()?;
    Ok(())
}

/// The progress line on stderr: a bar on a terminal, else a plain line
/// every [`PLAIN_EVERY`].
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_plain: std::time::Instant,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} lines  {elapsed_precise}  {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            total,
            last_plain: std::time::Instant::now(),
        }
    }

    fn show(&mut self, done: u64, waits_until: Option<i64>) {
        let message = waits_until.map_or(String::new(), |until| {
            format!(
                "waiting for the free allowance (until {} 00:00 UTC)",
                crate::day::Day::from_unix(until)
            )
        });
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(message);
            }
            None if self.last_plain.elapsed() >= PLAIN_EVERY => {
                self.last_plain = std::time::Instant::now();
                eprintln!("{done}/{} lines {message}", self.total);
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
