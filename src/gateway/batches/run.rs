//! The batch runner: one task per gateway that takes each batch's pending
//! lines from the ledger, as many at once as its project's
//! `batch_concurrency`, and sends each down a live call's road
//! ([`crate::gateway::routes::batch_call`]): counted, metered, guarded,
//! captured, recorded (the batch's id as its key id).
//!
//! Pacing: under `batch_spend = "free"` a line is metered with the
//! allowance less `batch_reserve_percent` and refused rather than billed; a
//! refused line goes back to pending and its batch waits for 00:00 UTC. An
//! upstream 429 or 5xx is tried again, at most [`ATTEMPTS`] times, after
//! `Retry-After` or a backoff. When no line is pending or running, the
//! output and error files are written and the batch is `completed`
//! (`cancelled`, `expired`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::Batch;
use crate::config::BatchSpend;
use crate::gateway::auth::{BatchTerms, Caller};
use crate::gateway::error::ApiError;
use crate::gateway::Gateway;
use crate::store::{BatchLine, BatchRow, FileMeta, FILE_PART};

/// How often the runner looks at the batches when nothing wakes it.
const TICK: Duration = Duration::from_millis(500);
/// Tries of a line the upstream refused with a 429 or a 5xx.
pub const ATTEMPTS: u32 = 3;
/// Lines read from the ledger at a time (finalizing).
const PAGE: i64 = 1000;

/// What the runner keeps in memory: batches waiting for the allowance, and
/// each project's running lines.
#[derive(Default)]
pub struct Runner {
    wake: Arc<tokio::sync::Notify>,
    /// Batch id -> Unix seconds it waits until.
    paused: Mutex<HashMap<String, i64>>,
    /// `project/ORG/PROJECT/N` or `upstream/NAME/N` -> its lines' N turns
    /// (a new N, after a reload or a change, starts new turns: the lines
    /// running on the old ones end as they would have).
    turns: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// When lines left running by a gone runner were last looked for.
    swept_ms: std::sync::atomic::AtomicI64,
    /// Batch id -> its workers here.
    workers: Mutex<HashMap<String, usize>>,
    /// `Some(id)`: run only that batch (`tokenwarden batch`); an empty id
    /// runs none until one is given.
    only: Mutex<Option<String>>,
}

impl Runner {
    /// A runner that runs no batch until [`Runner::run_only`] names one.
    pub fn for_one_batch() -> Runner {
        Runner {
            only: Mutex::new(Some(String::new())),
            ..Runner::default()
        }
    }

    /// Run only batch `id` from now on.
    pub fn run_only(&self, id: &str) {
        if let Ok(mut only) = self.only.lock() {
            *only = Some(id.to_owned());
        }
        self.notify_one();
    }

    fn runs(&self, id: &str) -> bool {
        self.only
            .lock()
            .is_ok_and(|only| only.as_deref().is_none_or(|only| only == id))
    }

    /// Until when batch `id` waits for the allowance (Unix seconds), if it does.
    pub fn waits_until(&self, id: &str) -> Option<i64> {
        self.paused.lock().ok().and_then(|p| p.get(id).copied())
    }

    /// A batch was made or cancelled: look now.
    pub fn notify_one(&self) {
        self.wake.notify_one();
    }

    fn paused(&self, id: &str, now_s: i64) -> bool {
        self.paused
            .lock()
            .is_ok_and(|p| p.get(id).is_some_and(|until| *until > now_s))
    }

    fn pause(&self, id: &str, until_s: i64) {
        if let Ok(mut p) = self.paused.lock() {
            p.insert(id.to_owned(), until_s);
        }
    }

    fn worker(&self, id: &str, change: isize) {
        let mut workers = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = workers.entry(id.to_owned()).or_default();
        *n = n.saturating_add_signed(change);
        if *n == 0 {
            workers.remove(id);
        }
    }

    fn working(&self, id: &str) -> bool {
        self.workers.lock().is_ok_and(|w| w.contains_key(id))
    }

    /// The `n` turns named `key`.
    fn turns(&self, key: String, n: u16) -> Arc<tokio::sync::Semaphore> {
        let key = format!("{key}/{n}");
        let mut turns = self
            .turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        turns
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(usize::from(n))))
            .clone()
    }
}

/// The runner's task: until the gateway goes.
pub async fn run(weak: Weak<Gateway>) {
    // SQLite's one gateway: every line left running was this gateway's
    // before a stop.
    if let Some(gateway) = weak.upgrade().filter(|g| !g.store.shared()) {
        if let Err(e) = interrupted(&gateway, i64::MAX, Every::Batch).await {
            tracing::error!(error = ?e, "could not settle the batch lines a stop interrupted");
        }
    }
    loop {
        let Some(gateway) = weak.upgrade() else {
            return;
        };
        let wake = gateway.batches.wake.clone();
        let woken = wake.notified();
        if let Err(e) = tick(&gateway).await {
            tracing::warn!(error = ?e, "the batch runner could not read the ledger");
        }
        drop(gateway);
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// How often lines left running by a runner that is gone (a replica that
/// died) are looked for.
const SWEEP_EVERY_MS: i64 = 60_000;
/// A batch still `validating` this long after it was made was cut by a
/// stop (checking a 200 MB file takes seconds): it is `failed`.
const VALIDATING_AT_MOST_S: i64 = 3600;

/// Lines left running, claimed before `before_ms`, by a runner that stopped:
/// they may have gone upstream, so they are not run again; each is an error
/// line. A line is taken for interrupted once it was claimed longer ago
/// than any call may take (the upstream timeout, and two minutes more).
async fn interrupted(gateway: &Gateway, before_ms: i64, which: Every) -> Result<(), ApiError> {
    for row in active(gateway, which).await? {
        let mut from = 1;
        loop {
            let lines = gateway
                .store
                .batch_lines(row.org.clone(), row.id.clone(), from, PAGE)
                .await
                .map_err(ApiError::store)?;
            for l in lines
                .iter()
                .filter(|l| l.state == "running" && l.claimed_ms < before_ms)
            {
                let error = error_line(
                    &row.id,
                    l,
                    "interrupted",
                    "The gateway stopped while this request ran; it was not run again.",
                );
                set(gateway, &row, l.line, "failed", error).await?;
            }
            match lines.last() {
                Some(last) if lines.len() as i64 == PAGE => from = last.line + 1,
                _ => break,
            }
        }
    }
    Ok(())
}

/// Fail the batches a stop cut while their input was being checked: they
/// would stay `validating` for ever.
async fn cut_while_validating(gateway: &Gateway, now_s: i64) -> Result<(), ApiError> {
    let rows = gateway
        .store
        .batches(None, None)
        .await
        .map_err(ApiError::store)?;
    for row in rows.iter().filter(|r| r.status == "validating") {
        let Some(mut batch) = Batch::from_row(row) else {
            continue;
        };
        if batch.created_at > now_s - VALIDATING_AT_MOST_S {
            continue;
        }
        batch.status = "failed".into();
        batch.failed_at = Some(now_s);
        batch.errors = Some(json!({"object": "list", "data": [{
            "code": "validation_interrupted",
            "message": "The gateway stopped while the input file was being validated; create the batch again.",
            "param": null,
            "line": null,
        }]}));
        save(gateway, row, &batch).await?;
    }
    Ok(())
}

/// Which batches [`active`] lists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Every {
    /// Every batch in the ledger.
    Batch,
    /// The ones this runner runs.
    Run,
}

async fn active(gateway: &Gateway, which: Every) -> Result<Vec<BatchRow>, ApiError> {
    Ok(gateway
        .store
        .batches(None, None)
        .await
        .map_err(ApiError::store)?
        .into_iter()
        .filter(|b| {
            matches!(
                b.status.as_str(),
                "in_progress" | "cancelling" | "finalizing"
            ) && (which == Every::Batch || gateway.batches.runs(&b.id))
        })
        .collect())
}

async fn set(
    gateway: &Gateway,
    row: &BatchRow,
    line: i64,
    state: &str,
    result: Value,
) -> Result<(), ApiError> {
    gateway
        .store
        .batch_line_set(
            row.org.clone(),
            row.id.clone(),
            line,
            state.to_owned(),
            result.to_string(),
        )
        .await
        .map_err(ApiError::store)
}

fn error_line(batch: &str, l: &BatchLine, code: &str, message: &str) -> Value {
    json!({
        "id": format!("{batch}_req_{}", l.line),
        "custom_id": l.custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
}

/// One look at every active batch.
async fn tick(gateway: &Arc<Gateway>) -> Result<(), ApiError> {
    let now_ms = gateway.clock.now_ms();
    let now_s = now_ms.div_euclid(1000);
    let swept = &gateway.batches.swept_ms;
    if now_ms - swept.load(std::sync::atomic::Ordering::Relaxed) >= SWEEP_EVERY_MS {
        swept.store(now_ms, std::sync::atomic::Ordering::Relaxed);
        let longest = gateway.live().config.server.upstream_timeout.as_millis() as i64;
        interrupted(gateway, now_ms - longest - 120_000, Every::Run).await?;
        crate::gateway::files::purge_abandoned(gateway, now_s).await?;
        cut_while_validating(gateway, now_s).await?;
    }
    for row in active(gateway, Every::Run).await? {
        let Some(batch) = Batch::from_row(&row) else {
            continue;
        };
        let ends = match batch.status.as_str() {
            "cancelling" => Some((
                "cancelled",
                "batch_cancelled",
                "The batch was cancelled before this request ran.",
            )),
            "in_progress" if batch.expires_at.is_some_and(|t| t <= now_s) => Some((
                "expired",
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            )),
            "finalizing" => {
                finalize(gateway, &row, batch, "completed").await?;
                continue;
            }
            _ => None,
        };
        if let Some((status, code, message)) = ends {
            drain(gateway, &row, code, message).await?;
            if running(gateway, &row).await? == 0 {
                finalize(gateway, &row, batch, status).await?;
            }
            continue;
        }
        let paused = gateway.batches.paused(&row.id, now_s);
        // Counting reads every line of the batch: only when no worker here
        // runs one (another replica's may: the counts say so).
        if !gateway.batches.working(&row.id) {
            let counts = counts(gateway, &row).await?;
            if !counts.contains_key("pending") && !counts.contains_key("running") {
                finalize(gateway, &row, batch, "completed").await?;
                continue;
            }
            if !counts.contains_key("pending") {
                continue;
            }
        }
        if !paused {
            start_lines(gateway, &row, &batch).await?;
        }
    }
    Ok(())
}

async fn counts(gateway: &Gateway, row: &BatchRow) -> Result<HashMap<String, u64>, ApiError> {
    Ok(gateway
        .store
        .batch_counts(row.org.clone(), row.id.clone())
        .await
        .map_err(ApiError::store)?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect())
}

async fn running(gateway: &Gateway, row: &BatchRow) -> Result<u64, ApiError> {
    Ok(counts(gateway, row)
        .await?
        .get("running")
        .copied()
        .unwrap_or(0))
}

/// The lines not yet run of an ending batch: error lines.
async fn drain(
    gateway: &Gateway,
    row: &BatchRow,
    code: &str,
    message: &str,
) -> Result<(), ApiError> {
    loop {
        let lines = gateway
            .store
            .batch_take(
                row.org.clone(),
                row.id.clone(),
                PAGE,
                gateway.clock.now_ms(),
            )
            .await
            .map_err(ApiError::store)?;
        if lines.is_empty() {
            return Ok(());
        }
        for l in &lines {
            let state = if code == "batch_cancelled" {
                "cancelled"
            } else {
                "expired"
            };
            set(
                gateway,
                row,
                l.line,
                state,
                error_line(&row.id, l, code, message),
            )
            .await?;
        }
    }
}

/// Start as many workers on a batch as its project has turns free; each
/// takes the batch's next pending line, runs it, and takes the next, until
/// none is left (or the batch waits for the allowance).
async fn start_lines(
    gateway: &Arc<Gateway>,
    row: &BatchRow,
    batch: &Batch,
) -> Result<(), ApiError> {
    let live = gateway.live();
    let Some((org, project)) = locate(&live, &row.org, &row.project) else {
        return Ok(());
    };
    let Some(endpoint) = crate::gateway::routes::metered_endpoint(&batch.endpoint) else {
        return Ok(());
    };
    let p = &live.config.orgs[org].projects[project];
    let Some(upstream) = live.config.upstreams.get(&p.upstream) else {
        return Ok(());
    };
    // A line runs on a turn of its project's and one of its upstream's.
    let turns = gateway.batches.turns(
        format!("project/{}/{}", row.org, row.project),
        p.batch_concurrency,
    );
    let upstream_turns = gateway.batches.turns(
        format!("upstream/{}", upstream.name),
        upstream.batch_concurrency,
    );
    let terms = Arc::new(BatchTerms {
        free_only: p.batch_spend == BatchSpend::Free,
        reserve_percent: p.batch_reserve_percent,
    });
    while let (Ok(turn), Ok(upstream_turn)) = (
        turns.clone().try_acquire_owned(),
        upstream_turns.clone().try_acquire_owned(),
    ) {
        let caller = Caller {
            org,
            project,
            key_id: row.id.as_str().into(),
            live: live.clone(),
            batch: Some(terms.clone()),
        };
        let (gateway, row) = (gateway.clone(), row.clone());
        gateway.batches.worker(&row.id, 1);
        tokio::spawn(async move {
            let ran = match work(&gateway, &row, caller, endpoint).await {
                Ok(ran) => ran,
                Err(e) => {
                    tracing::warn!(error = ?e, batch = %row.id, "a batch worker stopped");
                    true
                }
            };
            gateway.batches.worker(&row.id, -1);
            drop((turn, upstream_turn));
            // A worker that ran a line may have ended the batch: look now
            // (one that found none waits for the next look).
            if ran {
                gateway.batches.notify_one();
            }
        });
    }
    Ok(())
}

/// A worker: the batch's next line, one at a time, until none is pending;
/// whether it ran one.
async fn work(
    gateway: &Arc<Gateway>,
    row: &BatchRow,
    caller: Caller,
    endpoint: crate::tokens::request::Endpoint,
) -> Result<bool, ApiError> {
    let mut ran = false;
    loop {
        if gateway
            .batches
            .paused(&row.id, gateway.clock.now_ms().div_euclid(1000))
        {
            return Ok(ran);
        }
        let mut lines = gateway
            .store
            .batch_take(row.org.clone(), row.id.clone(), 1, gateway.clock.now_ms())
            .await
            .map_err(ApiError::store)?;
        let Some(line) = lines.pop() else {
            return Ok(ran);
        };
        run_line(gateway, row, caller.clone(), endpoint, line).await?;
        ran = true;
    }
}

/// The positions of org `org` and project `project` (by id), if they are there.
fn locate(live: &crate::gateway::Live, org: &str, project: &str) -> Option<(usize, usize)> {
    let o = live
        .config
        .orgs
        .iter()
        .position(|o| *o.name == *org && !o.retired)?;
    let p = live.config.orgs[o]
        .projects
        .iter()
        .position(|p| *p.id == *project && p.active())?;
    Some((o, p))
}

/// Run one line (tries included) and record its output or error line.
async fn run_line(
    gateway: &Arc<Gateway>,
    row: &BatchRow,
    caller: Caller,
    endpoint: crate::tokens::request::Endpoint,
    line: BatchLine,
) -> Result<(), ApiError> {
    let limit = caller.live.config.server.max_answer_bytes;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response = crate::gateway::routes::batch_call(
            gateway.clone(),
            caller.clone(),
            endpoint,
            Bytes::from(line.body.clone()),
        )
        .await;
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (request_id, retry_after) = (header("x-request-id"), header("retry-after"));
        drop(parts);
        let body = match http_body_util::Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::from_static(
                b"{\"error\": {\"message\": \"The answer was too large or cut.\"}}",
            ),
        };
        let body: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        if status == 429 && body["error"]["code"] == "free_tokens_exhausted" {
            // Paced: back to pending, and the batch waits for 00:00 UTC.
            let now_s = gateway.clock.now_ms().div_euclid(1000);
            gateway.batches.pause(
                &row.id,
                now_s + i64::try_from(gateway.seconds_to_reset()).unwrap_or(86_400),
            );
            return set(
                gateway,
                row,
                line.line,
                "pending",
                Value::String(String::new()),
            )
            .await;
        }
        if (status == 429 || status >= 500) && attempt < ATTEMPTS {
            let wait = retry_after
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(1 << attempt)
                .min(60);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        let result = json!({
            "id": format!("{}_req_{}", row.id, line.line),
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": null,
        });
        let state = if (200..300).contains(&status) {
            "done"
        } else {
            "failed"
        };
        return set(gateway, row, line.line, state, result).await;
    }
}

/// Write the output and error files, count, and end the batch as `status`.
async fn finalize(
    gateway: &Gateway,
    row: &BatchRow,
    mut batch: Batch,
    status: &str,
) -> Result<(), ApiError> {
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    if batch.status != "finalizing" && status == "completed" {
        batch.status = "finalizing".into();
        batch.finalizing_at = Some(now_s);
        save(gateway, row, &batch).await?;
    }
    let mut output = Writer::new(gateway, row, format!("{}_output.jsonl", row.id));
    let mut errors = Writer::new(gateway, row, format!("{}_error.jsonl", row.id));
    let (mut completed, mut failed) = (0u64, 0u64);
    let (mut input, mut output_tokens) = (0u64, 0u64);
    let mut from = 1;
    loop {
        let lines = gateway
            .store
            .batch_lines(row.org.clone(), row.id.clone(), from, PAGE)
            .await
            .map_err(ApiError::store)?;
        for l in &lines {
            match l.state.as_str() {
                "done" => {
                    completed += 1;
                    let result: Value = serde_json::from_str(&l.result).unwrap_or_default();
                    let usage = &result["response"]["body"]["usage"];
                    input += usage["prompt_tokens"]
                        .as_u64()
                        .or(usage["input_tokens"].as_u64())
                        .unwrap_or(0);
                    output_tokens += usage["completion_tokens"]
                        .as_u64()
                        .or(usage["output_tokens"].as_u64())
                        .unwrap_or(0);
                    output.line(&l.result).await?;
                }
                "failed" | "expired" | "cancelled" => {
                    failed += 1;
                    errors.line(&l.result).await?;
                }
                _ => {}
            }
        }
        match lines.last() {
            Some(last) if lines.len() as i64 == PAGE => from = last.line + 1,
            _ => break,
        }
    }
    batch.output_file_id = output.end().await?;
    batch.error_file_id = errors.end().await?;
    batch.request_counts.completed = completed;
    batch.request_counts.failed = failed;
    batch.usage.input_tokens = input;
    batch.usage.output_tokens = output_tokens;
    batch.usage.total_tokens = input.saturating_add(output_tokens);
    batch.status = status.into();
    match status {
        "cancelled" => batch.cancelled_at = Some(now_s),
        "expired" => batch.expired_at = Some(now_s),
        _ => batch.completed_at = Some(now_s),
    }
    save(gateway, row, &batch).await
}

async fn save(gateway: &Gateway, row: &BatchRow, batch: &Batch) -> Result<(), ApiError> {
    gateway
        .store
        .batch_save(batch.row(&row.org, &row.project))
        .await
        .map_err(ApiError::store)
}

/// A result file written a part at a time (none if no line is written).
struct Writer<'a> {
    gateway: &'a Gateway,
    meta: FileMeta,
    part: BytesMut,
    seq: i64,
    begun: bool,
}

impl<'a> Writer<'a> {
    fn new(gateway: &'a Gateway, row: &BatchRow, filename: String) -> Self {
        Writer {
            gateway,
            meta: FileMeta {
                id: format!("file-{}", &crate::gateway::auth::new_key("")[..24]),
                org: row.org.clone(),
                project: row.project.clone(),
                purpose: "batch_output".into(),
                filename,
                bytes: 0,
                created_at: gateway.clock.now_ms().div_euclid(1000),
            },
            part: BytesMut::new(),
            seq: 0,
            begun: false,
        }
    }

    async fn line(&mut self, text: &str) -> Result<(), ApiError> {
        if !self.begun {
            self.gateway
                .store
                .file_begin(self.meta.clone())
                .await
                .map_err(ApiError::store)?;
            self.begun = true;
        }
        self.part.extend_from_slice(text.as_bytes());
        self.part.extend_from_slice(b"\n");
        self.meta.bytes += text.len() as u64 + 1;
        if self.part.len() >= FILE_PART {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ApiError> {
        let data = self.part.split().freeze();
        self.gateway
            .store
            .file_part(self.meta.org.clone(), self.meta.id.clone(), self.seq, data)
            .await
            .map_err(ApiError::store)?;
        self.seq += 1;
        Ok(())
    }

    /// The file's id, if a line was written.
    async fn end(mut self) -> Result<Option<String>, ApiError> {
        if !self.begun {
            return Ok(None);
        }
        if !self.part.is_empty() {
            self.flush().await?;
        }
        self.gateway
            .store
            .file_end(
                self.meta.org.clone(),
                self.meta.id.clone(),
                self.meta.purpose.clone(),
                self.meta.bytes,
            )
            .await
            .map_err(ApiError::store)?;
        Ok(Some(self.meta.id))
    }
}
