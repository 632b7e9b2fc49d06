//! Black-box tests of the gateway: the real server over real HTTP, against
//! the fake upstream. One binary, so one link step for all of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod accounting;
mod admin;
mod alerts;
mod budgets;
mod console;
mod console_browser;
mod errors;
mod helpers;
mod keys;
mod lifecycle;
mod limits;
mod metrics;
mod native;
mod openapi;
mod outage;
mod passthrough;
mod policy;
mod replicas;
mod routing;
mod sdk;
mod security;
mod streaming;
mod traces;
mod upstream_failures;
