//! The name table: every name meshdns answers itself, built from all clusters' states into an
//! immutable value. A new table is built on every change and published whole (see
//! [`crate::hub`]), so a query reads one consistent snapshot and never waits for a rebuild.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use crate::cluster::{
    ClusterState, EndpointSlice, Ingress, ObjectKey, PortProtocol, RefusedGateway, Service, ServiceKind, ServicePort,
    partition_gateways,
};
use crate::name_key::{KeyBuf, MAX_KEY_LEN, ancestors, to_name};

/// SOA timers other than the minimum; resolvers only use the minimum for negative caching,
/// but the values must be sane for tools that print them. They follow CoreDNS's defaults.
const SOA_REFRESH: i32 = 7200;
const SOA_RETRY: i32 = 1800;
const SOA_EXPIRE: i32 = 86_400;

/// What the table answers for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryData {
    /// Addresses per family; an empty family is answered NODATA.
    Addresses { v4: Vec<Ipv4Addr>, v6: Vec<Ipv6Addr> },
    /// The name is an alias (CNAME) of another name: an ExternalName service, or a gateway
    /// whose load balancer is given as a host name.
    Alias(Name),
    /// `_<port>._<proto>.<svc>` of a headless service: one SRV record per published pod, as
    /// (pod name key, endpoint port).
    SrvPods(Vec<(Box<[u8]>, u16)>),
    /// TXT strings (`dns-version.<zone>`).
    Txt(Vec<String>),
}

/// The Kubernetes DNS schema version meshdns implements (kubernetes/dns specification.md).
pub const DNS_SCHEMA_VERSION: &str = "1.1.0";

/// Why a name is in the table, for logs and debugging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The Service exists in the local cluster.
    Local { cluster: Arc<str> },
    /// The Service exists only in these remote clusters; answered with their gateways.
    Remote { clusters: Arc<[Arc<str>]> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Shared: every remote service held by the same clusters has the same answer.
    pub data: Arc<EntryData>,
    pub origin: Origin,
    /// The service's ports, for SRV names answered from this entry (ClusterIP and remote
    /// services; headless services hold their per-pod SRV entries instead). Shared with the
    /// cluster state, so SRV costs the table nothing until asked.
    pub ports: Option<Arc<[ServicePort]>>,
}

/// What a key names in the table.
#[derive(Clone, Copy, Debug)]
pub enum Found<'t> {
    Entry(&'t Entry),
    /// `_<port>._<proto>.<svc>` of a service that has that named port: one SRV record to the
    /// service (`target`, the key of its name).
    Srv {
        target: &'t [u8],
        port: u16,
    },
    /// `_<proto>.<svc>` of a service with a named port of that protocol: exists, no records.
    ProtoLevel,
}

/// Settings that shape the table but do not come from the clusters.
#[derive(Clone, Debug)]
pub struct TableSettings {
    /// Lowercase, no trailing dot.
    pub cluster_domain: String,
    pub ttl: u32,
    pub negative_ttl: u32,
    /// The pod's search domains in resolv.conf order; only those inside the cluster domain
    /// are used for short forms.
    pub search: Vec<String>,
}

/// One cluster as the builder sees it.
#[derive(Clone, Copy, Debug)]
pub struct ClusterInput<'a> {
    pub name: &'a str,
    pub local: bool,
    pub state: &'a ClusterState,
    /// Whether the cluster's first full state has arrived.
    pub loaded: bool,
    /// Static gateway addresses from the config, replacing what the cluster reports.
    pub gateway_override: Option<&'a [Ingress]>,
}

impl ClusterInput<'_> {
    /// The configured gateway addresses, or else those the cluster reports, before the
    /// [`partition_gateways`] rule is applied.
    pub fn gateway_addresses(&self) -> Vec<Ingress> {
        match self.gateway_override {
            Some(addrs) => addrs.to_vec(),
            None => self.state.gateway_addresses(),
        }
    }
}

/// An immutable snapshot of every name meshdns answers.
#[derive(Debug)]
pub struct Table {
    entries: Names,
    /// Names that exist only because table names lie below them (`<ns>.svc.<zone>`,
    /// `svc.<zone>`): they have no records but must not be denied (RFC 8020).
    empty_non_terminals: HashSet<Box<[u8]>>,
    /// Reverse names: local ClusterIPs and local headless endpoint IPs, to the name they serve.
    ptr: PtrTargets,
    cluster_domain: Name,
    svc_zone: Name,
    /// Keys of `cluster_domain` and `svc_zone`, for zone checks on keys.
    cluster_domain_key: Box<[u8]>,
    svc_zone_key: Box<[u8]>,
    search: Vec<Name>,
    /// Keys of `search`, same order.
    search_keys: Vec<Box<[u8]>>,
    all_loaded: bool,
    ttl: u32,
    soa: Record,
    /// `soa` as an uncompressed wire-format record, for answers encoded without hickory's
    /// message builder ([`crate::fast`]).
    soa_wire: Box<[u8]>,
    generation: u64,
}

/// What a build noticed that an operator should hear about.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Remote clusters with services but no known gateway address: they contribute nothing.
    pub clusters_without_gateway: BTreeSet<String>,
    /// Services whose names are not valid DNS names and were left out.
    pub skipped: BTreeSet<String>,
    /// Remote clusters' gateway addresses that are never answered (loopback, link-local, ...),
    /// by cluster; clusters without any are not listed.
    pub refused_gateways: BTreeMap<String, BTreeSet<RefusedGateway>>,
}

impl Table {
    /// A table that knows no cluster yet: every name is forwarded.
    pub fn empty(settings: &TableSettings) -> Self {
        Self::build(settings, &[], 0).0
    }

    /// Builds the table from every cluster's state. This runs on every change, so it avoids
    /// per-service work that can be shared: a service's key comes ready-made (and shared) from
    /// its [`ObjectKey`], and remote services held by the same set of clusters share one answer.
    pub fn build(settings: &TableSettings, clusters: &[ClusterInput<'_>], generation: u64) -> (Self, BuildReport) {
        let cluster_domain = fqdn(&settings.cluster_domain).unwrap_or_else(Name::root);
        let svc_zone = Name::from_ascii("svc")
            .ok()
            .and_then(|svc| svc.append_domain(&cluster_domain).ok())
            .unwrap_or_else(|| cluster_domain.clone());
        // Sized for every service of every cluster up front (an upper bound: services held by
        // several clusters share a name), so a build never rehashes.
        let capacity = clusters.iter().map(|c| c.state.services.len()).sum();
        let local_ips = clusters
            .iter()
            .filter(|c| c.local)
            .map(|c| c.state.services.len())
            .sum();
        let svc_key = KeyBuf::from_name(&svc_zone).unwrap_or_default();
        let mut b = Builder {
            entries: Names::with_capacity(svc_key.to_boxed(), capacity),
            svc_key,
            ents: HashSet::new(),
            namespaces: HashSet::new(),
            ptr: PtrTargets::with_capacity(local_ips),
            report: BuildReport::default(),
        };
        let cluster_names: Vec<Arc<str>> = clusters.iter().map(|c| Arc::from(c.name)).collect();

        // Local services win over remote copies, so they go first and remotes fill the gaps.
        for (i, cluster) in clusters.iter().enumerate().filter(|(_, c)| c.local) {
            b.local_cluster(cluster.state, &cluster_names[i]);
        }
        b.remote_clusters(clusters, &cluster_names, &settings.cluster_domain);
        for namespace in std::mem::take(&mut b.namespaces) {
            if let Some(key) = b.full_key(namespace) {
                b.ents.insert(key.to_boxed());
            }
        }
        if !b.entries.is_empty() {
            b.ents.insert(b.svc_key.to_boxed());
        }
        if let Some(version) = Name::from_labels([&b"dns-version"[..]])
            .ok()
            .and_then(|n| n.append_domain(&cluster_domain).ok())
            .and_then(|n| KeyBuf::from_name(&n))
        {
            let entry = Entry {
                data: Arc::new(EntryData::Txt(vec![DNS_SCHEMA_VERSION.to_string()])),
                origin: Origin::Local {
                    cluster: Arc::from("meshdns"),
                },
                ports: None,
            };
            b.entries.insert(version.as_bytes(), entry);
        }
        let Builder {
            entries,
            ents: empty_non_terminals,
            ptr,
            report,
            ..
        } = b;

        let search: Vec<Name> = settings
            .search
            .iter()
            .filter_map(|s| fqdn(s))
            .filter(|s| cluster_domain.zone_of(s))
            .collect();
        let search_keys = search
            .iter()
            .map(|s| KeyBuf::from_name(s).unwrap_or_default().to_boxed())
            .collect();
        let soa = soa_record(&cluster_domain, settings.negative_ttl, generation);
        let soa_wire = record_wire(&soa);
        let all_loaded = !clusters.is_empty() && clusters.iter().all(|c| c.loaded);
        let key_of = |name: &Name| KeyBuf::from_name(name).unwrap_or_default().to_boxed();
        let table = Self {
            entries,
            empty_non_terminals,
            ptr,
            cluster_domain_key: key_of(&cluster_domain),
            svc_zone_key: key_of(&svc_zone),
            cluster_domain,
            svc_zone,
            search,
            search_keys,
            all_loaded,
            ttl: settings.ttl,
            soa,
            soa_wire,
            generation,
        };
        (table, report)
    }

    pub fn get(&self, name: &Name) -> Option<&Entry> {
        self.get_key(KeyBuf::from_name(name)?.as_bytes())
    }

    /// Lookup by [`crate::name_key`] key: the hot path, no allocation.
    pub fn get_key(&self, key: &[u8]) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Like [`Table::get_key`], also finding the SRV names of services' named ports, which
    /// are not stored but read from the service entry two (or one) labels up.
    pub fn find<'t>(&'t self, key: &'t [u8]) -> Option<Found<'t>> {
        if let Some(entry) = self.entries.get(key) {
            return Some(Found::Entry(entry));
        }
        let (first, rest) = split_label(key)?;
        let first = first.strip_prefix(b"_")?;
        let named_port = |service: &[u8], proto: &[u8], name: Option<&[u8]>| {
            let ports = self.entries.get(service)?.ports.as_ref()?;
            ports.iter().find(|p| {
                label_of(p.protocol) == proto && p.name.as_ref().is_some_and(|n| name.is_none_or(|w| n.as_bytes() == w))
            })
        };
        match split_label(rest) {
            Some((second, service)) if second.first() == Some(&b'_') => {
                let port = named_port(service, second, Some(first))?;
                Some(Found::Srv {
                    target: service,
                    port: port.port,
                })
            }
            _ => named_port(rest, key.get(1..1 + first.len() + 1)?, None).map(|_| Found::ProtoLevel),
        }
    }

    /// The key of the name a local ClusterIP or headless endpoint IP serves.
    pub fn ptr(&self, ip: &IpAddr) -> Option<&[u8]> {
        self.ptr.get(ip)
    }

    pub fn is_empty_non_terminal(&self, key: &[u8]) -> bool {
        self.empty_non_terminals.contains(key)
    }

    pub fn cluster_domain(&self) -> &Name {
        &self.cluster_domain
    }

    /// `svc.<cluster domain>.`: below it, a name the table does not know does not exist.
    pub fn svc_zone(&self) -> &Name {
        &self.svc_zone
    }

    /// Key of [`Table::cluster_domain`].
    pub fn cluster_domain_key(&self) -> &[u8] {
        &self.cluster_domain_key
    }

    /// Key of [`Table::svc_zone`].
    pub fn svc_zone_key(&self) -> &[u8] {
        &self.svc_zone_key
    }

    /// Search domains inside the cluster domain, in resolv.conf order.
    pub fn search(&self) -> &[Name] {
        &self.search
    }

    /// Keys of [`Table::search`], same order.
    pub fn search_keys(&self) -> &[Box<[u8]>] {
        &self.search_keys
    }

    /// Whether every configured cluster has delivered its first full state; until then a
    /// missing name may just not have arrived yet, so it is not denied.
    pub fn all_loaded(&self) -> bool {
        self.all_loaded
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// [`Table::soa`] in wire format, owner name uncompressed.
    pub fn soa_wire(&self) -> &[u8] {
        &self.soa_wire
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry with its name.
    pub fn iter(&self) -> impl Iterator<Item = (Option<Name>, &Entry)> {
        self.entries.iter()
    }
}

/// Every name in the table, in two maps split at `svc.<zone>`: the names below it (services,
/// their pods and SRV names) keyed by their labels above the zone, every other name by its whole
/// key. A service's labels are its [`ObjectKey`]'s, shared, so a rebuild allocates no key for
/// it, and the shorter keys hash faster. Inserts and lookups split a key by the same byte
/// suffix, so a key is found exactly when one map with one key would find it.
#[derive(Debug)]
struct Names {
    /// Key of `svc.<zone>`.
    zone: Box<[u8]>,
    below: HashMap<Arc<[u8]>, Entry>,
    other: HashMap<Box<[u8]>, Entry>,
}

impl Names {
    fn with_capacity(zone: Box<[u8]>, below: usize) -> Self {
        Self {
            zone,
            below: HashMap::with_capacity(below),
            other: HashMap::new(),
        }
    }

    fn get(&self, key: &[u8]) -> Option<&Entry> {
        match key.strip_suffix(&*self.zone) {
            Some(labels) => self.below.get(labels),
            None => self.other.get(key),
        }
    }

    /// Inserts under a whole key (a name that has no [`ObjectKey`] to share labels with).
    fn insert(&mut self, key: &[u8], entry: Entry) {
        match key.strip_suffix(&*self.zone) {
            Some(labels) => self.below.insert(labels.into(), entry),
            None => self.other.insert(key.into(), entry),
        };
    }

    /// Inserts the name `labels` + `svc.<zone>`, which the caller made sure fits in a key.
    fn insert_below(&mut self, labels: Arc<[u8]>, entry: Entry) {
        self.below.insert(labels, entry);
    }

    fn contains_below(&self, labels: &[u8]) -> bool {
        self.below.contains_key(labels)
    }

    fn len(&self) -> usize {
        self.below.len() + self.other.len()
    }

    fn is_empty(&self) -> bool {
        self.below.is_empty() && self.other.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (Option<Name>, &Entry)> {
        let below = self.below.iter().map(|(labels, entry)| {
            let mut key = KeyBuf::default();
            let name = key
                .push_key(labels)
                .and_then(|()| key.push_key(&self.zone))
                .and_then(|()| to_name(key.as_bytes()));
            (name, entry)
        });
        below.chain(self.other.iter().map(|(key, entry)| (to_name(key), entry)))
    }
}

/// Reverse names: each local address to the key of the name it serves. The keys sit end to end
/// in one buffer, so thousands of ClusterIPs cost one allocation, not one each.
#[derive(Debug)]
struct PtrTargets {
    by_ip: HashMap<IpAddr, Span>,
    keys: Vec<u8>,
}

/// Where a key sits in [`PtrTargets::keys`].
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
}

/// Room reserved per reverse name up front: a typical service key (`<name>.<ns>.svc.<zone>`)
/// fits, so the buffer rarely grows.
const PTR_KEY_ESTIMATE: usize = 48;

impl PtrTargets {
    fn with_capacity(addresses: usize) -> Self {
        Self {
            by_ip: HashMap::with_capacity(addresses),
            keys: Vec::with_capacity(addresses.saturating_mul(PTR_KEY_ESTIMATE)),
        }
    }

    fn get(&self, ip: &IpAddr) -> Option<&[u8]> {
        self.by_ip.get(ip).and_then(|span| self.keys.get(span.start..span.end))
    }

    /// The reverse names of `ips` point to the name whose key is `parts` joined. An address
    /// claimed twice (two Services with one ClusterIP, a stale endpoint whose IP a new pod
    /// reuses) goes to the smallest name, so the answer does not depend on the order the
    /// cluster state's maps iterate in, which differs between rebuilds and between pods.
    fn claim(&mut self, ips: &[IpAddr], parts: [&[u8]; 2]) {
        // The key goes into the buffer first, to be compared in place, and comes out again if
        // no address takes it.
        let start = self.keys.len();
        for part in parts {
            self.keys.extend_from_slice(part);
        }
        let span = Span {
            start,
            end: self.keys.len(),
        };
        let mut taken = false;
        for &ip in ips {
            match self.by_ip.entry(ip) {
                Slot::Occupied(mut owner) => {
                    if self.keys.get(span.start..span.end) < self.keys.get(owner.get().start..owner.get().end) {
                        owner.insert(span);
                        taken = true;
                    }
                }
                Slot::Vacant(slot) => {
                    slot.insert(span);
                    taken = true;
                }
            }
        }
        if !taken {
            self.keys.truncate(start);
        }
    }
}

/// The table under construction.
struct Builder<'a> {
    svc_key: KeyBuf,
    entries: Names,
    ents: HashSet<Box<[u8]>>,
    /// The labels of every namespace with a service in the table, which become empty
    /// non-terminals at the end: collected as borrowed labels, so the thousands of services
    /// of one namespace cost a lookup each rather than a key to build.
    namespaces: HashSet<&'a [u8]>,
    ptr: PtrTargets,
    report: BuildReport,
}

impl<'a> Builder<'a> {
    /// The labels of `<svc>.<ns>` (the key of its name, less `svc.<zone>`), or `None`
    /// (reported) for unusable names.
    fn service_labels<'k>(&mut self, key: &'k ObjectKey) -> Option<&'k Arc<[u8]>> {
        let labels = key
            .labels()
            .filter(|labels| labels.len() + self.svc_key.as_bytes().len() <= MAX_KEY_LEN);
        if labels.is_none() {
            self.report.skipped.insert(key.to_string());
        }
        labels
    }

    /// The whole key of the name `labels` + `svc.<zone>`.
    fn full_key(&self, labels: &[u8]) -> Option<KeyBuf> {
        let mut key = KeyBuf::default();
        key.push_key(labels)?;
        key.push_key(self.svc_key.as_bytes())?;
        Some(key)
    }

    /// Every local service: ClusterIPs, ExternalName aliases, headless endpoints with their
    /// per-pod names, SRV and PTR.
    fn local_cluster(&mut self, state: &'a ClusterState, cluster: &Arc<str>) {
        let origin = Origin::Local {
            cluster: Arc::clone(cluster),
        };
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for (key, slice) in &state.endpoint_slices {
            slices.entry((key.namespace(), &slice.service)).or_default().push(slice);
        }
        for (key, svc) in &state.services {
            let Some(labels) = self.service_labels(key) else {
                continue;
            };
            match &svc.kind {
                ServiceKind::ClusterIp(ips) => {
                    self.ptr.claim(ips, [labels, self.svc_key.as_bytes()]);
                    let data = addresses(ips);
                    self.insert_service(labels, data, &origin, Some(Arc::clone(&svc.ports)));
                }
                ServiceKind::ExternalName(target) => {
                    if let Some(target) = fqdn(target) {
                        self.insert_service(labels, EntryData::Alias(target), &origin, None);
                    }
                }
                ServiceKind::Headless => {
                    let slices = slices
                        .get(&(key.namespace(), key.name()))
                        .map_or(&[][..], Vec::as_slice);
                    self.headless(labels, svc, slices, &origin);
                }
            }
        }
    }

    /// A local headless service. Without an endpoint to publish it gets no entry at all, so a
    /// remote copy can answer (failover) or, without one, the name does not exist.
    fn headless(&mut self, labels: &'a Arc<[u8]>, svc: &Service, slices: &[&EndpointSlice], origin: &Origin) {
        let Some(key) = self.full_key(labels) else { return };
        // Per-pod names: the hostname, or the address with dashes, under the service name.
        // Dual-stack services have one slice per family, whose pods share names.
        let mut pods: Vec<(KeyBuf, Vec<IpAddr>, &[ServicePort])> = Vec::new();
        let mut all = Vec::new();
        for slice in slices {
            for endpoint in slice.endpoints.iter().filter(|e| e.ready || svc.publish_not_ready) {
                all.extend(endpoint.addresses.iter().copied());
                let labels: Vec<(String, Vec<IpAddr>)> = match &endpoint.hostname {
                    Some(host) => vec![(host.clone(), endpoint.addresses.clone())],
                    None => endpoint.addresses.iter().map(|ip| (dashed(ip), vec![*ip])).collect(),
                };
                for (label, ips) in labels {
                    let mut pod_key = KeyBuf::default();
                    if pod_key
                        .push_label(label.as_bytes())
                        .and_then(|()| pod_key.push_key(key.as_bytes()))
                        .is_none()
                    {
                        continue;
                    }
                    match pods.iter_mut().find(|p| p.0.as_bytes() == pod_key.as_bytes()) {
                        Some(pod) => pod.1.extend(ips),
                        None => pods.push((pod_key, ips, &slice.ports)),
                    }
                }
            }
        }
        if all.is_empty() {
            return;
        }
        for (pod_key, ips, _) in &pods {
            self.ptr.claim(ips, [pod_key.as_bytes(), &[]]);
            let entry = Entry {
                data: Arc::new(addresses(ips)),
                origin: origin.clone(),
                ports: None,
            };
            self.entries.insert(pod_key.as_bytes(), entry);
        }
        // One SRV target per published pod, on the endpoint's port of the same name.
        let targets = |port: &ServicePort| {
            let targets = pods
                .iter()
                .map(|(pod_key, _, ports)| {
                    let endpoint_port = ports
                        .iter()
                        .find(|p| p.name == port.name && p.protocol == port.protocol)
                        .map_or(port.port, |p| p.port);
                    (pod_key.to_boxed(), endpoint_port)
                })
                .collect();
            EntryData::SrvPods(targets)
        };
        self.srv(&key, &svc.ports, targets, origin);
        self.insert_service(labels, addresses(&all), origin, None);
    }

    /// `_<port>._<proto>.<svc>` for every named port, and `_<proto>.<svc>` as an empty
    /// non-terminal.
    fn srv(&mut self, key: &KeyBuf, ports: &[ServicePort], data: impl Fn(&ServicePort) -> EntryData, origin: &Origin) {
        for port in ports {
            let Some(port_name) = &port.name else { continue };
            let proto = label_of(port.protocol);
            let mut proto_key = KeyBuf::default();
            if proto_key
                .push_label(proto)
                .and_then(|()| proto_key.push_key(key.as_bytes()))
                .is_none()
            {
                continue;
            }
            // `_` and the port name (at most 15 characters in Kubernetes) as one label.
            let mut label = [0u8; 64];
            let Some(rest) = label.get_mut(1..=port_name.len()) else {
                continue;
            };
            rest.copy_from_slice(port_name.as_bytes());
            label[0] = b'_';
            let mut srv_key = KeyBuf::default();
            if srv_key
                .push_label(&label[..=port_name.len()])
                .and_then(|()| srv_key.push_key(proto_key.as_bytes()))
                .is_none()
            {
                continue;
            }
            if !self.ents.contains(proto_key.as_bytes()) {
                self.ents.insert(proto_key.to_boxed());
            }
            let entry = Entry {
                data: Arc::new(data(port)),
                origin: origin.clone(),
                ports: None,
            };
            self.entries.insert(srv_key.as_bytes(), entry);
        }
    }

    /// A service's own name, and its namespace as an empty non-terminal.
    fn insert_service(
        &mut self,
        labels: &'a Arc<[u8]>,
        data: EntryData,
        origin: &Origin,
        ports: Option<Arc<[ServicePort]>>,
    ) {
        self.entries.insert_below(
            Arc::clone(labels),
            Entry {
                data: Arc::new(data),
                origin: origin.clone(),
                ports,
            },
        );
        self.namespace_exists(labels);
    }

    /// A service's namespace exists as an empty non-terminal (RFC 8020).
    fn namespace_exists(&mut self, labels: &'a [u8]) {
        if let Some(namespace) = ancestors(labels).next() {
            self.namespaces.insert(namespace);
        }
    }

    /// Remote-only services: which clusters hold each one (in cluster order), then one answer
    /// per distinct set of holders, shared by every service it covers.
    fn remote_clusters(&mut self, clusters: &[ClusterInput<'a>], names: &[Arc<str>], cluster_domain: &str) {
        let capacity = clusters.iter().map(|c| c.state.services.len()).max().unwrap_or(0);
        // Sets of holders are interned, so a service carries a set's index rather than a list
        // of its own: `sets[0]` is empty, and `grown` maps (set, cluster) to the set that adds
        // the cluster. Clusters come in order, so a set is the same list however it was reached.
        let mut sets: Vec<Vec<u16>> = vec![Vec::new()];
        let mut grown: HashMap<(usize, u16), usize> = HashMap::new();
        let mut remote: HashMap<&'a [u8], RemoteService> = HashMap::with_capacity(capacity);
        for (i, cluster) in clusters.iter().enumerate().filter(|(_, c)| !c.local) {
            let Ok(index) = u16::try_from(i) else { break };
            let state: &'a ClusterState = cluster.state;
            for (key, svc) in &state.services {
                // An ExternalName alias is resolved by each cluster's DNS; the gateway does not
                // route to it, so a remote one makes nothing reachable.
                if matches!(svc.kind, ServiceKind::ExternalName(_)) {
                    continue;
                }
                let Some(labels) = self.service_labels(key) else {
                    continue;
                };
                if self.entries.contains_below(labels) {
                    continue;
                }
                // The first holder's ports answer SRV. Both are taken now, while the service is
                // in cache, not when the entry is made.
                let service = remote.entry(labels).or_insert_with(|| RemoteService {
                    holders: 0,
                    labels: Arc::clone(labels),
                    ports: Arc::clone(&svc.ports),
                });
                service.holders = *grown.entry((service.holders, index)).or_insert_with(|| {
                    let mut set = sets.get(service.holders).cloned().unwrap_or_default();
                    set.push(index);
                    sets.push(set);
                    sets.len() - 1
                });
            }
        }
        // Refused addresses are left out here, where every answer is made, so no source or
        // override can slip one in; a cluster left with none counts as having no gateway.
        let gateways: Vec<Vec<Ingress>> = clusters
            .iter()
            .zip(names)
            .map(|(c, name)| {
                let (allowed, refused) = partition_gateways(&c.gateway_addresses(), cluster_domain);
                if !c.local && !refused.is_empty() {
                    self.report
                        .refused_gateways
                        .insert(name.to_string(), refused.into_iter().collect());
                }
                allowed
            })
            .collect();
        let mut answers: Vec<Option<Option<Entry>>> = vec![None; sets.len()];
        for (key, service) in remote {
            let (Some(answer), Some(set)) = (answers.get_mut(service.holders), sets.get(service.holders)) else {
                continue;
            };
            let entry = answer.get_or_insert_with(|| remote_entry(set, &gateways, names, &mut self.report));
            let Some(mut entry) = entry.clone() else { continue };
            if matches!(&*entry.data, EntryData::Addresses { .. }) {
                entry.ports = Some(service.ports);
            }
            self.entries.insert_below(service.labels, entry);
            self.namespace_exists(key);
        }
    }
}

/// A service only remote clusters hold, while the builder collects them.
struct RemoteService {
    /// Index of the set of clusters holding it.
    holders: usize,
    labels: Arc<[u8]>,
    ports: Arc<[ServicePort]>,
}

/// The first label of a key and the key of its parent.
fn split_label(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(*key.first()?);
    Some((key.get(1..1 + len)?, key.get(1 + len..)?))
}

/// The `_<proto>` label of a port protocol.
fn label_of(protocol: PortProtocol) -> &'static [u8] {
    match protocol {
        PortProtocol::Tcp => b"_tcp",
        PortProtocol::Udp => b"_udp",
        PortProtocol::Sctp => b"_sctp",
    }
}

/// CoreDNS's per-pod label for an endpoint without a hostname: the address with dashes.
pub fn dashed(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The answer for services held by exactly the clusters `holders`: their gateways' addresses.
fn remote_entry(
    holders: &[u16],
    gateways: &[Vec<Ingress>],
    names: &[Arc<str>],
    report: &mut BuildReport,
) -> Option<Entry> {
    let mut ips = Vec::new();
    let mut hosts = Vec::new();
    let mut serving = Vec::new();
    for &i in holders {
        let i = usize::from(i);
        if gateways[i].is_empty() {
            report.clusters_without_gateway.insert(names[i].to_string());
            continue;
        }
        serving.push(Arc::clone(&names[i]));
        for ingress in &gateways[i] {
            match ingress {
                Ingress::Ip(ip) => ips.push(*ip),
                Ingress::Hostname(h) => hosts.push(h.as_str()),
            }
        }
    }
    if serving.is_empty() {
        return None;
    }
    // A name cannot hold both a CNAME and addresses: addresses win, and among host names the
    // first in sort order, so every pod answers the same.
    let data = if !ips.is_empty() {
        addresses(&ips)
    } else {
        hosts.sort_unstable();
        EntryData::Alias(hosts.first().and_then(|h| fqdn(h))?)
    };
    Some(Entry {
        data: Arc::new(data),
        ports: None,
        origin: Origin::Remote {
            clusters: serving.into(),
        },
    })
}

fn addresses(ips: &[IpAddr]) -> EntryData {
    // Sized exactly: most services have one address, and growing from empty would allocate
    // room for four and go through the slower growth path.
    let v4_count = ips.iter().filter(|ip| ip.is_ipv4()).count();
    let mut v4 = Vec::with_capacity(v4_count);
    let mut v6 = Vec::with_capacity(ips.len() - v4_count);
    for &ip in ips {
        match ip {
            IpAddr::V4(a) if !v4.contains(&a) => v4.push(a),
            IpAddr::V6(a) if !v6.contains(&a) => v6.push(a),
            _ => {}
        }
    }
    EntryData::Addresses { v4, v6 }
}

/// A lowercase FQDN from text, or `None` if it is not a valid name.
pub fn fqdn(s: &str) -> Option<Name> {
    let mut name = Name::from_ascii(s.trim_end_matches('.')).ok()?.to_lowercase();
    name.set_fqdn(true);
    Some(name)
}

/// A record in wire format, names uncompressed (it is copied into messages at any offset).
/// Empty if hickory cannot encode it, which only a broken SOA could cause; the fast path then
/// leaves negative answers to the full path.
fn record_wire(record: &Record) -> Box<[u8]> {
    let mut bytes = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_canonical_form(true);
    match record.emit(&mut encoder) {
        Ok(()) => bytes.into_boxed_slice(),
        Err(_) => Box::default(),
    }
}

fn soa_record(zone: &Name, negative_ttl: u32, generation: u64) -> Record {
    let mname = Name::from_ascii("ns.dns")
        .ok()
        .and_then(|n| n.append_domain(zone).ok())
        .unwrap_or_else(|| zone.clone());
    let rname = Name::from_ascii("hostmaster")
        .ok()
        .and_then(|n| n.append_domain(zone).ok())
        .unwrap_or_else(|| zone.clone());
    // The serial changes with every rebuild so secondary tooling can see the table moved.
    let serial = u32::try_from(generation % u64::from(u32::MAX)).unwrap_or(0);
    let soa = SOA::new(mname, rname, serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, negative_ttl);
    // RFC 2308: the negative TTL is the lesser of the SOA's TTL and its minimum.
    Record::from_rdata(zone.clone(), negative_ttl, RData::SOA(soa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Service, ServicePort};

    pub(crate) fn svc(ips: &[&str]) -> Service {
        Service {
            kind: ServiceKind::ClusterIp(ips.iter().map(|s| s.parse().unwrap()).collect()),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: crate::cluster::PortProtocol::Tcp,
            }]
            .into(),
            publish_not_ready: false,
        }
    }

    fn settings() -> TableSettings {
        TableSettings {
            cluster_domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            search: vec![
                "sleep.svc.cluster.local".into(),
                "svc.cluster.local".into(),
                "cluster.local".into(),
                "corp.example".into(),
            ],
        }
    }

    #[test]
    fn local_wins_remote_fills_gaps_and_ents_exist() {
        let mut local = ClusterState::default();
        local
            .services
            .insert(ObjectKey::new("helloworld", "helloworld"), svc(&["10.96.120.15"]));
        let mut remote = ClusterState::default();
        remote
            .services
            .insert(ObjectKey::new("helloworld", "helloworld"), svc(&["10.112.4.20"]));
        remote
            .services
            .insert(ObjectKey::new("sample", "httpbin"), svc(&["10.112.30.2"]));
        remote.gateways.insert(
            ObjectKey::new("istio-system", "gw"),
            vec![Ingress::Ip("34.136.67.85".parse().unwrap())],
        );
        let inputs = [
            ClusterInput {
                name: "c1",
                local: true,
                state: &local,
                loaded: true,
                gateway_override: None,
            },
            ClusterInput {
                name: "c2",
                local: false,
                state: &remote,
                loaded: true,
                gateway_override: None,
            },
        ];
        let (table, report) = Table::build(&settings(), &inputs, 7);
        assert_eq!(report, BuildReport::default());
        let hw = table
            .get(&fqdn("HelloWorld.helloworld.svc.cluster.local").unwrap())
            .unwrap();
        assert_eq!(
            *hw.data,
            EntryData::Addresses {
                v4: vec!["10.96.120.15".parse().unwrap()],
                v6: vec![]
            }
        );
        let hb = table.get(&fqdn("httpbin.sample.svc.cluster.local").unwrap()).unwrap();
        assert_eq!(
            *hb.data,
            EntryData::Addresses {
                v4: vec!["34.136.67.85".parse().unwrap()],
                v6: vec![]
            }
        );
        assert!(matches!(&hb.origin, Origin::Remote { clusters } if clusters.len() == 1));
        let key = |s: &str| KeyBuf::from_name(&fqdn(s).unwrap()).unwrap();
        assert!(table.is_empty_non_terminal(key("sample.svc.cluster.local").as_bytes()));
        assert!(table.is_empty_non_terminal(key("svc.cluster.local").as_bytes()));
        assert!(!table.is_empty_non_terminal(key("cluster.local").as_bytes()));
        assert_eq!(table.search().len(), 3, "corp.example is outside the cluster domain");
        assert!(table.all_loaded());
        assert_eq!(table.generation(), 7);
    }

    #[test]
    fn gateways_merge_dedup_and_missing_gateways_are_reported() {
        let key = ObjectKey::new("ns", "api");
        let mk = |gw: Vec<Ingress>| {
            let mut s = ClusterState::default();
            s.services.insert(key.clone(), svc(&["10.0.0.1"]));
            if !gw.is_empty() {
                s.gateways.insert(ObjectKey::new("istio-system", "gw"), gw);
            }
            s
        };
        let ip = |s: &str| Ingress::Ip(s.parse().unwrap());
        let local = ClusterState::default();
        let c2 = mk(vec![ip("1.1.1.1"), ip("2001:db8::1")]);
        let c3 = mk(vec![ip("1.1.1.1"), ip("2.2.2.2")]);
        let c4 = mk(vec![]);
        let c5 = mk(vec![Ingress::Hostname("lb.example.com".into())]);
        let input = |name, state, over| ClusterInput {
            name,
            local: false,
            state,
            loaded: true,
            gateway_override: over,
        };
        let over = [ip("9.9.9.9")];
        let inputs = [
            ClusterInput {
                name: "c1",
                local: true,
                state: &local,
                loaded: true,
                gateway_override: None,
            },
            input("c2", &c2, None),
            input("c3", &c3, None),
            input("c4", &c4, None),
            input("c5", &c5, None),
        ];
        let (table, report) = Table::build(&settings(), &inputs, 1);
        let name = fqdn("api.ns.svc.cluster.local").unwrap();
        let EntryData::Addresses { v4, v6 } = &*table.get(&name).unwrap().data else {
            panic!()
        };
        assert_eq!(v4.len(), 2, "each address once: {v4:?}");
        assert_eq!(v6.len(), 1);
        assert_eq!(report.clusters_without_gateway, BTreeSet::from(["c4".to_string()]));

        // Host-name gateways alone give an alias; a static override replaces the reported one.
        let inputs = [inputs[0], input("c5", &c5, None)];
        let (table, _) = Table::build(&settings(), &inputs, 2);
        assert_eq!(
            *table.get(&name).unwrap().data,
            EntryData::Alias(fqdn("lb.example.com").unwrap())
        );
        let inputs = [inputs[0], input("c4", &c4, Some(&over))];
        let (table, report) = Table::build(&settings(), &inputs, 3);
        assert!(report.clusters_without_gateway.is_empty());
        assert_eq!(
            *table.get(&name).unwrap().data,
            EntryData::Addresses {
                v4: vec!["9.9.9.9".parse().unwrap()],
                v6: vec![]
            }
        );
    }

    #[test]
    fn refused_gateway_addresses_are_left_out_and_reported() {
        let ip = |s: &str| Ingress::Ip(s.parse().unwrap());
        let mk = |name: &str, gw: Vec<Ingress>| {
            let mut s = ClusterState::default();
            s.services.insert(ObjectKey::new("ns", name), svc(&["10.0.0.1"]));
            s.services.insert(ObjectKey::new("ns", "shared"), svc(&["10.0.0.2"]));
            s.gateways.insert(ObjectKey::new("istio-system", "gw"), gw);
            s
        };
        let local = ClusterState::default();
        let bad = mk("bad", vec![ip("127.0.0.1"), ip("169.254.169.254")]);
        let mixed = mk("mixed", vec![ip("::ffff:127.0.0.1"), ip("34.136.67.85")]);
        let host = mk(
            "host",
            vec![Ingress::Hostname("kube-dns.kube-system.svc.cluster.local".into())],
        );
        let input = |name, local, state, over| ClusterInput {
            name,
            local,
            state,
            loaded: true,
            gateway_override: over,
        };
        let over = [ip("0.0.0.0")];
        let inputs = [
            input("c1", true, &local, None),
            input("c2", false, &bad, None),
            input("c3", false, &mixed, None),
            input("c4", false, &host, None),
            input("c5", false, &mixed, Some(&over)),
        ];
        let (table, report) = Table::build(&settings(), &inputs, 1);
        let get = |n: &str| table.get(&fqdn(&format!("{n}.ns.svc.cluster.local")).unwrap());
        assert!(get("bad").is_none(), "only refused addresses: no answer");
        assert!(get("host").is_none(), "an alias into the cluster domain is refused");
        let v4 = vec!["34.136.67.85".parse().unwrap()];
        for name in ["mixed", "shared"] {
            let entry = get(name).unwrap();
            assert_eq!(
                *entry.data,
                EntryData::Addresses {
                    v4: v4.clone(),
                    v6: vec![]
                },
                "{name}"
            );
            assert!(matches!(&entry.origin, Origin::Remote { clusters } if **clusters == [Arc::from("c3")]));
        }
        let without: Vec<&str> = report.clusters_without_gateway.iter().map(String::as_str).collect();
        assert_eq!(without, ["c2", "c4", "c5"]);
        let shown: BTreeMap<&str, Vec<String>> = report
            .refused_gateways
            .iter()
            .map(|(c, r)| (c.as_str(), r.iter().map(ToString::to_string).collect()))
            .collect();
        let want: BTreeMap<&str, Vec<String>> = [
            ("c2", vec!["127.0.0.1 (loopback)", "169.254.169.254 (link-local)"]),
            ("c3", vec!["::ffff:127.0.0.1 (loopback)"]),
            (
                "c4",
                vec!["kube-dns.kube-system.svc.cluster.local (inside the cluster domain)"],
            ),
            ("c5", vec!["0.0.0.0 (unspecified)"]),
        ]
        .into_iter()
        .map(|(c, r)| (c, r.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(shown, want);
    }

    #[test]
    fn remote_without_any_gateway_is_not_in_table() {
        let local = ClusterState::default();
        let mut remote = ClusterState::default();
        remote.services.insert(ObjectKey::new("ns", "only"), svc(&["10.0.0.1"]));
        let inputs = [
            ClusterInput {
                name: "c1",
                local: true,
                state: &local,
                loaded: true,
                gateway_override: None,
            },
            ClusterInput {
                name: "c2",
                local: false,
                state: &remote,
                loaded: false,
                gateway_override: None,
            },
        ];
        let (table, report) = Table::build(&settings(), &inputs, 1);
        assert!(table.get(&fqdn("only.ns.svc.cluster.local").unwrap()).is_none());
        assert!(!table.all_loaded());
        assert_eq!(report.clusters_without_gateway.len(), 1);
    }

    #[test]
    fn a_shared_address_points_to_the_smallest_name() {
        let mut local = ClusterState::default();
        for (name, ips) in [
            ("b", &["10.0.0.1", "10.0.0.2"][..]),
            ("a", &["10.0.0.1"]),
            ("c", &["10.0.0.1", "10.0.0.3"]),
        ] {
            local.services.insert(ObjectKey::new("ns", name), svc(ips));
        }
        let inputs = [ClusterInput {
            name: "c1",
            local: true,
            state: &local,
            loaded: true,
            gateway_override: None,
        }];
        let (table, _) = Table::build(&settings(), &inputs, 1);
        let ptr = |ip: &str| table.ptr(&ip.parse().unwrap()).and_then(to_name).map(|n| n.to_string());
        assert_eq!(ptr("10.0.0.1").as_deref(), Some("a.ns.svc.cluster.local."));
        assert_eq!(ptr("10.0.0.2").as_deref(), Some("b.ns.svc.cluster.local."));
        assert_eq!(ptr("10.0.0.3").as_deref(), Some("c.ns.svc.cluster.local."));
        assert_eq!(ptr("10.0.0.4"), None);
    }

    #[test]
    fn names_too_long_for_the_zone_are_skipped_and_reported() {
        // Four 58-byte labels: the zone fits, `web.ns` under it fits, a 63-byte name does not.
        let label = "z".repeat(58);
        let settings = TableSettings {
            cluster_domain: [label.as_str(); 4].join("."),
            ..settings()
        };
        let long = "l".repeat(63);
        let mut local = ClusterState::default();
        local.services.insert(ObjectKey::new("ns", "web"), svc(&["10.0.0.1"]));
        local.services.insert(ObjectKey::new("ns", &long), svc(&["10.0.0.2"]));
        let inputs = [ClusterInput {
            name: "c1",
            local: true,
            state: &local,
            loaded: true,
            gateway_override: None,
        }];
        let (table, report) = Table::build(&settings, &inputs, 1);
        assert_eq!(report.skipped, BTreeSet::from([format!("ns/{long}")]));
        let web = Name::from_ascii("web.ns.svc")
            .unwrap()
            .append_domain(table.cluster_domain())
            .unwrap();
        assert!(table.get(&web).is_some());
        assert!(table.ptr(&"10.0.0.2".parse().unwrap()).is_none());
        assert_eq!(table.iter().filter(|(name, _)| name.as_ref() == Some(&web)).count(), 1);
    }
}
