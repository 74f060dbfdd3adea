//! A metered call's first step past reading: ask the meter (through the
//! store) what the call may do, change the body to match (a clamped output
//! cap, a downgraded model, the stream's usage asked for), and write it to
//! the ledger as pending, or refused.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use super::read::Read;
use super::{body_to_send, set_output_cap};
use crate::catalog::ModelRef;
use crate::day::Day;
use crate::gateway::call::{Call, Labels};
use crate::gateway::error::ApiError;
use crate::gateway::Gateway;
use crate::meter::{self, Decision, Downgrade, PoolKey};
use crate::store::Admitted;
use crate::tokens::request::{count_request, Endpoint};

/// A call the meter let through, written as pending: what goes upstream.
pub(super) struct Admission {
    pub(super) call: Call,
    /// The body to send upstream.
    pub(super) body: Bytes,
    /// The client asked for a stream's usage chunk (it sees it only then).
    pub(super) client_wants_usage: bool,
    /// The pool and cap the free-token headers tell of.
    pub(super) pool: Option<PoolKey>,
    pub(super) cap: u64,
}

/// Decide the call, change its body to match, and record it.
pub(super) async fn admit(
    gateway: &Arc<Gateway>,
    endpoint: Endpoint,
    read: Read,
    bytes: Bytes,
    arrived: std::time::Instant,
) -> Result<Admission, ApiError> {
    let Read {
        mut value,
        mut caller,
        redacted,
        mut counted,
    } = read;
    let key_id = std::mem::take(&mut caller.key_id);
    let catalog = &caller.live.config.catalog;
    let model = catalog
        .lookup(&counted.model)
        .map_err(|e| ApiError::ModelNotFound(e.to_string()))?;
    let (org, project) = caller.org_project().ok_or(ApiError::Internal)?;

    let now_ms = gateway.clock.now_ms();
    let day = Day::from_unix(now_ms.div_euclid(1000));
    let running =
        catalog.program_starts <= day && catalog.program_ends.is_none_or(|ends| day <= ends);
    let eligible = org.eligible && project.shares && running;
    let pool_of = |m: &ModelRef<'_>| {
        m.group_index().filter(|_| eligible).map(|group| PoolKey {
            org: caller.org,
            group,
            day,
        })
    };
    // A batch's line that spends only free tokens sees the allowance less
    // the reserve kept for live calls, and never goes past it.
    let free_only = caller.batch.as_ref().filter(|t| t.free_only);
    let (policy, fallback) = match free_only {
        Some(_) => (crate::config::Policy::Block, crate::config::Fallback::Block),
        None => (project.on_exhausted, project.downgrade_fallback),
    };
    let cap_of = |m: &ModelRef<'_>| {
        let cap = m.group().map_or(0, |g| g.daily_tokens_for_tier(org.tier));
        match free_only {
            Some(t) => {
                cap / 100 * u64::from(100 - t.reserve_percent.min(100))
                    + cap % 100 * u64::from(100 - t.reserve_percent.min(100)) / 100
            }
            None => cap,
        }
    };
    // Only a project whose policy is downgrade needs the target's side.
    let target = model
        .model
        .downgrade
        .as_deref()
        .filter(|_| policy == crate::config::Policy::Downgrade)
        .and_then(|name| catalog.lookup(name).ok().map(|t| (name, t)));
    let downgrade = target.and_then(|(name, t)| {
        let prompt = if t.model.encoding == model.model.encoding {
            counted.prompt.tokens
        } else {
            let mut body = value.clone();
            body["model"] = json!(name);
            count_request(catalog, Some(endpoint), &body, None)
                .ok()?
                .prompt
                .tokens
        };
        Some(Downgrade {
            pool: pool_of(&t)?,
            cap: cap_of(&t),
            prompt,
            output_cap: counted.output_cap.min(t.model.max_output),
        })
    });
    let request = meter::Request {
        pool: pool_of(&model),
        cap: cap_of(&model),
        prompt: counted.prompt.tokens,
        output_cap: counted.output_cap,
        policy,
        fallback,
        downgrade,
    };
    let decision = gateway.store.reserve(&request).await.map_err(|e| {
        tracing::error!(error = %e, "the meter could not decide a call");
        ApiError::StoreUnavailable
    })?;

    let stream = value
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model_name: Arc<str> = std::mem::take(&mut counted.model).into();
    let mut admitted = Admitted {
        started_ms: now_ms,
        day,
        org: org.name.clone(),
        project: project.id.clone(),
        key_id,
        endpoint: endpoint.path(),
        requested_model: model_name.clone(),
        served_model: model_name,
        group: model.group().map(|g| g.name.clone()),
        decision: "free",
        reserved: 0,
        free_lane: false,
        streamed: stream,
        shared: org.shared(caller.project),
    };
    let mut modified = redacted;
    let (ticket, served, pool, cap) = match decision {
        Decision::Refused { pool, cap, left } => {
            let retry_after = gateway.seconds_to_reset();
            let group = catalog.groups.get(pool.group).map_or("?", |g| &*g.name);
            if let Err(e) = gateway.store.refuse(admitted, 429) {
                tracing::error!(error = %e, "could not record a refused call");
            }
            // A batch's line waiting for tomorrow's allowance is no refusal.
            if caller.batch.is_none() {
                gateway.check_alerts(&caller.live.config, caller.org, Some(pool.group), 0, true);
            }
            return Err(ApiError::FreeTokensExhausted {
                message: format!(
                    "Free tokens exhausted: this call needs up to {} tokens of the {group} group, and {left} of today's {cap} are left for org {}. The allowance resets at 00:00 UTC, in {retry_after} seconds.",
                    request.prompt.saturating_add(request.output_cap),
                    org.name
                ),
                retry_after,
                limit: cap,
                remaining: left,
            });
        }
        Decision::Free(ticket) => (ticket, model, request.pool, request.cap),
        Decision::Billed(ticket) => {
            admitted.decision = "billed";
            (ticket, model, request.pool, request.cap)
        }
        Decision::Clamped { ticket, output_cap } => {
            admitted.decision = "clamped";
            set_output_cap(endpoint, &mut value, output_cap);
            modified = true;
            (ticket, model, request.pool, request.cap)
        }
        Decision::Downgraded(ticket) => {
            let (name, t) = target.ok_or(ApiError::Internal)?;
            admitted.decision = "downgraded";
            admitted.served_model = name.into();
            if admitted.group.is_some() {
                if let Some(group) = t.group() {
                    admitted.group = Some(group.name.clone());
                }
            }
            value["model"] = json!(name);
            modified = true;
            (ticket, t, ticket.pool, ticket.cap)
        }
    };
    admitted.reserved = ticket.reserved;
    admitted.free_lane = ticket.reserved > 0;
    let release = || {
        gateway
            .store
            .settle_meter(&ticket, &meter::Usage::default());
    };

    let (body, client_wants_usage) =
        match body_to_send(endpoint, stream, &mut value, modified, bytes) {
            Ok(sent) => sent,
            Err(e) => {
                // Nothing was written yet: give the reservation back.
                release();
                return Err(e);
            }
        };
    let row = match gateway.store.admit(admitted) {
        Ok(row) => row,
        Err(e) => {
            tracing::error!(error = %e, "could not record an admitted call");
            release();
            return Err(ApiError::StoreUnavailable);
        }
    };
    let captures = org.captures(caller.project);
    let labels = Labels {
        org: caller.org,
        project: caller.project,
        model: served.model.name.clone(),
        group: served.group_index(),
        arrived,
        started_ms: now_ms,
    };
    let (prices, encoding) = (served.prices(), served.model.encoding);
    let mut call = Call::new(
        gateway.clone(),
        caller.live,
        labels,
        row,
        ticket,
        prices,
        counted.prompt.tokens,
        encoding,
    );
    if captures {
        call.capture(endpoint, body.clone());
    }
    Ok(Admission {
        call,
        body,
        client_wants_usage,
        pool,
        cap,
    })
}
