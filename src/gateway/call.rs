//! Settling a call: the one step every path that ends a request goes
//! through, upstream answered or failed, stream finished or cut, client
//! stayed or hung up. A [`Call`] that is dropped unsettled settles itself
//! with an estimate, so cancellation cannot skip it.

use std::sync::Arc;
use std::time::Instant;

use super::{Gateway, Live};
use crate::catalog::Prices;
use crate::meter::{Ticket, Usage};
use crate::store::{Durable, Settled};
use crate::tokens::Encoding;

/// How a call ended, as far as the gateway could see.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Usage as upstream reported it, if it did.
    pub usage: Option<Usage>,
    /// Output text seen (streamed or in the body), counted when usage is missing.
    pub output_text: String,
    /// `output_text`'s tokens, when counted already (off the async workers).
    pub output_tokens: Option<u64>,
    /// The status the client got; 0 when it hung up first.
    pub status: u16,
    /// Upstream answered with an error: nothing was used.
    pub failed: bool,
    pub served_model: Option<String>,
    /// The whole completion (a stream's assembled), when the call is captured.
    pub completion: Option<serde_json::Value>,
}

/// Who a call is for and what it runs on: labels for the metrics and alerts.
#[derive(Clone, Debug)]
pub struct Labels {
    pub org: usize,
    pub project: usize,
    /// The model the call is served by (after a downgrade).
    pub model: std::sync::Arc<str>,
    /// Index of the model's program group, if it has one.
    pub group: Option<usize>,
    /// When the request arrived.
    pub arrived: Instant,
    /// The same, as Unix ms on the gateway's clock.
    pub started_ms: i64,
}

pub struct Call {
    gateway: Arc<Gateway>,
    /// The configuration the call was admitted under.
    live: Arc<Live>,
    labels: Labels,
    /// When the call was sent upstream.
    upstream_started: Option<Instant>,
    /// The request body as sent upstream, when the call's traffic is captured.
    capture: Option<(crate::tokens::request::Endpoint, bytes::Bytes)>,
    /// The pending row in the store.
    row: i64,
    /// What the meter holds for this call.
    ticket: Ticket,
    prices: Prices,
    /// The counted prompt: an estimate's input when upstream reports no usage.
    prompt: u64,
    encoding: Encoding,
    /// Set once settled, so that drop does not settle again.
    settled: bool,
}

impl Call {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gateway: Arc<Gateway>,
        live: Arc<Live>,
        labels: Labels,
        row: i64,
        ticket: Ticket,
        prices: Prices,
        prompt: u64,
        encoding: Encoding,
    ) -> Self {
        gateway.metrics.call_started();
        Call {
            gateway,
            live,
            labels,
            upstream_started: None,
            capture: None,
            row,
            ticket,
            prices,
            prompt,
            encoding,
            settled: false,
        }
    }

    /// Keep this call's request and completion (shared traffic of an org
    /// that captures).
    pub fn capture(&mut self, endpoint: crate::tokens::request::Endpoint, body: bytes::Bytes) {
        if endpoint != crate::tokens::request::Endpoint::Embeddings {
            self.capture = Some((endpoint, body));
        }
    }

    pub fn captures(&self) -> bool {
        self.capture.is_some()
    }

    /// The call goes upstream now.
    pub fn sending(&mut self) {
        self.upstream_started = Some(Instant::now());
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The encoding the call's text is counted in.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The configuration the call was admitted under.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Settle with the meter now and return the record for the store.
    pub fn settle(&mut self, mut outcome: Outcome) -> (i64, Settled) {
        self.settled = true;
        let outcome_completion = outcome.completion.take();
        if outcome.usage.is_some_and(|u| !u.is_sane()) {
            tracing::warn!(
                row = self.row,
                "upstream reported usage past any call's size; the call settles with its estimate"
            );
            outcome.usage = None;
        }
        // A model name upstream gives is kept only if it could be one.
        if let Some(model) = outcome.served_model.take() {
            if model.len() <= crate::tokens::request::MAX_MODEL_NAME_BYTES
                && !model.chars().any(char::is_control)
            {
                outcome.served_model = Some(model);
            } else {
                tracing::warn!(
                    row = self.row,
                    "upstream named an implausible model; kept the requested one"
                );
            }
        }
        let (usage, estimated) = match (outcome.usage, outcome.failed) {
            (_, true) => (Usage::default(), false),
            (Some(usage), false) => (usage, false),
            (None, false) => (
                Usage {
                    input: self.prompt,
                    output: outcome
                        .output_tokens
                        .unwrap_or_else(|| self.encoding.count(&outcome.output_text)),
                    ..Usage::default()
                },
                true,
            ),
        };
        let settlement = self.gateway.store.settle_meter(&self.ticket, &usage);
        if let Some(over) = settlement.over_reservation {
            tracing::warn!(
                row = self.row,
                over,
                reserved = self.ticket.reserved,
                "usage exceeded the reservation; recorded as reported"
            );
        }
        let cost = if settlement.free {
            0
        } else {
            u64::try_from(self.prices.cost(usage.input, usage.cached, usage.output))
                .unwrap_or(u64::MAX)
        };
        let record = Settled {
            served_model: outcome.served_model,
            input: usage.input,
            cached: usage.cached,
            output: usage.output,
            reasoning: usage.reasoning,
            free: settlement.free && usage.total() > 0,
            cost_pico: cost,
            status: outcome.status,
            latency_ms: self.labels.arrived.elapsed().as_millis() as u64,
            estimated,
        };
        // The access log (TOKENWARDEN_LOG=debug): metadata only, never content
        // or keys. Off by default, as the benchmark measured it.
        tracing::debug!(
            row = self.row,
            status = record.status,
            input = record.input,
            output = record.output,
            free = record.free,
            estimated,
            latency_ms = record.latency_ms,
            "call settled"
        );
        self.gateway
            .metrics
            .call_settled(&crate::gateway::metrics::Observed {
                org: self.labels.org,
                project: self.labels.project,
                model: &self.labels.model,
                group: self.labels.group,
                free: record.free,
                input: record.input,
                cached: record.cached,
                output: record.output,
                cost_pico: record.cost_pico,
                total: self.labels.arrived.elapsed(),
                upstream: self.upstream_started.map(|t| t.elapsed()),
            });
        self.gateway.check_alerts(
            &self.live.config,
            self.labels.org,
            self.labels.group,
            record.cost_pico,
            false,
        );
        if let (Some((endpoint, body)), Some(completion)) =
            (self.capture.take(), outcome_completion)
        {
            if (200..300).contains(&record.status) {
                self.keep(endpoint, body, completion, &record);
            }
        }
        (self.row, record)
    }

    /// Compress and store a captured call; content never reaches a log.
    /// A large one (its request over 64 KiB) on the blocking pool, so that
    /// parsing and compressing it never holds a worker.
    fn keep(
        &self,
        endpoint: crate::tokens::request::Endpoint,
        body: bytes::Bytes,
        completion: serde_json::Value,
        record: &Settled,
    ) {
        let Some(org) = self.live.config.orgs.get(self.labels.org) else {
            return;
        };
        let capture = crate::capture::Capture {
            started_ms: self.labels.started_ms,
            org: org.name.to_string(),
            project: org
                .projects
                .get(self.labels.project)
                .map(|p| p.id.to_string())
                .unwrap_or_default(),
            model: record
                .served_model
                .clone()
                .unwrap_or_else(|| self.labels.model.to_string()),
            endpoint: endpoint.path(),
            streamed: false,
            input_tokens: record.input,
            output_tokens: record.output,
            body: Vec::new(),
        };
        let (gateway, row) = (self.gateway.clone(), self.row);
        let large = body.len() > 64 * 1024;
        let store = move || {
            let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return;
            };
            let streamed = request
                .get("stream")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            let pair = serde_json::json!({"request": request, "response": completion});
            let compressed = match crate::capture::compress(&pair) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!(error = %e, row, "could not compress a captured call");
                    return;
                }
            };
            let capture = crate::capture::Capture {
                streamed,
                body: compressed,
                ..capture
            };
            if let Err(e) = gateway.store.capture(capture) {
                tracing::error!(error = %e, row, "could not store a captured call");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if large => drop(runtime.spawn_blocking(store)),
            _ => store(),
        }
    }

    /// Settle and write the record; durable once the answer is awaited
    /// (a call answers its client only once its record is).
    pub fn settle_and_store(mut self, outcome: Outcome) -> Durable {
        self.settle_in_place(outcome)
    }

    /// The same, for a call still borrowed (a stream's tap, a drop).
    pub fn settle_in_place(&mut self, outcome: Outcome) -> Durable {
        let (row, record) = self.settle(outcome);
        match self.live.config.orgs.get(self.labels.org) {
            Some(org) => self
                .gateway
                .store
                .settle(row, &org.name, &self.ticket, record),
            None => Durable::done(Err(crate::store::StoreError::from_message(
                "a call of no configured org".into(),
            ))),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.settled {
            // The client hung up (or the task was cancelled) before an answer:
            // the prompt was sent, so it is counted; the upstream call is
            // cancelled with the future that owned it.
            // Nobody waits for this one: the store writes it all the same.
            drop(self.settle_in_place(Outcome::default()));
        }
    }
}
