//! One module per `kiln` subcommand.

pub mod bench;
pub mod bench_pipeline;
pub mod control;
pub mod embedding;
pub mod fetch;
pub mod inspect;
pub mod list;
pub mod lora;
pub mod model;
pub mod preprocess;
pub mod prompt;
pub mod pull;
pub mod queue;
pub mod render;
pub mod submit;
pub mod token;
pub mod usage;
pub mod verify;
pub mod watch;
