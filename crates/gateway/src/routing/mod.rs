//! Routing across upstreams: the pieces that decide where one attempt goes
//! and when to try again. Each is pure and takes time as an argument.
//!
//! - [`choice`]: one target of a weighted group, at random or sticky;
//! - [`breaker`]: a circuit breaker per target (error rate over a window,
//!   cooldown, probes, gradual return);
//! - [`backoff`]: exponential full-jitter waits that honour `retry-after`.

pub mod backoff;
pub mod breaker;
pub mod choice;
