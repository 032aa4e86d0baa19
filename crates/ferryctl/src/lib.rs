//! ferryctl: the operator CLI for ferry agents, virsh-like.
//!
//! The binary is a thin `main` over this library: [`cli`] is the command-line syntax,
//! [`app::run`] executes a command against an agent, [`report`] and [`json`] format the
//! responses, [`spec`] turns TOML VM specs into gRPC ones, and [`connect`] opens the
//! mutual-TLS channel.

#![warn(missing_docs)]
// `json!` of a migration's full status nests deeper than serde_json's default allows.
#![recursion_limit = "256"]

pub mod app;
pub mod bench;
pub mod cli;
pub mod connect;
pub mod hosts;
pub mod json;
pub mod report;
pub mod spec;
pub mod ui;
