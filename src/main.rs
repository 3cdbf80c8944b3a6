//! The meshdns command line: `serve` runs the proxy from a config file, `demo` runs it on the
//! embedded two-cluster demo, `explain` tells what meshdns would answer for a name and why,
//! `check` validates a config, `iptables` installs the pod's DNS capture.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hickory_proto::rr::{Name, RecordType};
use meshdns::app::{App, Sources};
use meshdns::config::{Config, Overrides};
use meshdns::explain::{self, Context};
use meshdns::metrics::Metrics;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// hickory-server logs every response at INFO; that is a per-query line, so it stays quiet
/// unless asked for by name in RUST_LOG.
const DEFAULT_LOG_FILTER: &str = "info";
/// One-shot commands print their result on stdout; their logs only matter when something is off.
const QUIET_LOG_FILTER: &str = "warn";
const QUIET_HICKORY: &str = "hickory_server=warn,hickory_net=warn";
/// What the runtime may still take after the drain, for tasks that do not stop at once (a
/// dump being read on a blocking thread); the process exits after it regardless.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(100);
/// Exit code of a bad config or bad input, as for `serve`.
const EXIT_INPUT: u8 = 2;
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(name = "meshdns", version, about = "Multicluster service DNS proxy for a pod")]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
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
    /// Print the answer meshdns would give for NAME and the rule and clusters behind it, from
    /// the same sources `serve` loads, without binding any port.
    Explain {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The name as a resolver sends it (taken as absolute).
        name: String,
        /// The query type.
        #[arg(default_value = "A")]
        qtype: String,
        /// `json` for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Upstream resolver ADDR[:PORT] (repeatable); replaces the config's `upstreams`.
        #[arg(long, value_name = "ADDR[:PORT]")]
        upstream: Vec<String>,
    },
    /// Validate a config file and the object dumps and kubeconfigs it names; exit 0, or print
    /// every problem and exit 2.
    Check {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Install the pod's DNS capture rules (the init container's job; needs CAP_NET_ADMIN).
    Iptables(meshdns::iptables::IptablesArgs),
}

#[derive(Args, Clone)]
struct OverrideArgs {
    /// Address to answer DNS on, UDP and TCP (repeatable); replaces the config's `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Upstream resolver ADDR[:PORT] (repeatable); replaces the config's `upstreams`.
    #[arg(long, value_name = "ADDR[:PORT]")]
    upstream: Vec<String>,
    /// Address of the admin server (metrics, probes, debug pages); "" disables it.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
}

impl From<OverrideArgs> for Overrides {
    fn from(args: OverrideArgs) -> Self {
        Self {
            listen: args.listen,
            upstreams: args.upstream,
            admin: args.admin,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Explain { .. } | Command::Check { .. });
    init_logging(
        cli.log_format,
        if quiet { QUIET_LOG_FILTER } else { DEFAULT_LOG_FILTER },
    );
    match cli.command {
        Command::Serve { config, overrides } => {
            let overrides = Overrides::from(overrides);
            info!(config = %config.display(), "reading config");
            match Config::load(&config, &overrides) {
                Ok(loaded) => serve(loaded, Some((config, overrides))),
                Err(e) => {
                    error!("{e}");
                    ExitCode::from(EXIT_INPUT)
                }
            }
        }
        Command::Demo { overrides } => match meshdns::demo::config(&overrides.into()) {
            Ok(config) => serve(config, None),
            Err(e) => {
                error!("{e}");
                ExitCode::from(EXIT_INPUT)
            }
        },
        Command::Explain {
            config,
            name,
            qtype,
            output,
            upstream,
        } => explain(&config, &name, &qtype, output, upstream),
        Command::Check { config } => check(&config),
        Command::Iptables(args) => iptables(&args),
    }
}

fn runtime(threads: usize) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            None
        }
    }
}

fn serve(config: Config, reload_from: Option<(PathBuf, Overrides)>) -> ExitCode {
    raise_open_file_limit();
    let Some(runtime) = runtime(config.worker_threads) else {
        return ExitCode::from(EXIT_RUNTIME);
    };
    let code = runtime.block_on(run(config, reload_from));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

/// Raises the soft limit on open files to the hard one: every forwarded query holds a socket
/// until its answer, every TCP client a connection, and the default soft limit of 1024 is
/// below what `limits.udpInFlight` plus `limits.tcpConnections` may need under load.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(error) => warn!(soft, hard, %error, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open-file limit"),
        Err(error) => warn!(%error, "cannot read the open-file limit"),
    }
}

fn iptables(args: &meshdns::iptables::IptablesArgs) -> ExitCode {
    match meshdns::iptables::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn run(config: Config, reload_from: Option<(PathBuf, Overrides)>) -> ExitCode {
    // Installed first: a SIGTERM during start-up must end meshdns cleanly, not kill it.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let start = App::start(&config);
    tokio::pin!(start);
    let mut app = loop {
        tokio::select! {
            started = &mut start => match started {
                Ok(app) => break app,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(e.exit_code());
                }
            },
            event = signals.next() => match event {
                Event::Stop(signal) => {
                    info!(signal, "stopping during start-up");
                    return ExitCode::SUCCESS;
                }
                Event::Reload => info!("SIGHUP during start-up; the config is read once start-up is done"),
            },
        }
    };
    let signal = loop {
        match signals.next().await {
            Event::Stop(signal) => break signal,
            Event::Reload => reload(&mut app, reload_from.as_ref()).await,
        }
    };
    info!(signal, "shutting down");
    app.shutdown().await;
    info!("meshdns stopped");
    ExitCode::SUCCESS
}

async fn reload(app: &mut App, from: Option<&(PathBuf, Overrides)>) {
    let Some((path, overrides)) = from else {
        warn!("SIGHUP: the demo has no config file to re-read");
        return;
    };
    info!(config = %path.display(), "SIGHUP: re-reading the config");
    let result = match Config::load(path, overrides) {
        Ok(config) => app.reload(&config).await.map_err(|e| e.to_string()),
        Err(e) => {
            app.metrics().config_reloaded(false);
            Err(e.to_string())
        }
    };
    if let Err(error) = result {
        error!(%error, "config not applied; the running config stays in force");
    }
}

enum Event {
    Stop(&'static str),
    Reload,
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop("SIGTERM"),
            _ = self.int.recv() => Event::Stop("SIGINT"),
            _ = self.hup.recv() => Event::Reload,
        }
    }
}

fn explain(path: &Path, name: &str, qtype: &str, output: Output, upstream: Vec<String>) -> ExitCode {
    let overrides = Overrides {
        upstreams: upstream,
        ..Overrides::default()
    };
    let config = match Config::load(path, &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_INPUT);
        }
    };
    let Ok(name) = Name::from_ascii(name) else {
        eprintln!("{name:?} is not a DNS name");
        return ExitCode::from(EXIT_INPUT);
    };
    let Ok(qtype) = RecordType::from_str(&qtype.to_ascii_uppercase()) else {
        eprintln!("{qtype:?} is not a DNS record type");
        return ExitCode::from(EXIT_INPUT);
    };
    let Some(runtime) = runtime(config.worker_threads) else {
        return ExitCode::from(EXIT_RUNTIME);
    };
    let result = runtime.block_on(async {
        let mut sources = Sources::open(&config, Arc::new(Metrics::new())).await?;
        sources.wait_loaded(config.startup_wait).await;
        let context = Context {
            upstreams: sources.resolution.upstreams.clone(),
            clusters: sources.hub.status(),
        };
        let explanation = explain::explain(&sources.hub.table().load(), &name, qtype, &context);
        sources.stop();
        Ok::<_, meshdns::app::AppError>(explanation)
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(explanation) => {
            match output {
                Output::Text => print!("{}", explain::render_text(&explanation)),
                Output::Json => match serde_json::to_string_pretty(&explanation) {
                    Ok(json) => println!("{json}"),
                    Err(e) => {
                        eprintln!("cannot encode the explanation: {e}");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let report = meshdns::check::check(path, &Overrides::default());
    for note in &report.notes {
        println!("{note}");
    }
    if report.problems.is_empty() {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    for problem in &report.problems {
        eprintln!("{problem}");
    }
    eprintln!("{}: {} problem(s)", path.display(), report.problems.len());
    ExitCode::from(EXIT_INPUT)
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if v.contains("hickory") => v,
        Ok(v) if !v.is_empty() => format!("{v},{QUIET_HICKORY}"),
        _ => format!("{default},{QUIET_HICKORY}"),
    };
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}
