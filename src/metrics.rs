//! Prometheus metrics. One [`Metrics`] value is made per running proxy and shared (`Arc`) by the
//! server, the handler, the forwarder and the hub. Series that are recorded on the query path
//! are resolved to their counter once (on first use, or up front where the label set is small)
//! and kept in fixed slots, so recording a query is an index computation and an atomic add.
//! Per-cluster series are not recorded at all: they are read from the hub's status when
//! `/metrics` is scraped, so they can never disagree with `/debug/clusters`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::hub::ClusterStatus;
use crate::lookup::Rule;
use crate::upstream::Transport;

/// `Content-Type` of [`Metrics::render`]'s output: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Latency buckets for queries and upstream exchanges: 50 µs (a table answer) doubling up to
/// about 6.5 s (past the longest upstream deadline worth configuring).
const LATENCY_START_SECONDS: f64 = 0.000_05;
const LATENCY_BUCKETS: u16 = 18;
/// Table rebuilds: 100 µs doubling up to about 3.3 s (10 000 services per cluster and more).
const REBUILD_START_SECONDS: f64 = 0.000_1;
const REBUILD_BUCKETS: u16 = 16;

/// What happened to a query; the `outcome` label of `meshdns_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the table (rule 1).
    Local,
    /// Answered with a search-path shortcut (rule 3).
    SearchShortcut,
    /// NOERROR without answers from the table (rule 2, empty non-terminals).
    LocalNoData,
    /// NXDOMAIN from the table (rule 4).
    LocalNxDomain,
    /// Relayed from an upstream.
    Forwarded,
    /// An upstream's earlier reply, served from the response cache.
    CacheHit,
    /// SERVFAIL: no upstream gave a usable answer.
    Error,
    /// Refused by rule, never looked up: BADVERS (an EDNS version meshdns does not speak) or
    /// REFUSED (a zone transfer).
    Refused,
}

impl Outcome {
    const ALL: [Self; 8] = [
        Self::Local,
        Self::SearchShortcut,
        Self::LocalNoData,
        Self::LocalNxDomain,
        Self::Forwarded,
        Self::CacheHit,
        Self::Error,
        Self::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => Rule::Table.as_str(),
            Self::SearchShortcut => Rule::SearchShortcut.as_str(),
            Self::LocalNoData => Rule::NoData.as_str(),
            Self::LocalNxDomain => Rule::NxDomain.as_str(),
            Self::Forwarded => "forwarded",
            Self::CacheHit => "cache_hit",
            Self::Error => "error",
            Self::Refused => "refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<Rule> for Outcome {
    fn from(rule: Rule) -> Self {
        match rule {
            Rule::Table => Self::Local,
            Rule::SearchShortcut => Self::SearchShortcut,
            Rule::NoData => Self::LocalNoData,
            Rule::NxDomain => Self::LocalNxDomain,
        }
    }
}

/// Query types with their own `qtype` label value; every other type is counted as `other`, so
/// a client cannot grow the number of series.
const QTYPES: [RecordType; 12] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::SRV,
    RecordType::PTR,
    RecordType::TXT,
    RecordType::MX,
    RecordType::NS,
    RecordType::SOA,
    RecordType::ANY,
    RecordType::HTTPS,
    RecordType::SVCB,
];
const QTYPE_SLOTS: usize = QTYPES.len() + 1;
const OTHER_QTYPE: &str = "other";

fn qtype_index(qtype: RecordType) -> usize {
    QTYPES.iter().position(|t| *t == qtype).unwrap_or(QTYPES.len())
}

fn qtype_label(index: usize) -> &'static str {
    // The labels of QTYPES are fixed strings; `RecordType` only hands out `&'static str` too.
    QTYPES.get(index).map_or(OTHER_QTYPE, |t| <&'static str>::from(*t))
}

const TRANSPORTS: [Transport; 2] = [Transport::Udp, Transport::Tcp];

fn transport_index(transport: Transport) -> usize {
    match transport {
        Transport::Udp => 0,
        Transport::Tcp => 1,
    }
}

/// Why a datagram or message was dropped without an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a DNS header: not DNS at all.
    Short,
    /// A response (QR set): answering it could make meshdns a reflector.
    Response,
    /// From a source address no answer can go to (port 0, unspecified or broadcast).
    Source,
    /// Over a resource cap: a UDP query answered SERVFAIL because too many are in flight, or
    /// a TCP connection closed because too many are open.
    Overload,
}

impl DropReason {
    const ALL: [Self; 4] = [Self::Short, Self::Response, Self::Source, Self::Overload];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::Response => "response",
            Self::Source => "source",
            Self::Overload => "overload",
        }
    }
}

/// Why a query was answered FORMERR or NOTIMP instead of being looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MalformedReason {
    /// The header parsed but the rest did not (FORMERR).
    Undecodable,
    /// Not exactly one question (FORMERR).
    QuestionCount,
    /// An opcode other than QUERY (NOTIMP).
    Opcode,
}

impl MalformedReason {
    const ALL: [Self; 3] = [Self::Undecodable, Self::QuestionCount, Self::Opcode];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::QuestionCount => "question_count",
            Self::Opcode => "opcode",
        }
    }
}

/// Why an upstream attempt did not produce the answer; the `reason` label of
/// `meshdns_upstream_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    Timeout,
    Network,
    BadReply,
    /// The upstream answered SERVFAIL or REFUSED, so the next one was tried.
    Declined,
}

impl UpstreamFailure {
    const ALL: [Self; 4] = [Self::Timeout, Self::Network, Self::BadReply, Self::Declined];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Network => "network",
            Self::BadReply => "bad_reply",
            Self::Declined => "declined",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    protocol: &'static str,
    qtype: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    protocol: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamFailureLabels {
    upstream: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamOnlyLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Histograms in a [`Family`] need a constructor; this one gives latency buckets.
#[derive(Clone, Copy, Debug)]
struct LatencyHistogram;

impl prometheus_client::metrics::family::MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        latency_histogram()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(LATENCY_START_SECONDS, 2.0, LATENCY_BUCKETS))
}

/// The counters of one upstream, resolved once per configured upstream.
#[derive(Clone, Debug)]
pub struct UpstreamStats {
    attempts: [Counter; TRANSPORTS.len()],
    failures: [Counter; UpstreamFailure::ALL.len()],
    latency: Histogram,
}

impl UpstreamStats {
    /// One exchange with this upstream started.
    pub fn attempt(&self, transport: Transport) {
        self.attempts[transport_index(transport)].inc();
    }

    pub fn failure(&self, reason: UpstreamFailure) {
        self.failures[reason as usize].inc();
    }

    /// A reply came back (usable or not) after `elapsed`.
    pub fn replied(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }
}

/// What `/metrics` reads from the hub at scrape time.
#[derive(Debug, Default)]
struct Snapshot {
    clusters: Vec<ClusterStatus>,
    ready: bool,
    taken: Option<Instant>,
}

/// Reads one per-cluster value from a status taken at the given instant.
type ClusterValue = fn(&ClusterStatus, Instant) -> Option<f64>;

/// Encodes the per-cluster series from the snapshot [`Metrics::render`] stored just before.
#[derive(Debug)]
struct ClusterCollector {
    snapshot: Arc<Mutex<Snapshot>>,
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = snapshot.taken.unwrap_or_else(Instant::now);
        let ready = ConstGauge::new(i64::from(snapshot.ready));
        let metric = encoder.encode_descriptor(
            "meshdns_ready",
            "1 once meshdns serves DNS (every cluster loaded, or the start-up wait expired).",
            None,
            MetricType::Gauge,
        )?;
        ready.encode(metric)?;

        let clusters = &snapshot.clusters;
        let gauges: [(&str, &str, ClusterValue); 4] = [
            (
                "meshdns_cluster_loaded",
                "1 once the cluster's first complete state arrived.",
                |c, _| Some(f64::from(u8::from(c.loaded))),
            ),
            (
                "meshdns_cluster_stale",
                "1 while the cluster's source fails and its last known state is served.",
                |c, _| Some(f64::from(u8::from(c.stale))),
            ),
            ("meshdns_cluster_services", "Services known in the cluster.", |c, _| {
                Some(c.services as f64)
            }),
            (
                "meshdns_cluster_update_age_seconds",
                "Seconds since the cluster's source last delivered a state or a successful watch event.",
                |c, now| c.last_update.map(|at| now.saturating_duration_since(at).as_secs_f64()),
            ),
        ];
        for (name, help, value) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for cluster in clusters {
                if let Some(v) = value(cluster, now) {
                    let labels = [("cluster", cluster.name.as_str())];
                    ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "meshdns_cluster_watch_errors",
            "Failures of the cluster's source (watch errors, unreadable or broken object dumps).",
            None,
            MetricType::Counter,
        )?;
        for cluster in clusters {
            let labels = [("cluster", cluster.name.as_str())];
            ConstCounter::new(cluster.errors).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Every metric meshdns exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Mutex<Snapshot>>,
    /// One scrape at a time, so each encodes the snapshot it stored.
    render_lock: Mutex<()>,
    requests: Family<RequestLabels, Counter>,
    request_slots: Box<[OnceLock<Counter>]>,
    request_duration: [Histogram; Outcome::ALL.len()],
    dropped: [[Counter; DropReason::ALL.len()]; TRANSPORTS.len()],
    malformed: [[Counter; MalformedReason::ALL.len()]; TRANSPORTS.len()],
    upstream_attempts: Family<UpstreamLabels, Counter>,
    upstream_failures: Family<UpstreamFailureLabels, Counter>,
    upstream_latency: Family<UpstreamOnlyLabels, Histogram, LatencyHistogram>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_evictions: Counter,
    cache_entries: Gauge,
    table_names: Gauge,
    table_rebuilds: Counter,
    table_rebuild_duration: Histogram,
    config_reloads: [Counter; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));

        let build_info: Family<VersionLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("meshdns_build_info", "meshdns version, always 1", build_info);

        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "meshdns_requests",
            "DNS queries answered, by transport, query type and outcome",
            requests.clone(),
        );
        let request_duration_family =
            Family::<OutcomeLabels, Histogram, LatencyHistogram>::new_with_constructor(LatencyHistogram);
        registry.register(
            "meshdns_request_duration_seconds",
            "Time from reading a query to handing its answer to the socket, by outcome",
            request_duration_family.clone(),
        );
        let request_duration = Outcome::ALL.map(|outcome| {
            request_duration_family.get_or_create_owned(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
        });

        let dropped_family = Family::<PacketLabels, Counter>::default();
        registry.register(
            "meshdns_dropped_packets",
            "Datagrams and TCP messages dropped without an answer, by reason",
            dropped_family.clone(),
        );
        let dropped = TRANSPORTS.map(|t| {
            DropReason::ALL.map(|r| {
                dropped_family.get_or_create_owned(&PacketLabels {
                    protocol: t.as_str(),
                    reason: r.as_str(),
                })
            })
        });
        let malformed_family = Family::<PacketLabels, Counter>::default();
        registry.register(
            "meshdns_malformed_requests",
            "Queries answered FORMERR or NOTIMP without a lookup, by reason",
            malformed_family.clone(),
        );
        let malformed = TRANSPORTS.map(|t| {
            MalformedReason::ALL.map(|r| {
                malformed_family.get_or_create_owned(&PacketLabels {
                    protocol: t.as_str(),
                    reason: r.as_str(),
                })
            })
        });

        let upstream_attempts = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "meshdns_upstream_requests",
            "Exchanges with an upstream resolver (a UDP try and its TCP retry count as two)",
            upstream_attempts.clone(),
        );
        let upstream_failures = Family::<UpstreamFailureLabels, Counter>::default();
        registry.register(
            "meshdns_upstream_failures",
            "Upstream exchanges that gave no usable answer, by reason",
            upstream_failures.clone(),
        );
        let upstream_latency = Family::new_with_constructor(LatencyHistogram);
        registry.register(
            "meshdns_upstream_request_duration_seconds",
            "Time from sending a query upstream to its reply",
            upstream_latency.clone(),
        );

        let cache_hits = Counter::default();
        registry.register(
            "meshdns_cache_hits",
            "Response-cache lookups (forwardable queries, alias chases) answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "meshdns_cache_misses",
            "Response-cache lookups that found no live entry, so the upstream was asked",
            cache_misses.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "meshdns_cache_evictions",
            "Live cache entries dropped to make room (the cache is full)",
            cache_evictions.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "meshdns_cache_entries",
            "Replies held in the response cache",
            cache_entries.clone(),
        );

        let table_names = Gauge::default();
        registry.register("meshdns_table_names", "Names in the current table", table_names.clone());
        let table_rebuilds = Counter::default();
        registry.register(
            "meshdns_table_rebuilds",
            "Tables built and swapped in",
            table_rebuilds.clone(),
        );
        let table_rebuild_duration = Histogram::new(exponential_buckets(REBUILD_START_SECONDS, 2.0, REBUILD_BUCKETS));
        registry.register(
            "meshdns_table_rebuild_duration_seconds",
            "Time to build a table from every cluster's state",
            table_rebuild_duration.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "meshdns_config_reloads",
            "Config re-reads after SIGHUP, by result",
            reloads.clone(),
        );
        let config_reloads = ["success", "failure"].map(|result| reloads.get_or_create_owned(&ResultLabels { result }));

        registry.register_collector(Box::new(ClusterCollector {
            snapshot: Arc::clone(&snapshot),
        }));

        Self {
            registry,
            snapshot,
            render_lock: Mutex::new(()),
            requests,
            request_slots: (0..TRANSPORTS.len() * QTYPE_SLOTS * Outcome::ALL.len())
                .map(|_| OnceLock::new())
                .collect(),
            request_duration,
            dropped,
            malformed,
            upstream_attempts,
            upstream_failures,
            upstream_latency,
            cache_hits,
            cache_misses,
            cache_evictions,
            cache_entries,
            table_names,
            table_rebuilds,
            table_rebuild_duration,
            config_reloads,
        }
    }

    /// Counts one answered query and how long it took since `started`.
    pub fn request(&self, transport: Transport, qtype: RecordType, outcome: Outcome, started: Instant) {
        let (t, q, o) = (transport_index(transport), qtype_index(qtype), outcome.index());
        let slot = (t * QTYPE_SLOTS + q) * Outcome::ALL.len() + o;
        if let Some(cell) = self.request_slots.get(slot) {
            // A series appears on its first query; from then on it is one atomic add.
            cell.get_or_init(|| {
                self.requests.get_or_create_owned(&RequestLabels {
                    protocol: transport.as_str(),
                    qtype: qtype_label(q),
                    outcome: outcome.as_str(),
                })
            })
            .inc();
        }
        self.request_duration[o].observe(started.elapsed().as_secs_f64());
    }

    pub fn dropped(&self, transport: Transport, reason: DropReason) {
        self.dropped[transport_index(transport)][reason as usize].inc();
    }

    pub fn malformed(&self, transport: Transport, reason: MalformedReason) {
        self.malformed[transport_index(transport)][reason as usize].inc();
    }

    /// The counters of one upstream; called when the upstream list is (re)configured.
    pub fn upstream(&self, upstream: SocketAddr) -> UpstreamStats {
        let name = upstream.to_string();
        UpstreamStats {
            attempts: TRANSPORTS.map(|t| {
                self.upstream_attempts.get_or_create_owned(&UpstreamLabels {
                    upstream: name.clone(),
                    transport: t.as_str(),
                })
            }),
            failures: UpstreamFailure::ALL.map(|r| {
                self.upstream_failures.get_or_create_owned(&UpstreamFailureLabels {
                    upstream: name.clone(),
                    reason: r.as_str(),
                })
            }),
            latency: self
                .upstream_latency
                .get_or_create_owned(&UpstreamOnlyLabels { upstream: name.clone() }),
        }
    }

    /// One lookup in the response cache, which then holds `entries` replies.
    pub fn cache_lookup(&self, hit: bool, entries: usize) {
        if hit { &self.cache_hits } else { &self.cache_misses }.inc();
        self.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// A reply stored in the response cache after evicting `evicted` live ones.
    pub fn cache_stored(&self, evicted: usize, entries: usize) {
        self.cache_evictions.inc_by(u64::try_from(evicted).unwrap_or(u64::MAX));
        self.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    pub fn table_rebuilt(&self, names: usize, elapsed: Duration) {
        self.table_names.set(i64::try_from(names).unwrap_or(i64::MAX));
        self.table_rebuilds.inc();
        self.table_rebuild_duration.observe(elapsed.as_secs_f64());
    }

    pub fn config_reloaded(&self, ok: bool) {
        self.config_reloads[usize::from(!ok)].inc();
    }

    /// The text exposition of every metric, with the per-cluster series taken from `clusters`.
    pub fn render(&self, clusters: Vec<ClusterStatus>, ready: bool) -> String {
        let _scrape = self.render_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *self.snapshot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Snapshot {
            clusters,
            ready,
            taken: Some(Instant::now()),
        };
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            // Writing into a String cannot fail; a failing encoder is a bug worth seeing.
            tracing::warn!(%error, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_rules() {
        let metrics = Metrics::new();
        metrics.request(Transport::Udp, RecordType::A, Outcome::Local, Instant::now());
        metrics.request(Transport::Tcp, RecordType::CAA, Outcome::Forwarded, Instant::now());
        let text = metrics.render(Vec::new(), true);
        let mut types = 0;
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            types += 1;
            let mut words = line.split_whitespace().skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert!(name.starts_with("meshdns_"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            if kind == "histogram" {
                assert!(name.ends_with("_seconds"), "{line}");
            }
        }
        assert!(types >= 15, "{text}");
        assert!(text.contains(r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="local"} 1"#));
        assert!(text.contains(r#"meshdns_requests_total{protocol="tcp",qtype="other",outcome="forwarded"} 1"#));
    }
}
