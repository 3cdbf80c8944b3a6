//! The meshdns configuration file: its YAML schema (camelCase keys, like Kubernetes objects),
//! the defaults, and the validation that turns a file into a [`Config`] the rest of the
//! program can trust. Reading the file ([`Config::load`]) is kept apart from building and
//! checking it ([`Config::from_parts`]), so tests and the embedded demo need no files.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::cache::{CacheSettings, MAX_SERVFAIL_TTL};
use crate::cluster::{DEFAULT_GATEWAY_SELECTOR, Ingress, LabelSelector, is_dns_label};
use crate::resolv::DNS_PORT;
use crate::server::{DEFAULT_MAX_TCP_CONNECTIONS, DEFAULT_MAX_TCP_PIPELINE, DEFAULT_MAX_UDP_IN_FLIGHT};
use crate::upstream::{DEFAULT_DEADLINE, DEFAULT_TRY_TIMEOUT};
use crate::wire::{MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, UdpPayload};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:15053";
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// CoreDNS's kubernetes plugin answers with TTL 5; meshdns's table follows watches just as
/// closely, but remote answers change rarely, so a longer default saves client round trips.
pub const DEFAULT_TTL: u32 = 30;
/// Negative-caching TTL (SOA minimum): short, so a Service created a moment after a failed
/// lookup resolves soon.
pub const DEFAULT_NEGATIVE_TTL: u32 = 5;
/// A sidecar must not start one thread per node CPU.
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// Idle TCP clients are dropped after this long, so they cannot pin connections forever.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A cluster whose API server cannot be reached must not hold the others back for long.
pub const DEFAULT_STARTUP_WAIT: Duration = Duration::from_secs(10);
/// Where the admin server (metrics, probes, debug pages) listens unless configured otherwise:
/// loopback, since its debug pages show every service name the pod can reach.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15054";
/// After SIGTERM, how long answers to queries already received may take before meshdns exits;
/// well inside Kubernetes' default 30 s grace period.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for configured TTLs: one day, as most resolvers cap anyway.
pub const MAX_TTL: u32 = 86_400;
/// [`MAX_TTL`] as a duration, the bound of the cache's TTL caps.
const MAX_TTL_DURATION: Duration = Duration::from_secs(MAX_TTL as u64);

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", join_problems(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl ConfigError {
    /// Each problem on its own, prefixed with the file: what `meshdns check` prints.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Invalid { path, problems } => problems.iter().map(|p| format!("{}: {p}", path.display())).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// One invalid field of a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where in the file, as `clusters[1].objects`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn join_problems(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Problems found while validating, in file order.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn into_vec(self) -> Vec<Problem> {
        self.0
    }
}

/// The file as written; every field optional so defaults live in one place.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    pub listen: Option<Vec<String>>,
    pub upstreams: Option<Vec<String>>,
    pub resolv_conf: Option<PathBuf>,
    pub search: Option<Vec<String>>,
    pub cluster_domain: Option<String>,
    pub ttl: Option<u32>,
    pub negative_ttl: Option<u32>,
    pub upstream_timeout: Option<String>,
    pub upstream_deadline: Option<String>,
    pub tcp_idle_timeout: Option<String>,
    pub max_udp_payload: Option<u16>,
    pub worker_threads: Option<usize>,
    pub remote_secrets_dir: Option<PathBuf>,
    pub startup_wait: Option<String>,
    pub admin: Option<String>,
    pub drain_timeout: Option<String>,
    pub cache: Option<FileCache>,
    pub limits: Option<FileLimits>,
    #[serde(default)]
    pub clusters: Vec<FileCluster>,
}

/// The `cache:` block: the upstream response cache.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileCache {
    pub max_entries: Option<usize>,
    pub max_ttl: Option<String>,
    pub negative_max_ttl: Option<String>,
    pub servfail_ttl: Option<String>,
}

/// The `limits:` block: what one client (or all of them) can make the sidecar hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileLimits {
    pub udp_in_flight: Option<usize>,
    pub tcp_connections: Option<usize>,
    pub tcp_pipeline: Option<usize>,
}

/// Resource caps of the DNS listeners (see [`crate::server::ServerSettings`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub udp_in_flight: usize,
    pub tcp_connections: usize,
    pub tcp_pipeline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            udp_in_flight: DEFAULT_MAX_UDP_IN_FLIGHT,
            tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            tcp_pipeline: DEFAULT_MAX_TCP_PIPELINE,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileCluster {
    pub name: String,
    #[serde(default)]
    pub local: bool,
    pub objects: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub east_west_gateway: Option<FileGateway>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileGateway {
    pub selector: Option<String>,
    pub addresses: Option<Vec<String>>,
}

/// Where a cluster's state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterSource {
    /// A `kubectl get services,endpointslices -A -o yaml|json` dump, reloaded when it changes.
    Objects(PathBuf),
    /// A dump compiled into the binary (the demo).
    Embedded(&'static str),
    /// A live API server reached through a kubeconfig file the operator provides (trusted).
    Kubeconfig(PathBuf),
    /// The live API server of the pod's own cluster, through its service account.
    InCluster,
}

impl std::fmt::Display for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Objects(path) => write!(f, "objects {}", path.display()),
            Self::Embedded(_) => f.write_str("embedded demo dump"),
            Self::Kubeconfig(path) => write!(f, "kubeconfig {}", path.display()),
            Self::InCluster => f.write_str("in-cluster service account"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    pub selector: LabelSelector,
    /// Static addresses that replace whatever the gateway Service reports.
    pub addresses: Option<Vec<Ingress>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    pub local: bool,
    pub source: ClusterSource,
    pub gateway: GatewayConfig,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, for messages; `None` for the embedded demo.
    pub path: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    /// The admin server's address; `None`: no admin server.
    pub admin: Option<SocketAddr>,
    /// `None`: take the nameservers of `resolv_conf`.
    pub upstreams: Option<Vec<SocketAddr>>,
    pub resolv_conf: PathBuf,
    /// Search domains replacing resolv.conf's, lowercase without trailing dots; `None`: use
    /// resolv.conf's, as a pod normally should.
    pub search: Option<Vec<String>>,
    /// Lowercase, without the trailing dot.
    pub cluster_domain: String,
    pub ttl: u32,
    pub negative_ttl: u32,
    pub upstream_timeout: Duration,
    pub upstream_deadline: Duration,
    pub tcp_idle_timeout: Duration,
    /// The largest UDP reply meshdns sends and the payload size it advertises
    /// (`maxUdpPayload`, 512 to 4096, default 1232).
    pub max_udp_payload: UdpPayload,
    pub worker_threads: usize,
    /// Directory of Istio remote-secret kubeconfigs, one remote cluster per entry.
    pub remote_secrets_dir: Option<PathBuf>,
    /// How long start-up waits for every cluster's first state before serving what it has.
    pub startup_wait: Duration,
    /// After SIGTERM or SIGINT, how long queries already received may take to be answered.
    pub drain_timeout: Duration,
    /// The upstream response cache.
    pub cache: CacheSettings,
    pub limits: Limits,
    pub clusters: Vec<ClusterConfig>,
}

/// Command-line values that take precedence over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub upstreams: Vec<String>,
    /// `Some("")` disables the admin server.
    pub admin: Option<String>,
}

impl Config {
    /// Reads and validates a config file; relative paths in it are relative to the file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = parse_file(path, &text)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_parts(Some(path), base, file, overrides)
    }

    /// Validates an already parsed file. `base` resolves relative paths; nothing is read.
    pub fn from_parts(
        path: Option<&Path>,
        base: &Path,
        file: FileConfig,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let shown = path.map_or_else(|| PathBuf::from("<config>"), Path::to_path_buf);
        // Every problem is collected, so one run of `meshdns check` lists them all; each check
        // that fails goes on with a stand-in value.
        let mut problems = Problems::default();

        let listen_src = if overrides.listen.is_empty() {
            file.listen.unwrap_or_else(|| vec![DEFAULT_LISTEN.to_string()])
        } else {
            overrides.listen.clone()
        };
        let listen: Vec<SocketAddr> = listen_src
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let parsed = s.parse::<SocketAddr>().ok();
                if parsed.is_none() {
                    problems.push(format!("listen[{i}]"), format!("{s:?} is not an IP:port address"));
                }
                parsed
            })
            .collect();
        if listen_src.is_empty() {
            problems.push("listen", "at least one address is needed");
        }

        let admin_src = overrides
            .admin
            .clone()
            .or(file.admin)
            .unwrap_or_else(|| DEFAULT_ADMIN.to_string());
        let admin = if admin_src.trim().is_empty() {
            None
        } else {
            let parsed = admin_src.trim().parse::<SocketAddr>().ok();
            if parsed.is_none() {
                problems.push(
                    "admin",
                    format!("{admin_src:?} is not an IP:port address (an empty string disables the admin server)"),
                );
            }
            parsed
        };

        let upstream_src = if overrides.upstreams.is_empty() {
            file.upstreams
        } else {
            Some(overrides.upstreams.clone())
        };
        let upstreams = upstream_src.map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let parsed = parse_upstream(s);
                    if parsed.is_none() {
                        problems.push(
                            format!("upstreams[{i}]"),
                            format!("{s:?} is not an IP address with an optional port"),
                        );
                    }
                    parsed
                })
                .collect::<Vec<_>>()
        });
        if let Some(up) = upstreams.iter().flatten().find(|u| listen.contains(u)) {
            problems.push(
                "upstreams",
                format!("{up} is also a listen address: meshdns would forward to itself"),
            );
        }
        // Port 0 picks a free port for each, so those never collide.
        if let Some(addr) = admin.filter(|a| a.port() != 0 && listen.contains(a)) {
            problems.push("admin", format!("{addr} is also a DNS listen address"));
        }

        let cluster_domain = file
            .cluster_domain
            .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.to_string())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let cluster_domain = if cluster_domain.is_empty()
            || hickory_proto::rr::Name::from_ascii(&cluster_domain).is_err()
            || cluster_domain.split('.').any(str::is_empty)
        {
            problems.push("clusterDomain", format!("{cluster_domain:?} is not a domain name"));
            DEFAULT_CLUSTER_DOMAIN.to_string()
        } else {
            cluster_domain
        };

        let search = file.search.map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, d)| {
                    let d = d.trim_end_matches('.').to_ascii_lowercase();
                    let valid = !d.is_empty() && d.split('.').all(is_dns_label_loose);
                    if !valid {
                        problems.push(format!("search[{i}]"), format!("{d:?} is not a domain name"));
                    }
                    valid.then_some(d)
                })
                .collect::<Vec<_>>()
        });

        let ttl = file.ttl.unwrap_or(DEFAULT_TTL);
        if ttl > MAX_TTL {
            problems.push("ttl", format!("{ttl} is above the maximum {MAX_TTL}"));
        }
        let negative_ttl = file.negative_ttl.unwrap_or(DEFAULT_NEGATIVE_TTL);
        if negative_ttl > MAX_TTL {
            problems.push("negativeTtl", format!("{negative_ttl} is above the maximum {MAX_TTL}"));
        }
        // Every duration has a sane range: an absurd value (`18446744073709551615s`) would pass
        // parsing and then overflow the first timer built from it.
        let mut duration = |field: &str, value: Option<String>, default: Duration, range: DurationRange| match value {
            None => default,
            Some(s) => match parse_duration(&s) {
                Some(d) if range.contains(d) => d,
                Some(_) => {
                    problems.push(field, format!("{s:?} is outside {range}"));
                    default
                }
                None => {
                    problems.push(field, format!("{s:?} is not a duration like 2s, 500ms or 1m"));
                    default
                }
            },
        };
        let upstream_timeout = duration(
            "upstreamTimeout",
            file.upstream_timeout,
            DEFAULT_TRY_TIMEOUT,
            UPSTREAM_TIMES,
        );
        let upstream_deadline = duration(
            "upstreamDeadline",
            file.upstream_deadline,
            DEFAULT_DEADLINE,
            UPSTREAM_TIMES,
        );
        let tcp_idle_timeout = duration(
            "tcpIdleTimeout",
            file.tcp_idle_timeout,
            DEFAULT_TCP_IDLE_TIMEOUT,
            TCP_IDLE_TIMES,
        );
        let startup_wait = duration("startupWait", file.startup_wait, DEFAULT_STARTUP_WAIT, WAIT_TIMES);
        let drain_timeout = duration("drainTimeout", file.drain_timeout, DEFAULT_DRAIN_TIMEOUT, WAIT_TIMES);
        let max_udp_payload = match file.max_udp_payload {
            None => UdpPayload::default(),
            Some(size) => UdpPayload::new(size).unwrap_or_else(|| {
                problems.push(
                    "maxUdpPayload",
                    format!("{size} is outside {MIN_UDP_PAYLOAD}..={MAX_UDP_PAYLOAD} (bytes of a UDP reply)"),
                );
                UdpPayload::default()
            }),
        };
        let worker_threads = file.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS);
        if worker_threads == 0 {
            problems.push("workerThreads", "must be at least 1");
        }
        let cache = cache_settings(file.cache.unwrap_or_default(), &mut problems);
        let limits = limits(file.limits.unwrap_or_default(), &mut problems);

        let mut clusters = Vec::with_capacity(file.clusters.len());
        let mut names = HashSet::new();
        // Counted from the file, so a cluster left out for another problem still counts.
        let locals = file.clusters.iter().filter(|c| c.local).count();
        for (i, c) in file.clusters.into_iter().enumerate() {
            let field = |f: &str| format!("clusters[{i}].{f}");
            if !is_dns_label(&c.name) {
                problems.push(
                    field("name"),
                    format!("{:?} is not a DNS label (lowercase letters, digits, '-')", c.name),
                );
            }
            if !names.insert(c.name.clone()) {
                problems.push(field("name"), format!("cluster {:?} is listed twice", c.name));
            }
            let source = match (c.objects, c.kubeconfig) {
                (Some(_), Some(_)) => {
                    problems.push(
                        field("kubeconfig"),
                        "a cluster takes either `objects` (a dump) or `kubeconfig` (live), not both",
                    );
                    None
                }
                (Some(p), None) => Some(ClusterSource::Objects(base.join(p))),
                (None, Some(p)) => Some(ClusterSource::Kubeconfig(base.join(p))),
                (None, None) if c.local => Some(ClusterSource::InCluster),
                (None, None) => {
                    problems.push(
                        field("kubeconfig"),
                        "a remote cluster needs `kubeconfig` (live) or `objects` (a dump); \
                         remote clusters from Istio remote secrets go in `remoteSecretsDir`",
                    );
                    None
                }
            };
            let gw = c.east_west_gateway.unwrap_or_default();
            let selector_src = gw.selector.unwrap_or_else(|| DEFAULT_GATEWAY_SELECTOR.to_string());
            let selector = match LabelSelector::parse(&selector_src) {
                Ok(selector) => Some(selector),
                Err(e) => {
                    problems.push(field("eastWestGateway.selector"), e.to_string());
                    None
                }
            };
            let addresses = gw.addresses.map(|list| {
                list.iter()
                    .enumerate()
                    .filter_map(|(j, a)| {
                        let parsed = parse_ingress(a);
                        if parsed.is_none() {
                            problems.push(
                                field(&format!("eastWestGateway.addresses[{j}]")),
                                format!("{a:?} is neither an IP address nor a host name"),
                            );
                        }
                        parsed
                    })
                    .collect::<Vec<_>>()
            });
            if let (Some(source), Some(selector)) = (source, selector) {
                clusters.push(ClusterConfig {
                    name: c.name,
                    local: c.local,
                    source,
                    gateway: GatewayConfig { selector, addresses },
                });
            }
        }
        match locals {
            1 => {}
            0 => problems.push("clusters", "exactly one cluster must have `local: true`; none has"),
            n => problems.push(
                "clusters",
                format!("exactly one cluster must have `local: true`; {n} have"),
            ),
        }

        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: shown,
                problems: problems.into_vec(),
            });
        }
        Ok(Self {
            path: path.map(Path::to_path_buf),
            listen,
            admin,
            upstreams,
            resolv_conf: base.join(file.resolv_conf.unwrap_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF))),
            search,
            cluster_domain,
            ttl,
            negative_ttl,
            upstream_timeout,
            upstream_deadline,
            tcp_idle_timeout,
            max_udp_payload,
            worker_threads,
            remote_secrets_dir: file.remote_secrets_dir.map(|d| base.join(d)),
            startup_wait,
            drain_timeout,
            cache,
            limits,
            clusters,
        })
    }

    /// The name of the local cluster (validation guarantees there is exactly one).
    pub fn local_cluster(&self) -> &str {
        self.clusters.iter().find(|c| c.local).map_or("", |c| c.name.as_str())
    }
}

/// The `limits:` block; each cap must be at least 1 (0 would refuse every client).
fn limits(file: FileLimits, problems: &mut Problems) -> Limits {
    let defaults = Limits::default();
    let mut cap = |key: &str, value: Option<usize>, default: usize| match value {
        Some(0) => {
            problems.push(key, "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    };
    Limits {
        udp_in_flight: cap("limits.udpInFlight", file.udp_in_flight, defaults.udp_in_flight),
        tcp_connections: cap("limits.tcpConnections", file.tcp_connections, defaults.tcp_connections),
        tcp_pipeline: cap("limits.tcpPipeline", file.tcp_pipeline, defaults.tcp_pipeline),
    }
}

/// Validates the `cache:` block; a bad field is reported and its default stands in.
fn cache_settings(file: FileCache, problems: &mut Problems) -> CacheSettings {
    let defaults = CacheSettings::default();
    let max_ttl = MAX_TTL_DURATION;
    // TTLs are whole seconds on the wire, so their caps are too.
    let mut ttl_cap = |field: &str, value: Option<String>, default: Duration| match value {
        None => default,
        Some(s) => match parse_duration(&s) {
            Some(d) if d.subsec_nanos() == 0 && d >= Duration::from_secs(1) && d <= max_ttl => d,
            _ => {
                problems.push(
                    field,
                    format!(
                        "{s:?} is not whole seconds between 1s and {}s, like 300s or 5m",
                        max_ttl.as_secs()
                    ),
                );
                default
            }
        },
    };
    let max_ttl = ttl_cap("cache.maxTtl", file.max_ttl, defaults.max_ttl);
    let negative_max_ttl = ttl_cap("cache.negativeMaxTtl", file.negative_max_ttl, defaults.negative_max_ttl);
    let servfail_ttl = match file.servfail_ttl {
        None => defaults.servfail_ttl,
        Some(s) => match parse_duration(&s).filter(|d| *d <= MAX_SERVFAIL_TTL) {
            Some(d) => d,
            None => {
                problems.push(
                    "cache.servfailTtl",
                    format!(
                        "{s:?} is not a duration of at most {}s, like 2s or 0s (0s: SERVFAIL is not cached)",
                        MAX_SERVFAIL_TTL.as_secs()
                    ),
                );
                defaults.servfail_ttl
            }
        },
    };
    CacheSettings {
        max_entries: file.max_entries.unwrap_or(defaults.max_entries),
        max_ttl,
        negative_max_ttl,
        servfail_ttl,
    }
}

/// Parses config YAML; serde's messages name the offending key and its line.
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `ADDR`, `ADDR:PORT`, `[V6]:PORT` or a bare IPv6 address; port 53 when none is given.
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Some(addr);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
}

/// `500ms`, `2s`, `1m`.
/// The accepted values of a duration setting, both ends included.
#[derive(Clone, Copy, Debug)]
struct DurationRange {
    min: Duration,
    max: Duration,
}

impl DurationRange {
    fn contains(self, d: Duration) -> bool {
        self.min <= d && d <= self.max
    }
}

impl std::fmt::Display for DurationRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |d: Duration| match d.as_millis() {
            ms if ms % 60_000 == 0 && ms > 0 => format!("{}m", ms / 60_000),
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        write!(f, "the range {} to {}", show(self.min), show(self.max))
    }
}

/// Upstream attempts and deadlines: at least 10 ms (loopback upstreams answer in well under
/// that), at most a minute (stub resolvers gave up long before).
const UPSTREAM_TIMES: DurationRange = DurationRange {
    min: Duration::from_millis(10),
    max: Duration::from_secs(60),
};
/// TCP idle: long enough for one round trip, at most an hour of a held connection.
const TCP_IDLE_TIMES: DurationRange = DurationRange {
    min: Duration::from_millis(100),
    max: Duration::from_secs(3600),
};
/// Start-up wait and drain: 0 (do not wait) to ten minutes (beyond any pod's grace period).
const WAIT_TIMES: DurationRange = DurationRange {
    min: Duration::ZERO,
    max: Duration::from_secs(600),
};

pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

fn parse_ingress(s: &str) -> Option<Ingress> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(Ingress::Ip(ip));
    }
    let host = s.trim_end_matches('.').to_ascii_lowercase();
    let valid = !host.is_empty() && host.split('.').all(is_dns_label_loose);
    valid.then_some(Ingress::Hostname(host))
}

fn is_dns_label_loose(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str) -> Result<Config, ConfigError> {
        let path = Path::new("/etc/meshdns/config.yaml");
        let file = parse_file(path, yaml)?;
        Config::from_parts(Some(path), Path::new("/etc/meshdns"), file, &Overrides::default())
    }

    const GOOD: &str = "\
listen: [\"127.0.0.1:15053\", \"[::1]:15053\"]
upstreams: [\"127.0.0.1:5300\", \"10.96.0.10\"]
clusterDomain: Cluster.Local.
ttl: 30
clusters:
  - name: cluster-1
    local: true
    objects: dumps/cluster-1.yaml
  - name: cluster-2
    objects: /abs/cluster-2.yaml
    eastWestGateway:
      selector: istio=eastwestgateway
      addresses: [203.0.113.7, gw.example.com.]
";

    #[test]
    fn full_file() {
        let cfg = build(GOOD).expect("valid");
        assert_eq!(cfg.listen.len(), 2);
        assert_eq!(
            cfg.upstreams,
            Some(vec![
                "127.0.0.1:5300".parse().unwrap(),
                "10.96.0.10:53".parse().unwrap()
            ])
        );
        assert_eq!(cfg.cluster_domain, "cluster.local");
        assert_eq!(cfg.local_cluster(), "cluster-1");
        assert_eq!(
            cfg.clusters[0].source,
            ClusterSource::Objects(PathBuf::from("/etc/meshdns/dumps/cluster-1.yaml"))
        );
        assert_eq!(
            cfg.clusters[1].source,
            ClusterSource::Objects(PathBuf::from("/abs/cluster-2.yaml"))
        );
        assert_eq!(
            cfg.clusters[1].gateway.addresses,
            Some(vec![
                Ingress::Ip("203.0.113.7".parse().unwrap()),
                Ingress::Hostname("gw.example.com".into())
            ])
        );
        assert_eq!(cfg.upstream_timeout, DEFAULT_TRY_TIMEOUT);
        assert_eq!(cfg.worker_threads, 1);
    }

    #[test]
    fn durations_outside_their_range_are_errors_naming_the_field() {
        let base = "clusters: [{name: c1, local: true, objects: a}]\n";
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "tcpIdleTimeout",
                "18446744073709551615s",
                Some("outside the range 100ms to 60m"),
            ),
            ("tcpIdleTimeout", "18446744073709551616s", Some("not a duration")),
            ("tcpIdleTimeout", "0s", Some("outside")),
            ("tcpIdleTimeout", "10s", None),
            ("upstreamTimeout", "0ms", Some("outside the range 10ms to 1m")),
            ("upstreamTimeout", "2s", None),
            ("upstreamDeadline", "9999m", Some("outside")),
            ("upstreamDeadline", "4s", None),
            ("startupWait", "0s", None),
            ("startupWait", "11m", Some("outside the range 0s to 10m")),
            ("drainTimeout", "5", Some("not a duration")),
            ("drainTimeout", "20s", None),
        ];
        for &(field, value, want) in cases {
            let got = build(&format!("{base}{field}: \"{value}\"\n"));
            match (want, got) {
                (None, Ok(_)) => {}
                (Some(want), Err(ConfigError::Invalid { problems, .. })) => {
                    assert!(
                        problems.iter().any(|p| p.field == field && p.message.contains(want)),
                        "{field}: {value}: {problems:?}"
                    );
                }
                (want, got) => panic!("{field}: {value}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn defaults() {
        let cfg = build("clusters: [{name: c1, local: true, objects: a.yaml}]").expect("valid");
        assert_eq!(cfg.listen, vec![DEFAULT_LISTEN.parse().unwrap()]);
        assert_eq!(cfg.upstreams, None);
        assert_eq!(cfg.resolv_conf, PathBuf::from(DEFAULT_RESOLV_CONF));
        assert_eq!(cfg.ttl, DEFAULT_TTL);
        assert_eq!(cfg.negative_ttl, DEFAULT_NEGATIVE_TTL);
        assert_eq!(cfg.cache, CacheSettings::default());
        assert!(cfg.cache.enabled(), "the response cache is on by default");
    }

    #[test]
    fn cache_block() {
        let secs = Duration::from_secs;
        let base = "clusters: [{name: c1, local: true, objects: a}]\n";
        let cases: &[(&str, CacheSettings)] = &[
            (
                "cache: {maxEntries: 50, maxTtl: 1m, negativeMaxTtl: 5s, servfailTtl: 500ms}",
                CacheSettings {
                    max_entries: 50,
                    max_ttl: secs(60),
                    negative_max_ttl: secs(5),
                    servfail_ttl: Duration::from_millis(500),
                },
            ),
            (
                "cache: {maxEntries: 0}",
                CacheSettings {
                    max_entries: 0,
                    ..CacheSettings::default()
                },
            ),
            (
                "cache: {servfailTtl: 0s, maxTtl: 86400s}",
                CacheSettings {
                    servfail_ttl: Duration::ZERO,
                    max_ttl: secs(86_400),
                    ..CacheSettings::default()
                },
            ),
            ("cache: {}", CacheSettings::default()),
        ];
        for (yaml, want) in cases {
            let cfg = build(&format!("{base}{yaml}")).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(cfg.cache, *want, "{yaml}");
        }
        let bad = [
            ("cache: {maxTtl: 0s}", "cache.maxTtl"),
            ("cache: {maxTtl: 1500ms}", "cache.maxTtl"),
            ("cache: {maxTtl: 86401s}", "cache.maxTtl"),
            ("cache: {negativeMaxTtl: soon}", "cache.negativeMaxTtl"),
            ("cache: {servfailTtl: 31s}", "cache.servfailTtl"),
            ("cache: {maxEntries: -1}", "maxEntries"),
            ("cache: {size: 10}", "size"),
        ];
        for (yaml, field) in bad {
            let err = build(&format!("{base}{yaml}")).expect_err(yaml).to_string();
            assert!(err.contains(field), "{yaml}: {err:?} does not mention {field}");
        }
    }

    #[test]
    fn limits_block() {
        let base = "clusters: [{name: c1, local: true, objects: a}]\n";
        let cases: &[(&str, Limits)] = &[
            ("", Limits::default()),
            (
                "limits: {udpInFlight: 10, tcpConnections: 2, tcpPipeline: 1}",
                Limits {
                    udp_in_flight: 10,
                    tcp_connections: 2,
                    tcp_pipeline: 1,
                },
            ),
            (
                "limits: {tcpConnections: 7}",
                Limits {
                    tcp_connections: 7,
                    ..Limits::default()
                },
            ),
        ];
        for (yaml, want) in cases {
            let cfg = build(&format!("{base}{yaml}")).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(cfg.limits, *want, "{yaml}");
        }
        for (yaml, field) in [
            ("limits: {udpInFlight: 0}", "limits.udpInFlight"),
            ("limits: {tcpPipeline: 0}", "limits.tcpPipeline"),
            ("limits: {tcpConnections: many}", "tcpConnections"),
            ("limits: {connections: 3}", "connections"),
        ] {
            let err = build(&format!("{base}{yaml}")).expect_err(yaml).to_string();
            assert!(err.contains(field), "{yaml}: {err:?} does not mention {field}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "unknown key",
                "clusters: [{name: c1, local: true, objects: a}]\nlisten2: []",
                "listen2",
            ),
            (
                "unknown nested key",
                "clusters: [{name: c1, local: true, objects: a, bogus: 1}]",
                "bogus",
            ),
            ("no local", "clusters: [{name: c1, objects: a}]", "clusters"),
            (
                "two local",
                "clusters: [{name: c1, local: true, objects: a}, {name: c2, local: true, objects: b}]",
                "clusters",
            ),
            (
                "remote without a source",
                "clusters: [{name: c1, local: true}, {name: c2}]",
                "clusters[1].kubeconfig",
            ),
            (
                "objects and kubeconfig",
                "clusters: [{name: c1, local: true, objects: a, kubeconfig: b}]",
                "clusters[0].kubeconfig",
            ),
            (
                "bad listen",
                "listen: [nope]\nclusters: [{name: c1, local: true, objects: a}]",
                "listen[0]",
            ),
            (
                "bad upstream",
                "upstreams: [x.y]\nclusters: [{name: c1, local: true, objects: a}]",
                "upstreams[0]",
            ),
            (
                "loop",
                "listen: [\"127.0.0.1:53\"]\nupstreams: [127.0.0.1]\nclusters: [{name: c1, local: true, objects: a}]",
                "upstreams",
            ),
            (
                "bad name",
                "clusters: [{name: Cluster_1, local: true, objects: a}]",
                "clusters[0].name",
            ),
            (
                "dup name",
                "clusters: [{name: c1, local: true, objects: a}, {name: c1, objects: b}]",
                "clusters[1].name",
            ),
            (
                "bad selector",
                "clusters: [{name: c1, local: true, objects: a, eastWestGateway: {selector: 'a in (b)'}}]",
                "selector",
            ),
            (
                "bad duration",
                "upstreamTimeout: 2 parsecs\nclusters: [{name: c1, local: true, objects: a}]",
                "upstreamTimeout",
            ),
            (
                "bad ttl type",
                "ttl: thirty\nclusters: [{name: c1, local: true, objects: a}]",
                "ttl",
            ),
            (
                "bad search",
                "search: ['a..b']\nclusters: [{name: c1, local: true, objects: a}]",
                "search[0]",
            ),
            (
                "bad domain",
                "clusterDomain: 'a..b'\nclusters: [{name: c1, local: true, objects: a}]",
                "clusterDomain",
            ),
        ];
        for (name, yaml, want) in cases {
            let err = build(yaml).expect_err(name).to_string();
            assert!(err.contains("/etc/meshdns/config.yaml"), "{name}: {err}");
            assert!(err.contains(want), "{name}: {err:?} does not mention {want}");
        }
    }

    #[test]
    fn overrides_win() {
        let path = Path::new("c.yaml");
        let file = parse_file(path, GOOD).unwrap();
        let over = Overrides {
            listen: vec!["127.0.0.1:0".into()],
            upstreams: vec!["[::1]:5353".into()],
            ..Overrides::default()
        };
        let cfg = Config::from_parts(Some(path), Path::new("."), file, &over).unwrap();
        assert_eq!(cfg.listen, vec!["127.0.0.1:0".parse().unwrap()]);
        assert_eq!(cfg.upstreams, Some(vec!["[::1]:5353".parse().unwrap()]));
    }

    #[test]
    fn durations_and_upstreams() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_upstream("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_upstream("[::1]"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_upstream("1.2.3.4:99"), Some("1.2.3.4:99".parse().unwrap()));
        assert_eq!(parse_upstream("host:53"), None);
    }
}
