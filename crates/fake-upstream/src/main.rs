//! `fake-upstream`: the fake OpenAI-compatible upstream as a process, for
//! benchmarks and manual runs.

use std::net::SocketAddr;

use clap::Parser;
use tollgate_fake_upstream::{Scenario, run_forever};

#[derive(Parser)]
#[command(about = "A fake OpenAI-compatible upstream")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Delay before response headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Content chunks per streamed choice.
    #[arg(long, default_value_t = 3)]
    chunks: usize,
    /// Delay between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let defaults = Scenario {
        latency: tollgate_fake_upstream::millis(args.latency_ms),
        chunks: args.chunks,
        chunk_interval: tollgate_fake_upstream::millis(args.chunk_interval_ms),
        ..Scenario::default()
    };
    run_forever(args.listen, defaults).await
}
