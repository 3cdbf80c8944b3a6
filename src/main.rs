//! The meshdns command line: `serve` runs the proxy from a config file, `demo` runs it on the
//! embedded two-cluster demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use meshdns::app::App;
use meshdns::config::{Config, Overrides};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// hickory-server logs every response at INFO; that is a per-query line, so it stays quiet
/// unless asked for by name in RUST_LOG.
const DEFAULT_LOG_FILTER: &str = "info";
const QUIET_HICKORY: &str = "hickory_server=warn,hickory_net=warn";

#[derive(Parser)]
#[command(name = "meshdns", version, about = "Multicluster service DNS proxy for a pod")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the DNS proxy from a config file.
    Serve {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Run the DNS proxy on the embedded two-cluster demo (no cluster needed).
    Demo {
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Install the pod's DNS capture rules (the init container's job; needs CAP_NET_ADMIN).
    Iptables(meshdns::iptables::IptablesArgs),
}

#[derive(Args)]
struct OverrideArgs {
    /// Address to answer DNS on, UDP and TCP (repeatable); replaces the config's `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Upstream resolver ADDR[:PORT] (repeatable); replaces the config's `upstreams`.
    #[arg(long, value_name = "ADDR[:PORT]")]
    upstream: Vec<String>,
}

impl From<OverrideArgs> for Overrides {
    fn from(args: OverrideArgs) -> Self {
        Self {
            listen: args.listen,
            upstreams: args.upstream,
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let config = match cli.command {
        Command::Serve { config, overrides } => Config::load(&config, &overrides.into()),
        Command::Demo { overrides } => meshdns::demo::config(&overrides.into()),
        Command::Iptables(args) => return iptables(&args),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(config))
}

fn iptables(args: &meshdns::iptables::IptablesArgs) -> ExitCode {
    match meshdns::iptables::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> ExitCode {
    let app = match App::start(&config).await {
        Ok(app) => app,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let signal = shutdown_signal().await;
    info!(signal, "shutting down");
    app.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

fn init_logging() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if v.contains("hickory") => v,
        Ok(v) if !v.is_empty() => format!("{v},{QUIET_HICKORY}"),
        _ => format!("{DEFAULT_LOG_FILTER},{QUIET_HICKORY}"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
