//! tokenwarden: an OpenAI-compatible gateway that runs the "free daily
//! tokens for shared traffic" program.
//!
//! A request walks one road, and the modules follow it:
//!
//! 1. authenticate the key (key -> project -> org);
//! 2. read the body: model, messages, output cap ([`tokens::request`]);
//! 3. look the model up in the [`catalog`]: group, encoding, prices;
//! 4. estimate its tokens ([`tokens`]): exact text counts in OpenAI's
//!    encodings, the chat formula, tools, images ([`tokens::image`]);
//! 5. ask the meter: free, billed, refused, downgraded or clamped;
//! 6. forward upstream, tap the usage out of the response or stream;
//! 7. settle with the meter; the store, alerts, metrics and dashboard hear of it.
//!
//! Steps 1 and 5-7 arrive with the gateway; today the crate holds the
//! counting and the catalog, which every later step stands on, and the
//! `tokenwarden count` command that exposes them.

pub mod catalog;
pub mod cli;
pub mod config;
pub mod day;
pub mod gateway;
pub mod meter;
pub mod simulator;
pub mod store;
pub mod tokens;
