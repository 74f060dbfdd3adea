//! Recovering dead replicas: a replica whose heartbeat is older than
//! [`super::STALE`] is taken for dead by whichever replica sweeps first.
//! Org by org, each in a transaction of its own: its pending calls settle
//! as `interrupted`, a free-lane call's reservation counted as free tokens
//! used (an upper bound); whatever else its leases held is forfeited for
//! the day (counted as used: a call of its may have gone upstream before
//! its row reached PostgreSQL, so those tokens are never handed out
//! again). Then the replica's row goes, which tells it, should it still be
//! running, that it may lease no more.

use crate::store::StoreError;

/// Recover every dead replica but `me`; returns how many calls settled as
/// interrupted. A stale replica's row goes first (so that, should it still
/// run, its next heartbeat finds it gone and it stops admitting calls);
/// then whatever a replica without a row left, org by org: its leases and
/// pending calls (a sweep cut short is finished by the next one).
pub(super) async fn sweep(pool: &deadpool_postgres::Pool, me: &str) -> Result<usize, StoreError> {
    let mut client = pool.get().await.map_err(super::pool_error)?;
    let stale_before = crate::store::now_ms() - super::STALE.as_millis() as i64;
    for row in client
        .query(
            "DELETE FROM replicas WHERE seen_ms < $1 AND id <> $2 RETURNING id",
            &[&stale_before, &me],
        )
        .await?
    {
        let replica: String = row.get(0);
        tracing::warn!(%replica, "a replica stopped beating; recovering its calls and leases");
    }
    let orphans: Vec<(String, String)> = client
        .query(
            "SELECT DISTINCT replica, org FROM leases WHERE replica NOT IN (SELECT id FROM replicas)
             UNION
             SELECT DISTINCT replica, org FROM requests
             WHERE state = 'pending' AND replica NOT IN (SELECT id FROM replicas)",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut interrupted = 0;
    for (replica, org) in orphans {
        interrupted += recover_org(&mut client, &replica, &org).await?;
    }
    Ok(interrupted)
}

/// One org's part of a dead replica, in one transaction.
async fn recover_org(
    client: &mut deadpool_postgres::Object,
    replica: &str,
    org: &str,
) -> Result<usize, StoreError> {
    let tx = client.transaction().await?;
    let calls = tx
        .query(
            "UPDATE requests SET state = 'interrupted', estimated = true, free = free_lane,
                input_tokens = CASE WHEN free_lane THEN reserved ELSE 0 END
             WHERE org = $1 AND replica = $2 AND state = 'pending'
             RETURNING day, COALESCE(grp, ''), free_lane, reserved",
            &[&org, &replica],
        )
        .await?;
    // Per day and group: calls interrupted, and their free tokens.
    let mut sums: Vec<(i32, String, i64, i64)> = Vec::new();
    for row in &calls {
        let (day, grp, free_lane, reserved): (i32, String, bool, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let free = if free_lane { reserved } else { 0 };
        match sums.iter_mut().find(|(d, g, _, _)| *d == day && *g == grp) {
            Some(sum) => {
                sum.2 += 1;
                sum.3 = sum.3.saturating_add(free);
            }
            None => sums.push((day, grp, 1, free)),
        }
    }
    let leases = tx
        .query(
            "DELETE FROM leases WHERE org = $1 AND replica = $2 RETURNING day, grp, held",
            &[&org, &replica],
        )
        .await?;
    for (day, grp, requests, free) in &sums {
        tx.execute(
            "INSERT INTO daily (org, day, grp, free_tokens, requests) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (org, day, grp) DO UPDATE SET
                free_tokens = LEAST(daily.free_tokens::NUMERIC + EXCLUDED.free_tokens, 9223372036854775807)::BIGINT,
                requests = daily.requests + EXCLUDED.requests",
            &[&org, day, grp, free, requests],
        )
        .await?;
    }
    for row in &leases {
        let (day, grp, held): (i32, String, i64) = (row.get(0), row.get(1), row.get(2));
        let counted = sums
            .iter()
            .find(|(d, g, _, _)| *d == day && *g == grp)
            .map_or(0, |s| s.3);
        tx.execute(
            "UPDATE daily SET leased = leased - $4, forfeited = forfeited + GREATEST($4 - $5, 0)
             WHERE org = $1 AND day = $2 AND grp = $3",
            &[&org, &day, &grp, &held, &counted],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(calls.len())
}
