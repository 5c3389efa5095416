//! One module per `kiln` subcommand.

pub mod bench;
pub mod control;
pub mod fetch;
pub mod list;
pub mod model;
pub mod render;
pub mod submit;
pub mod watch;
