//! Settling a call: the one step every path that ends a request goes
//! through, upstream answered or failed, stream finished or cut, client
//! stayed or hung up. A [`Call`] that is dropped unsettled settles itself
//! with an estimate, so cancellation cannot skip it.

use std::sync::Arc;
use std::time::Instant;

use super::Gateway;
use crate::catalog::Prices;
use crate::meter::{Ticket, Usage};
use crate::store::Settled;
use crate::tokens::Encoding;

/// How a call ended, as far as the gateway could see.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Usage as upstream reported it, if it did.
    pub usage: Option<Usage>,
    /// Output text seen (streamed or in the body), counted when usage is missing.
    pub output_text: String,
    /// The status the client got; 0 when it hung up first.
    pub status: u16,
    /// Upstream answered with an error: nothing was used.
    pub failed: bool,
    pub served_model: Option<String>,
}

/// Who a call is for and what it runs on: labels for the metrics and alerts.
#[derive(Clone, Debug)]
pub struct Labels {
    pub org: usize,
    pub project: usize,
    /// The model the call is served by (after a downgrade).
    pub model: String,
    /// Index of the model's program group, if it has one.
    pub group: Option<usize>,
    /// When the request arrived.
    pub arrived: Instant,
}

pub struct Call {
    gateway: Arc<Gateway>,
    labels: Labels,
    /// When the call was sent upstream.
    upstream_started: Option<Instant>,
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
    pub fn new(
        gateway: Arc<Gateway>,
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
            labels,
            upstream_started: None,
            row,
            ticket,
            prices,
            prompt,
            encoding,
            settled: false,
        }
    }

    /// The call goes upstream now.
    pub fn sending(&mut self) {
        self.upstream_started = Some(Instant::now());
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Settle with the meter now and return the record for the store.
    pub fn settle(&mut self, outcome: Outcome) -> (i64, Settled) {
        self.settled = true;
        let (usage, estimated) = match (outcome.usage, outcome.failed) {
            (_, true) => (Usage::default(), false),
            (Some(usage), false) => (usage, false),
            (None, false) => (
                Usage {
                    input: self.prompt,
                    output: self.encoding.count(&outcome.output_text),
                    ..Usage::default()
                },
                true,
            ),
        };
        let settlement = match self.gateway.ledger.lock() {
            Ok(mut ledger) => ledger.settle(&self.ticket, &usage),
            Err(_) => {
                tracing::error!("meter lock poisoned; call recorded as billed");
                crate::meter::Settlement {
                    free: false,
                    over_reservation: None,
                }
            }
        };
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
        self.gateway
            .check_alerts(self.labels.org, self.labels.group, record.cost_pico);
        (self.row, record)
    }

    /// Settle and write the record, waiting for the store (non-streaming calls
    /// answer the client only once their record is durable).
    pub async fn settle_and_store(mut self, outcome: Outcome) {
        let (row, record) = self.settle(outcome);
        if let Err(e) = self.gateway.store.settle_async(row, record).await {
            tracing::error!(error = %e, row, "could not record a settled call");
        }
    }

    /// Settle now and write the record in the background.
    pub fn settle_in_background(&mut self, outcome: Outcome) {
        let (row, record) = self.settle(outcome);
        if let Err(e) = self.gateway.store.settle_nowait(row, record) {
            tracing::error!(error = %e, row, "could not record a settled call");
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.settled {
            // The client hung up (or the task was cancelled) before an answer:
            // the prompt was sent, so it is counted; the upstream call is
            // cancelled with the future that owned it.
            self.settle_in_background(Outcome::default());
        }
    }
}
