//! tokenwarden: an OpenAI-compatible gateway that runs the "free daily
//! tokens for shared traffic" program.
//!
//! A request walks one road, and the modules follow it:
//!
//! 1. authenticate the key: key -> project -> org ([`gateway::auth`]); only
//!    a path's plain spelling is routed, and a `/v1` path the gateway does
//!    not meter goes upstream only where the project's `forward` rules
//!    allow it ([`gateway::path`]);
//! 2. read the body: model, messages, output cap ([`tokens::request`]); for a
//!    sharing project, the privacy [`guard`] blocks, reroutes or redacts
//!    secrets and personal data (a large body on the blocking pool, so it
//!    never holds an async worker);
//! 3. look the model up in the [`catalog`]: group, encoding, prices;
//! 4. count its prompt ([`tokens`]): exact text counts in OpenAI's
//!    encodings, the chat formula, tools, images ([`tokens::image`]);
//! 5. admit it: the [`meter`] decides (free, billed, refused, downgraded or
//!    clamped) behind the [`store::Store`] interface, which writes the call
//!    as pending ([`gateway::routes`]'s `admit`);
//! 6. forward it upstream ([`gateway::upstream`]), tap the usage out of the
//!    response or stream ([`gateway::stream`]);
//! 7. settle with the meter and the store on every path ([`gateway::call`]),
//!    the answer's end held until its record is durable;
//!    the settlement feeds the metrics ([`gateway::metrics`]) and the
//!    [`alerts`], and each ledger commit wakes the live dashboard
//!    ([`gateway::dashboard`]).
//!
//! [`config`] turns the TOML file into the orgs, projects, keys, upstreams
//! and program settings all of this reads, and [`changes`] applies on top
//! of it what organizations changed at runtime (the admin API,
//! [`gateway::admin`]); each call runs on the configuration of its arrival
//! (`gateway::Live`). Batches ([`gateway::batches`]) send their lines down
//! the same road, paced into the free allowance, from the Batch API or
//! `tokenwarden batch` ([`cli::batch`]). [`simulator`] is the
//! OpenAI-compatible upstream for demos, load tests and CI (function calls,
//! structured outputs, stored responses, the Usage and Costs APIs); [`cli`]
//! starts them. [`reconcile`] holds the ledger against the upstream's own
//! books. [`capture`] keeps shared traffic for export. The [`store`] is
//! SQLite for one gateway, or PostgreSQL for replicas that share one ledger
//! and one allowance (each leasing free tokens in chunks, docs/scaling.md).

/// A hash map for the paths every call takes: foldhash instead of std's
/// SipHash (its keys are the config's and the catalog's names, key hashes
/// and ids; a client's input is only looked up, never inserted).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set as [`FastMap`].
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// At most `max` bytes of client input for an error message (cut at a
/// character boundary, with an ellipsis when cut).
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

pub mod alerts;
pub mod capture;
pub mod catalog;
pub mod changes;
pub mod cli;
pub mod config;
pub mod day;
pub mod finetune;
pub mod gateway;
pub mod guard;
pub mod meter;
pub mod reconcile;
pub mod simulator;
pub mod store;
pub mod tokens;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_cut_at_a_character() {
        assert_eq!(excerpt("gpt-4o", 10), "gpt-4o");
        assert_eq!(excerpt("ééééé", 3), "é...");
        assert_eq!(excerpt(&"x".repeat(10_000), 64).len(), 67);
    }
}
