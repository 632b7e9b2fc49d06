//! `tollgate-bench`: the gateway with every feature on, measured side by side
//! with a direct connection to the upstream and with nginx as a plain
//! reverse proxy, in one run on one machine. `bench/run` builds it in release
//! mode and writes `docs/benchmarks.md`; `--smoke` runs every scenario for
//! about a second (the test suite does, so the harness cannot rot).
#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

mod console;
mod keys;
mod ledger;
mod load;
mod procs;
mod report;
mod scenarios;
mod soak;
mod stack;
mod stats;
mod streams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks the gateway against a direct connection and nginx")]
struct Args {
    /// Every scenario for about a second, at small sizes: proves the harness
    /// works, not the figures.
    #[arg(long)]
    smoke: bool,
    /// Where to write the Markdown report (default: print it).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Only these scenarios, by letter, e.g. `--only ad` (default: all).
    #[arg(long, default_value = "")]
    only: String,
    /// Request rates of scenario (a), e.g. `--rates 1000,2000`.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u32>,
    /// Runs per figure (the median is reported).
    #[arg(long)]
    repeats: Option<usize>,
    /// Postgres server the gateway's and the ledger's databases are created on.
    #[arg(
        long,
        global = true,
        env = "TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Redis server the Redis-shared gateway of scenario (g) uses.
    #[arg(long, env = "TEST_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    #[command(subcommand)]
    command: Option<Internal>,
}

#[derive(Subcommand)]
enum Internal {
    /// (internal) the fake upstream, as the process the benchmark starts.
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The soak: every feature on, at half the measured throughput with
    /// streams mixed in, for `--minutes`; its section replaces the one in
    /// `--out` (other sections are left as they are).
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Seconds of load before the memory reference is taken.
        #[arg(long, default_value_t = 60)]
        warmup_seconds: u64,
    },
}

const PINNED_ENV: &str = "TOLLGATE_BENCH_PINNED";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Internal::Upstream { listen }) = args.command {
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime
            .block_on(tollgate_fake_upstream::run_forever(listen, tollgate_fake_upstream::Scenario::default()));
    }
    // This process drives the streaming and memory scenarios: it belongs on
    // the load generator's CPU, so it runs itself again under taskset.
    // Once pinned, this process sees only its own CPU: the plan made before
    // comes through the environment.
    let pinned = std::env::var(PINNED_ENV).ok();
    let cpus = match pinned.as_deref().and_then(|v| v.split_once(',')) {
        Some((under_test, load)) => {
            procs::Cpus { under_test: Some(under_test.to_owned()), load: Some(load.to_owned()) }
        }
        None => procs::Cpus::detect(),
    };
    if let (Some(under_test), Some(cpu)) = (&cpus.under_test, &cpus.load)
        && pinned.is_none()
    {
        let status = Command::new("taskset")
            .arg("-c")
            .arg(cpu)
            .arg(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(PINNED_ENV, format!("{under_test},{cpu}"))
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    tollgate_gateway::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if let Some(Internal::Soak { minutes, warmup_seconds }) = args.command {
        let warmup = std::time::Duration::from_secs(warmup_seconds);
        let figures = runtime.block_on(soak::run(&cpus, &args.postgres, minutes, warmup))?;
        let section = soak::render(&figures);
        match &args.out {
            Some(path) => {
                let previous = std::fs::read_to_string(path).unwrap_or_default();
                std::fs::write(path, soak::merge(&previous, &previous, Some(&section)))?;
                println!("{section}\nsoak section written to {}", path.display());
            }
            None => println!("{section}"),
        }
        anyhow::ensure!(figures.passed(), "the soak missed a check");
        return Ok(());
    }
    let mut plan = if args.smoke { scenarios::Plan::smoke() } else { scenarios::Plan::full() };
    plan.only.clone_from(&args.only);
    if !args.rates.is_empty() {
        plan.rates.clone_from(&args.rates);
    }
    if let Some(repeats) = args.repeats {
        plan.repeats = repeats.max(1);
    }
    let services = scenarios::Services { postgres: args.postgres.clone(), redis: args.redis.clone() };
    let results = runtime.block_on(scenarios::run_all(&plan, &cpus, &services))?;
    let markdown = report::render(&plan, &cpus, &results);
    match &args.out {
        Some(path) => {
            // The soak runs on its own (half an hour); its section stays.
            let previous = std::fs::read_to_string(path).unwrap_or_default();
            std::fs::write(path, soak::merge(&markdown, &previous, None))?;
            println!("{}", report::summary(&results));
            println!("report written to {}", path.display());
        }
        None => println!("{markdown}"),
    }
    Ok(())
}
