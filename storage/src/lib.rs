//! Object storage for kiln: bucket URLs turned into clients ([`bucket`]), and
//! model folders pushed to a bucket and fetched from it into a local cache
//! ([`models`]). The coordinator (results), the worker (models) and the CLI
//! (`kiln model push`) share it; it never reaches tonic, redis or candle.
#![warn(missing_docs)]

pub mod bucket;
pub mod models;
