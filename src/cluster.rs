//! Compact per-cluster state: the few facts about Services and EndpointSlices that the name
//! table needs, and nothing else. Every source of cluster state (object dumps, live watches)
//! folds what it reads into a [`ClusterState`], and the table builder reads only this type.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use thiserror::Error;

use crate::name_key::KeyBuf;

/// Label a Kubernetes EndpointSlice carries to name the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Identity of a namespaced object. Names are stored lowercase: DNS is case-insensitive and
/// Kubernetes names are DNS labels already.
///
/// The key also carries `<name>.<namespace>` as [`crate::name_key`] labels, computed here once:
/// the table is rebuilt on every change, and validating and copying every name on every rebuild
/// was a sixth of a rebuild's time. The fields are private so the labels cannot drift from the
/// names; equality, hashing and order use the names alone, as before.
#[derive(Clone)]
pub struct ObjectKey {
    namespace: String,
    name: String,
    /// `None` unless both names are DNS labels (only those can become a table name). Shared with
    /// every table built from this key, which keys the service's entry by it.
    labels: Option<Arc<[u8]>>,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        let namespace = namespace.to_ascii_lowercase();
        let name = name.to_ascii_lowercase();
        let labels = (is_dns_label(&name) && is_dns_label(&namespace))
            .then(|| KeyBuf::from_labels([name.as_bytes(), namespace.as_bytes()]))
            .flatten()
            .map(|key| Arc::from(key.as_bytes()));
        Self {
            namespace,
            name,
            labels,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<name>.<namespace>` as a [`crate::name_key`] key (the labels above `svc.<zone>`), or
    /// `None` if either is not a DNS label.
    pub fn labels(&self) -> Option<&Arc<[u8]>> {
        self.labels.as_ref()
    }

    fn names(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl PartialEq for ObjectKey {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

impl Eq for ObjectKey {}

impl Hash for ObjectKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.names().hash(state);
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.names().cmp(&other.names())
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectKey")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish()
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a Service is addressed, which decides how its name is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// A virtual IP per family (`spec.clusterIPs`); also NodePort and LoadBalancer services.
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: the name stands for the endpoints themselves.
    Headless,
    /// `type: ExternalName`: the name is an alias of `spec.externalName`.
    ExternalName(String),
}

/// Transport protocol of a service port, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl PortProtocol {
    /// Parses the Kubernetes spelling; an absent protocol means TCP, as in the API defaults.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.map(str::to_ascii_uppercase).as_deref() {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: PortProtocol,
}

/// The address a load balancer gives a Service: an IP or, for some cloud LBs, a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ingress {
    Ip(IpAddr),
    Hostname(String),
}

impl fmt::Display for Ingress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Hostname(host) => f.write_str(host),
        }
    }
}

/// Why a gateway address is never answered. A remote cluster is administered by someone else:
/// a gateway it reports is answered to every pod of this one, so an address that would make
/// pods talk to themselves, their node or the cloud metadata service must not pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayRefusal {
    Loopback,
    LinkLocal,
    Unspecified,
    Multicast,
    Broadcast,
    /// `localhost` or a name below it (RFC 6761: always loopback).
    Localhost,
    /// A name inside the cluster domain: it would alias a remote name to one of this cluster's.
    ClusterDomain,
}

impl fmt::Display for GatewayRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Localhost => "localhost",
            Self::ClusterDomain => "inside the cluster domain",
        })
    }
}

/// A gateway address left out of the answers, and why; shown as `127.0.0.1 (loopback)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefusedGateway {
    pub ingress: Ingress,
    pub reason: GatewayRefusal,
}

impl fmt::Display for RefusedGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.ingress, self.reason)
    }
}

/// Whether a gateway address must never be answered, and why. `cluster_domain` is lowercase
/// without a trailing dot; the one rule for every gateway, reported or configured.
pub fn gateway_refusal(ingress: &Ingress, cluster_domain: &str) -> Option<GatewayRefusal> {
    match ingress {
        Ingress::Ip(IpAddr::V4(ip)) => v4_refusal(*ip),
        // `::ffff:127.0.0.1` reaches the v4 address, so it is judged as that address.
        Ingress::Ip(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
            Some(v4) => v4_refusal(v4),
            None if ip.is_loopback() => Some(GatewayRefusal::Loopback),
            None if ip.is_unspecified() => Some(GatewayRefusal::Unspecified),
            None if ip.is_multicast() => Some(GatewayRefusal::Multicast),
            // fe80::/10; `Ipv6Addr::is_unicast_link_local` needs a newer Rust than rust-version.
            None if ip.segments()[0] & 0xffc0 == 0xfe80 => Some(GatewayRefusal::LinkLocal),
            None => None,
        },
        Ingress::Hostname(host) => {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            let below = |zone: &str| {
                !zone.is_empty() && (host == zone || host.strip_suffix(zone).is_some_and(|rest| rest.ends_with('.')))
            };
            if below("localhost") {
                Some(GatewayRefusal::Localhost)
            } else if below(cluster_domain.trim_end_matches('.')) {
                Some(GatewayRefusal::ClusterDomain)
            } else {
                None
            }
        }
    }
}

fn v4_refusal(ip: Ipv4Addr) -> Option<GatewayRefusal> {
    if ip.is_loopback() {
        Some(GatewayRefusal::Loopback)
    } else if ip.is_link_local() {
        Some(GatewayRefusal::LinkLocal)
    } else if ip.octets()[0] == 0 {
        // 0.0.0.0/8 is "this network": a connection to it reaches this host, like 0.0.0.0.
        Some(GatewayRefusal::Unspecified)
    } else if ip.is_multicast() {
        Some(GatewayRefusal::Multicast)
    } else if ip.is_broadcast() {
        Some(GatewayRefusal::Broadcast)
    } else {
        None
    }
}

/// Splits gateway addresses into those that may be answered and those refused, order kept.
pub fn partition_gateways(addresses: &[Ingress], cluster_domain: &str) -> (Vec<Ingress>, Vec<RefusedGateway>) {
    let mut allowed = Vec::with_capacity(addresses.len());
    let mut refused = Vec::new();
    for ingress in addresses {
        match gateway_refusal(ingress, cluster_domain) {
            None => allowed.push(ingress.clone()),
            Some(reason) => refused.push(RefusedGateway {
                ingress: ingress.clone(),
                reason,
            }),
        }
    }
    (allowed, refused)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub kind: ServiceKind,
    /// Shared with the name table, which answers SRV queries from it.
    pub ports: Arc<[ServicePort]>,
    /// `spec.publishNotReadyAddresses`: headless names then include endpoints that are not ready.
    pub publish_not_ready: bool,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// A missing `ready` condition counts as ready, as the EndpointSlice API documents.
    pub ready: bool,
    pub hostname: Option<String>,
}

/// The parts of an EndpointSlice the table needs; kept only for headless services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// The Service this slice belongs to (label `kubernetes.io/service-name`), lowercase.
    pub service: String,
    pub endpoints: Vec<Endpoint>,
    /// The endpoints' ports (target ports), by name and protocol, for SRV answers.
    pub ports: Vec<ServicePort>,
}

/// Everything meshdns knows about one cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub services: HashMap<ObjectKey, Service>,
    /// EndpointSlices by their own namespace/name.
    pub endpoint_slices: HashMap<ObjectKey, EndpointSlice>,
    /// Load-balancer ingress of every Service matching the cluster's east-west gateway selector.
    pub gateways: BTreeMap<ObjectKey, Vec<Ingress>>,
}

impl ClusterState {
    /// The east-west gateway addresses of this cluster, each once, in a stable order.
    pub fn gateway_addresses(&self) -> Vec<Ingress> {
        let mut all: Vec<Ingress> = self.gateways.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        all
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: &'static str,
}

/// An equality-based Kubernetes label selector (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined).
/// Set-based terms (`in`, `notin`) are rejected when parsed rather than silently mismatched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    source: String,
    terms: Vec<Term>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let err = |reason| SelectorError {
            selector: selector.to_string(),
            reason,
        };
        let mut terms = Vec::new();
        for raw in selector.split(',') {
            let term = raw.trim();
            if term.is_empty() {
                return Err(err("empty term"));
            }
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(err("set-based terms are not supported; use key=value"));
            }
            let parsed = if let Some((k, v)) = term.split_once("!=") {
                Term::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Term::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some(k) = term.strip_prefix('!') {
                Term::NotExists(k.trim().to_string())
            } else {
                Term::Exists(term.to_string())
            };
            let key = match &parsed {
                Term::Equals(k, _) | Term::NotEquals(k, _) | Term::Exists(k) | Term::NotExists(k) => k,
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(err("a term has an empty or malformed key"));
            }
            terms.push(parsed);
        }
        Ok(Self {
            source: selector.to_string(),
            terms,
        })
    }

    /// Whether a label set satisfies every term.
    pub fn matches<'a, I>(&self, labels: I) -> bool
    where
        I: IntoIterator<Item = (&'a str, &'a str)> + Clone,
    {
        let get = |key: &str| labels.clone().into_iter().find(|(k, _)| *k == key).map(|(_, v)| v);
        self.terms.iter().all(|term| match term {
            Term::Equals(k, v) => get(k) == Some(v.as_str()),
            Term::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::NotExists(k) => get(k).is_none(),
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Whether `s` is a lowercase DNS label (RFC 1123), as Kubernetes object and cluster names
/// are; only such names can become one label of a DNS name.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The selector Istio puts on its east-west gateway Service.
pub const DEFAULT_GATEWAY_SELECTOR: &str = "istio=eastwestgateway";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_terms() {
        let labels = [("istio", "eastwestgateway"), ("app", "gw")];
        let cases = [
            ("istio=eastwestgateway", true),
            ("istio==eastwestgateway", true),
            ("istio=ingressgateway", false),
            ("istio=eastwestgateway,app=gw", true),
            ("istio=eastwestgateway,app!=gw", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
        ];
        for (selector, want) in cases {
            let parsed = LabelSelector::parse(selector).expect(selector);
            assert_eq!(parsed.matches(labels.iter().copied()), want, "{selector}");
        }
    }

    #[test]
    fn gateway_refusals() {
        use GatewayRefusal::*;
        let ip = |s: &str| Ingress::Ip(s.parse().expect(s));
        let host = |s: &str| Ingress::Hostname(s.to_string());
        let cases = [
            (ip("127.0.0.1"), Some(Loopback)),
            (ip("127.255.0.9"), Some(Loopback)),
            (ip("::1"), Some(Loopback)),
            (ip("::ffff:127.0.0.1"), Some(Loopback)),
            (ip("169.254.169.254"), Some(LinkLocal)),
            (ip("::ffff:169.254.169.254"), Some(LinkLocal)),
            (ip("fe80::1"), Some(LinkLocal)),
            (ip("febf::1"), Some(LinkLocal)),
            (ip("0.0.0.0"), Some(Unspecified)),
            (ip("0.1.2.3"), Some(Unspecified)),
            (ip("::"), Some(Unspecified)),
            (ip("::ffff:0.0.0.0"), Some(Unspecified)),
            (ip("224.0.0.1"), Some(Multicast)),
            (ip("239.255.255.250"), Some(Multicast)),
            (ip("ff02::1"), Some(Multicast)),
            (ip("::ffff:224.0.0.251"), Some(Multicast)),
            (ip("255.255.255.255"), Some(Broadcast)),
            (ip("::ffff:255.255.255.255"), Some(Broadcast)),
            (host("localhost"), Some(Localhost)),
            (host("LocalHost."), Some(Localhost)),
            (host("gw.localhost"), Some(Localhost)),
            (host("cluster.local"), Some(ClusterDomain)),
            (host("kube-dns.kube-system.svc.cluster.local"), Some(ClusterDomain)),
            (host("Evil.SVC.Cluster.Local."), Some(ClusterDomain)),
            // Public and private (RFC 1918, ULA) addresses are what gateways have.
            (ip("34.136.67.85"), None),
            (ip("10.0.0.1"), None),
            (ip("172.16.5.4"), None),
            (ip("192.168.1.1"), None),
            (ip("2001:db8::85"), None),
            (ip("fd00::1"), None),
            (ip("fec0::1"), None),
            (ip("::ffff:34.136.67.85"), None),
            (host("abc.elb.amazonaws.com"), None),
            (host("notlocalhost"), None),
            (host("localhost.example.com"), None),
            (host("mycluster.local"), None),
            (host("cluster.local.example.com"), None),
        ];
        for (ingress, want) in cases {
            assert_eq!(gateway_refusal(&ingress, "cluster.local"), want, "{ingress}");
        }
    }

    #[test]
    fn refused_gateways_are_split_off_and_shown_with_their_reason() {
        let gw = [
            Ingress::Ip("127.0.0.1".parse().unwrap()),
            Ingress::Ip("34.136.67.85".parse().unwrap()),
            Ingress::Hostname("api.svc.cluster.local".into()),
        ];
        let (allowed, refused) = partition_gateways(&gw, "cluster.local");
        assert_eq!(allowed, [gw[1].clone()]);
        let shown: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "127.0.0.1 (loopback)",
                "api.svc.cluster.local (inside the cluster domain)"
            ]
        );
    }

    #[test]
    fn selector_rejects_set_terms_and_empty_keys() {
        for bad in ["", "a in (b)", "=x", "a=b,,c"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?}");
        }
    }
}
