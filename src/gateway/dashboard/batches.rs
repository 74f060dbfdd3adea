//! The dashboard's batches: each batch of the orgs shown (those running,
//! and the latest ended), its progress, today's free against billed tokens,
//! and when it should end at what is left of today's allowance.

use std::fmt::Write as _;

use super::render::esc;
use crate::gateway::batches::Batch;
use crate::gateway::Gateway;
use crate::store::UsageRow;

/// A batch and how many of its lines are in each state.
pub struct Shown {
    pub org: String,
    pub batch: Batch,
    pub counts: Vec<(String, u64)>,
    /// Its project's `batch_reserve_percent`, if it spends only free tokens.
    pub reserve_percent: Option<u8>,
}

/// Ended batches shown at most, per org.
const ENDED: usize = 5;

/// The batches of the orgs `orgs` (running ones, and the latest ended).
pub async fn read(gateway: &Gateway, orgs: &[String]) -> Vec<Shown> {
    let mut out = Vec::new();
    let live = gateway.live();
    for org in orgs {
        let rows = gateway
            .store
            .batches(Some(org.clone()), None)
            .await
            .unwrap_or_default();
        let mut ended = 0;
        for row in rows.iter().rev() {
            let Some(batch) = Batch::from_row(row) else {
                continue;
            };
            let running = matches!(
                batch.status.as_str(),
                "validating" | "in_progress" | "finalizing" | "cancelling"
            );
            if !running {
                ended += 1;
                if ended > ENDED {
                    continue;
                }
            }
            let counts = gateway
                .store
                .batch_counts(row.org.clone(), row.id.clone())
                .await
                .unwrap_or_default();
            let reserve_percent = live
                .config
                .orgs
                .iter()
                .find(|o| *o.name == **org)
                .and_then(|o| o.projects.iter().find(|p| *p.id == *row.project))
                .filter(|p| p.batch_spend == crate::config::BatchSpend::Free)
                .map(|p| p.batch_reserve_percent);
            out.push(Shown {
                org: org.clone(),
                batch,
                counts,
                reserve_percent,
            });
        }
    }
    out
}

/// The org's batches as a table; nothing when it has none.
/// `free_left` tells what is left today of a batch's allowance (its first
/// model's group, less its reserve).
pub fn render(
    out: &mut String,
    org: &str,
    shown: &[Shown],
    by_key: &[UsageRow],
    free_left: impl Fn(&Shown) -> u64,
) {
    let mine: Vec<&Shown> = shown.iter().filter(|s| s.org == org).collect();
    if mine.is_empty() {
        return;
    }
    out.push_str(
        "<div class=\"scroll\"><table class=\"batches\"><caption>Batches</caption><thead><tr>\
<th scope=\"col\">Batch</th><th scope=\"col\">Status</th><th scope=\"col\">Lines done</th>\
<th scope=\"col\">Free tokens today</th><th scope=\"col\">Billed tokens today</th><th scope=\"col\">Ends</th></tr></thead><tbody>",
    );
    for s in mine {
        let n = |state: &str| {
            s.counts
                .iter()
                .find(|(k, _)| k == state)
                .map_or(0, |(_, n)| *n)
        };
        let total: u64 = s.counts.iter().map(|(_, n)| n).sum();
        let finished = n("done") + n("failed") + n("expired") + n("cancelled");
        let (mut free, mut billed) = (0u64, 0u64);
        for r in by_key
            .iter()
            .filter(|r| r.org == org && r.api_key_id.as_deref() == Some(&*s.batch.id))
        {
            let tokens = r.input_tokens.saturating_add(r.output_tokens);
            if r.lane.as_deref() == Some("free") {
                free = free.saturating_add(tokens);
            } else {
                billed = billed.saturating_add(tokens);
            }
        }
        let ends = estimate(
            &s.batch.status,
            n("pending") + n("running"),
            n("done"),
            free + billed,
            free_left(s),
        );
        let _ = write!(
            out,
            "<tr data-batch=\"{}\" data-done=\"{finished}\" data-total=\"{total}\"><td>{}</td><td>{}</td><td>{finished} of {total}</td><td>{free}</td><td>{billed}</td><td>{}</td></tr>",
            esc(&s.batch.id),
            esc(&s.batch.id),
            esc(&s.batch.status),
            esc(&ends)
        );
    }
    out.push_str("</tbody></table></div>");
}

/// When a running batch should end: its lines left at the tokens a line
/// took so far, against what is left of today's free allowance.
fn estimate(status: &str, left: u64, done: u64, tokens: u64, free_left: u64) -> String {
    if status != "in_progress" {
        return "-".into();
    }
    if left == 0 {
        return "now".into();
    }
    if done == 0 || tokens == 0 {
        return "unknown yet".into();
    }
    let needed = (tokens / done).saturating_mul(left);
    if needed <= free_left {
        format!("today (about {needed} tokens left to run)")
    } else {
        let days = needed.div_ceil(free_left.max(1));
        format!("in about {days} days at today's allowance ({needed} tokens left to run)")
    }
}

#[cfg(test)]
mod tests {
    use super::estimate;

    #[test]
    fn estimates() {
        assert_eq!(estimate("completed", 0, 5, 50, 100), "-");
        assert_eq!(estimate("in_progress", 10, 0, 0, 100), "unknown yet");
        assert_eq!(
            estimate("in_progress", 5, 5, 50, 100),
            "today (about 50 tokens left to run)"
        );
        assert!(estimate("in_progress", 50, 5, 50, 100).starts_with("in about 5 days"));
    }
}
