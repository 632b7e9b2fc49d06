//! Black-box tests of the connection layer: slow and silent clients, bodies
//! over the limit, what every client gets back. Their own binary because they
//! measure the process's memory and hold hundreds of sockets: the tests here
//! take `HEAVY` so nothing else in this process runs beside them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod discard;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod raw;
mod sdk;
mod slow_clients;

/// Held by every test in this binary: the memory test needs a quiet process,
/// and the slow-client tests need the file descriptors.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
