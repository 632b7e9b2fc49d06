//! Routing across upstreams: the pieces that decide where one attempt goes
//! and when to try again. Each is pure and takes time as an argument.
//!
//! - [`choice`]: one target of a weighted group, at random or sticky;
//! - [`breaker`]: a circuit breaker per target (error rate over a window,
//!   cooldown, probes, gradual return);
//! - [`backoff`]: exponential full-jitter waits that honour `retry-after`;
//! - [`config`]: `[[routes]]` as written, and their validation;
//! - [`table`]: the routes in force, their targets and breakers;
//! - [`reload`]: the table swapped without a restart when its file changes.
//!
//! The forward stage (`proxy::forward`) puts them together.

pub mod backoff;
pub mod breaker;
pub mod choice;
pub mod config;
pub mod reload;
pub mod table;
