//! `tollgate`: run the gateway and administer it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_gateway::{Application, Config, shutdown, telemetry};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "An OpenAI-compatible gateway with keys, limits, budgets and accounting")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gateway until SIGTERM or SIGINT.
    Serve {
        /// TOML configuration file; every value can also be set with
        /// `TOLLGATE_<SECTION>__<KEY>` environment variables.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load and validate the configuration, print it (without secrets), and exit.
    CheckConfig {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    telemetry::init(&config.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let app = Application::build(config).await?;
        app.run_until_stopped(shutdown::signal()).await
    })
}

fn check_config(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    // The config holds no secret values, only where to find them.
    let text = serde_json::to_string_pretty(&config)?;
    eprintln!("configuration is valid:\n{text}");
    Ok(())
}
