//! tokenwarden's integration tests: one binary, one module per area.

mod admin;
mod alerts;
mod batch;
mod batch_cli;
mod capture;
mod catalog;
mod cli;
mod crash;
mod dashboard;
mod doors;
mod gateway;
mod guard;
mod harness;
mod hostile;
mod https;
mod isolation;
mod metrics;
mod peer;
mod pg;
mod properties;
mod reconcile;
mod reference;
mod reload;
mod requests;
mod sdk;
mod stored;
mod tenants;
mod upstream;
mod usage;

use tokenwarden::catalog::Catalog;

/// The built-in catalog; a test that cannot load it fails loudly.
pub fn catalog() -> Catalog {
    match Catalog::builtin() {
        Ok(catalog) => catalog,
        Err(e) => panic!("the built-in catalog does not load: {e}"),
    }
}
