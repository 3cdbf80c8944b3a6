//! The answer rules: given a table snapshot and a question, decide what meshdns answers or
//! that the question goes upstream. Pure functions over [`Table`], no I/O, so every rule is
//! testable without sockets.

use hickory_proto::op::ResponseCode;
use std::net::{IpAddr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rand::Rng;
use rand::seq::SliceRandom;

use crate::name_key::{KeyBuf, ancestors, to_name};
use crate::table::{Entry, EntryData, Found, Table};

/// Which rule produced a local answer; used for logs and metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The name is in the table.
    Table,
    /// The name is a table name with one of the pod's search domains appended.
    SearchShortcut,
    /// The name is an empty non-terminal of the table, or a table name asked for a type it
    /// does not hold.
    NoData,
    /// Below `svc.<zone>`, every cluster loaded, and no table name or shortcut matches.
    NxDomain,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Table => "local",
            Self::SearchShortcut => "search_shortcut",
            Self::NoData => "local_nodata",
            Self::NxDomain => "local_nxdomain",
        }
    }
}

/// An answer meshdns gives itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAnswer {
    pub rule: Rule,
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    /// The zone's SOA for the authority section of negative answers (RFC 2308).
    pub soa: Option<Record>,
    /// Records for the additional section (the addresses of SRV targets).
    pub additionals: Vec<Record>,
    /// The answer ends in a CNAME to a name the table does not hold; its addresses of the
    /// asked type must come from upstream so that stub resolvers get them in one answer.
    pub chase: Option<Name>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Local(Box<LocalAnswer>),
    Forward,
}

/// Where a question's name stands, before its type is looked at. The one place that orders the
/// rules, shared by [`resolve`] and the UDP fast path ([`crate::fast`]), which answer from it.
// The key is kept on the stack: boxing it would allocate on every search-shortcut answer.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Decision<'t> {
    /// The name is in the table.
    Found(Found<'t>),
    /// The name is a table name with a search domain appended; this is the table name.
    Shortcut(KeyBuf),
    /// Outside the cluster domain: a reverse name the table may answer, or upstream's.
    OutsideZone,
    /// An empty non-terminal below `svc.<zone>`: NODATA.
    EmptyNonTerminal,
    /// Below `svc.<zone>`, every cluster loaded, and nothing matches: NXDOMAIN.
    NxDomain,
    Forward,
}

/// Decides where the name of `key` stands.
pub fn decide<'t>(table: &'t Table, key: &'t [u8]) -> Decision<'t> {
    if let Some(found) = table.find(key) {
        return Decision::Found(found);
    }
    if !in_zone(key, table.cluster_domain_key()) {
        return Decision::OutsideZone;
    }
    if let Some(canonical) = search_shortcut(table, key) {
        return Decision::Shortcut(canonical);
    }
    if !in_zone(key, table.svc_zone_key()) {
        // Other names of the cluster domain (pods, the apex) belong to the cluster's DNS.
        return Decision::Forward;
    }
    if table.is_empty_non_terminal(key) {
        return Decision::EmptyNonTerminal;
    }
    if !table.all_loaded() {
        return Decision::Forward;
    }
    Decision::NxDomain
}

/// Decides the answer for `qname` (as the client spelled it, which the answer keeps) and `qtype`.
pub fn resolve(table: &Table, qname: &Name, qtype: RecordType) -> Resolution {
    let Some(key) = KeyBuf::from_name(qname) else {
        return Resolution::Forward;
    };
    match decide(table, key.as_bytes()) {
        Decision::Found(found) => answer_found(table, qname, found, qtype, Vec::new(), Rule::Table),
        Decision::OutsideZone => reverse(table, qname, qtype),
        Decision::Shortcut(canonical_key) => {
            let (Some(found), Some(canonical)) =
                (table.find(canonical_key.as_bytes()), to_name(canonical_key.as_bytes()))
            else {
                return Resolution::Forward;
            };
            let alias = record(qname.clone(), table.ttl(), RData::CNAME(CNAME(canonical.clone())));
            if qtype == RecordType::CNAME {
                return local(Rule::SearchShortcut, ResponseCode::NoError, vec![alias], None, None);
            }
            answer_found(table, &canonical, found, qtype, vec![alias], Rule::SearchShortcut)
        }
        Decision::EmptyNonTerminal => local(
            Rule::NoData,
            ResponseCode::NoError,
            Vec::new(),
            Some(table.soa().clone()),
            None,
        ),
        Decision::NxDomain => local(
            Rule::NxDomain,
            ResponseCode::NXDomain,
            Vec::new(),
            Some(table.soa().clone()),
            None,
        ),
        Decision::Forward => Resolution::Forward,
    }
}

/// Whether the name of `key` is `zone` or lies below it: `zone` is `key` or one of its tails
/// that starts at a label (keys are label sequences, so no other tail can match).
pub fn in_zone(key: &[u8], zone: &[u8]) -> bool {
    zone.is_empty() || key == zone || ancestors(key).any(|tail| tail == zone)
}

/// The table name that the client's search walk would reach next, if `key` is a table name
/// with an in-zone search domain appended: the later search domains in order, then the name
/// as an absolute one (what glibc and musl try after the search list).
fn search_shortcut(table: &Table, key: &[u8]) -> Option<KeyBuf> {
    let search = table.search_keys();
    for (i, domain) in search.iter().enumerate() {
        // At least one label before the domain, and the domain a tail at a label start.
        let Some(relative) = key
            .len()
            .checked_sub(domain.len())
            .filter(|&at| at > 0 && ancestors(key).any(|tail| tail.len() == domain.len()))
            .and_then(|at| (key.get(at..)? == &domain[..]).then(|| key.get(..at))?)
        else {
            continue;
        };
        let later = search[i + 1..].iter().map(|k| &k[..]);
        for suffix in later.chain(std::iter::once(&[][..])) {
            let mut candidate = KeyBuf::default();
            if candidate
                .push_key(relative)
                .and_then(|()| candidate.push_key(suffix))
                .is_none()
            {
                continue;
            }
            if table.find(candidate.as_bytes()).is_some() {
                return Some(candidate);
            }
        }
    }
    None
}

/// PTR for the reverse name of a local ClusterIP or headless endpoint IP; every other name
/// outside the cluster domain, other reverse names included, goes upstream. Gateway addresses
/// get no PTR: many services share them.
fn reverse(table: &Table, qname: &Name, qtype: RecordType) -> Resolution {
    let Some(target) = reverse_ip(qname).and_then(|ip| table.ptr(&ip)).and_then(to_name) else {
        return Resolution::Forward;
    };
    if matches!(qtype, RecordType::PTR | RecordType::ANY) {
        let answer = record(qname.clone(), table.ttl(), RData::PTR(PTR(target.clone())));
        return local(Rule::Table, ResponseCode::NoError, vec![answer], None, None);
    }
    local(
        Rule::NoData,
        ResponseCode::NoError,
        Vec::new(),
        Some(table.soa().clone()),
        None,
    )
}

/// The address of a full-length `in-addr.arpa` or nibble-form `ip6.arpa` name.
pub fn reverse_ip(qname: &Name) -> Option<IpAddr> {
    let labels: Vec<&[u8]> = qname.iter().collect();
    let (digits, zone) = labels.split_at(labels.len().checked_sub(2)?);
    let [first, second] = zone else { return None };
    let text = |l: &[u8]| std::str::from_utf8(l).ok().map(str::to_ascii_lowercase);
    match (text(first)?.as_str(), text(second)?.as_str()) {
        ("in-addr", "arpa") if digits.len() == 4 => {
            let mut octets = [0u8; 4];
            for (octet, label) in octets.iter_mut().rev().zip(digits) {
                let s = std::str::from_utf8(label).ok()?;
                // Reject forms like "010" that would alias another name.
                if s.len() > 1 && s.starts_with('0') {
                    return None;
                }
                *octet = s.parse().ok()?;
            }
            Some(IpAddr::from(octets))
        }
        ("ip6", "arpa") if digits.len() == 32 => {
            let mut value: u128 = 0;
            for label in digits.iter().rev() {
                let [nibble] = label else { return None };
                value = (value << 4) | u128::from(char::from(*nibble).to_digit(16)?);
            }
            Some(IpAddr::from(Ipv6Addr::from(value)))
        }
        _ => None,
    }
}

/// The answer for a name the table knows, as `owner`.
fn answer_found(
    table: &Table,
    owner: &Name,
    found: Found<'_>,
    qtype: RecordType,
    answers: Vec<Record>,
    rule: Rule,
) -> Resolution {
    let srv_query = matches!(qtype, RecordType::SRV | RecordType::ANY);
    match found {
        Found::Entry(entry) => answer_entry(table, owner, entry, qtype, answers, rule),
        Found::Srv { target, port } if srv_query => {
            srv_answer(table, owner, std::iter::once((target, port)), answers, rule)
        }
        Found::Srv { .. } | Found::ProtoLevel => {
            let rule = if rule == Rule::Table { Rule::NoData } else { rule };
            local(rule, ResponseCode::NoError, answers, Some(table.soa().clone()), None)
        }
    }
}

fn answer_entry(
    table: &Table,
    owner: &Name,
    entry: &Entry,
    qtype: RecordType,
    mut answers: Vec<Record>,
    rule: Rule,
) -> Resolution {
    let ttl = table.ttl();
    match &*entry.data {
        EntryData::Alias(target) => {
            answers.push(record(owner.clone(), ttl, RData::CNAME(CNAME(target.clone()))));
            let chase = matches!(qtype, RecordType::A | RecordType::AAAA).then(|| target.clone());
            local(rule, ResponseCode::NoError, answers, None, chase)
        }
        EntryData::Addresses { v4, v6 } => {
            let want_v4 = matches!(qtype, RecordType::A | RecordType::ANY);
            let want_v6 = matches!(qtype, RecordType::AAAA | RecordType::ANY);
            let before = answers.len();
            if want_v4 {
                answers.extend(v4.iter().map(|ip| record(owner.clone(), ttl, RData::A(A(*ip)))));
            }
            if want_v6 {
                answers.extend(v6.iter().map(|ip| record(owner.clone(), ttl, RData::AAAA(AAAA(*ip)))));
            }
            if answers.len() == before {
                // NODATA, never NXDOMAIN: musl drops a name when either family is NXDOMAIN.
                let rule = if rule == Rule::Table { Rule::NoData } else { rule };
                return local(rule, ResponseCode::NoError, answers, Some(table.soa().clone()), None);
            }
            local(rule, ResponseCode::NoError, answers, None, None)
        }
        EntryData::SrvPods(pods) if matches!(qtype, RecordType::SRV | RecordType::ANY) => {
            srv_answer(table, owner, pods.iter().map(|(k, p)| (&k[..], *p)), answers, rule)
        }
        EntryData::Txt(strings) if matches!(qtype, RecordType::TXT | RecordType::ANY) => {
            answers.push(record(owner.clone(), ttl, RData::TXT(TXT::new(strings.clone()))));
            local(rule, ResponseCode::NoError, answers, None, None)
        }
        EntryData::SrvPods(_) | EntryData::Txt(_) => {
            let rule = if rule == Rule::Table { Rule::NoData } else { rule };
            local(rule, ResponseCode::NoError, answers, Some(table.soa().clone()), None)
        }
    }
}

/// SRV records to `targets` (name key, port), with the targets' addresses as additionals.
fn srv_answer<'k>(
    table: &Table,
    owner: &Name,
    targets: impl ExactSizeIterator<Item = (&'k [u8], u16)>,
    mut answers: Vec<Record>,
    rule: Rule,
) -> Resolution {
    let ttl = table.ttl();
    // Weight spreads load evenly over the targets, as CoreDNS does.
    let weight = u16::try_from(100 / targets.len().max(1)).unwrap_or(100);
    let mut additionals = Vec::new();
    for (key, port) in targets {
        let Some(target) = to_name(key) else { continue };
        if let Some(EntryData::Addresses { v4, v6 }) = table.get_key(key).map(|e| &*e.data) {
            additionals.extend(v4.iter().map(|ip| record(target.clone(), ttl, RData::A(A(*ip)))));
            additionals.extend(v6.iter().map(|ip| record(target.clone(), ttl, RData::AAAA(AAAA(*ip)))));
        }
        answers.push(record(
            owner.clone(),
            ttl,
            RData::SRV(SRV::new(0, weight, port, target)),
        ));
    }
    let mut answer = LocalAnswer::new(rule, ResponseCode::NoError, answers, None, None);
    answer.additionals = additionals;
    Resolution::Local(Box::new(answer))
}

fn local(
    rule: Rule,
    rcode: ResponseCode,
    answers: Vec<Record>,
    soa: Option<Record>,
    chase: Option<Name>,
) -> Resolution {
    Resolution::Local(Box::new(LocalAnswer::new(rule, rcode, answers, soa, chase)))
}

impl LocalAnswer {
    fn new(rule: Rule, rcode: ResponseCode, answers: Vec<Record>, soa: Option<Record>, chase: Option<Name>) -> Self {
        Self {
            rule,
            rcode,
            answers,
            soa,
            additionals: Vec::new(),
            chase,
        }
    }
}

fn record(name: Name, ttl: u32, rdata: RData) -> Record {
    Record::from_rdata(name, ttl, rdata)
}

/// Shuffles the address records of an answer (they follow any CNAMEs), so clients that take
/// the first address spread over all of them.
pub fn shuffle_addresses<R: Rng + ?Sized>(answers: &mut [Record], rng: &mut R) {
    let first = answers
        .iter()
        .position(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
        .unwrap_or(answers.len());
    answers[first..].shuffle(rng);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterState, ObjectKey, PortProtocol, Service, ServiceKind, ServicePort};
    use crate::table::{ClusterInput, TableSettings, fqdn};

    fn svc(kind: ServiceKind) -> Service {
        Service {
            kind,
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: PortProtocol::Tcp,
            }]
            .into(),
            publish_not_ready: false,
        }
    }

    fn table(loaded: bool, search: &[&str]) -> Table {
        let mut local = ClusterState::default();
        let ip = |s: &str| s.parse().unwrap();
        local.services.insert(
            ObjectKey::new("a", "web"),
            svc(ServiceKind::ClusterIp(vec![ip("10.0.0.1")])),
        );
        local.services.insert(
            ObjectKey::new("b", "web"),
            svc(ServiceKind::ClusterIp(vec![ip("10.0.0.2")])),
        );
        local
            .services
            .insert(ObjectKey::new("a", "db"), svc(ServiceKind::Headless));
        let settings = TableSettings {
            cluster_domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            search: search.iter().map(ToString::to_string).collect(),
        };
        let inputs = [ClusterInput {
            name: "c1",
            local: true,
            state: &local,
            loaded,
            gateway_override: None,
        }];
        Table::build(&settings, &inputs, 1).0
    }

    fn first_answer(res: &Resolution) -> Option<String> {
        match res {
            Resolution::Local(a) => a.answers.last().map(|r| r.data.to_string()),
            Resolution::Forward => None,
        }
    }

    #[test]
    fn unknown_names_are_forwarded_until_every_cluster_loaded() {
        let name = fqdn("nope.a.svc.cluster.local").unwrap();
        assert_eq!(resolve(&table(false, &[]), &name, RecordType::A), Resolution::Forward);
        let Resolution::Local(answer) = resolve(&table(true, &[]), &name, RecordType::A) else {
            panic!()
        };
        assert_eq!(answer.rule, Rule::NxDomain);
        // Known names answer even before everything loaded.
        let known = fqdn("web.a.svc.cluster.local").unwrap();
        assert_eq!(
            first_answer(&resolve(&table(false, &[]), &known, RecordType::A)).as_deref(),
            Some("10.0.0.1")
        );
    }

    #[test]
    fn headless_without_endpoints_does_not_exist_and_reverse_names_parse() {
        let t = table(true, &["a.svc.cluster.local"]);
        for name in ["db.a.svc.cluster.local", "db-0.db.a.svc.cluster.local"] {
            let res = resolve(&t, &fqdn(name).unwrap(), RecordType::A);
            assert!(
                matches!(&res, Resolution::Local(a) if a.rule == Rule::NxDomain),
                "{name}: {res:?}"
            );
        }
        let cases = [
            ("10.3.76.10.in-addr.arpa.", Some("10.76.3.10")),
            ("1.0.0.10.IN-ADDR.ARPA.", Some("10.0.0.1")),
            ("3.76.10.in-addr.arpa.", None),
            ("010.3.76.10.in-addr.arpa.", None),
            ("256.3.76.10.in-addr.arpa.", None),
            (
                "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
                Some("fd00::5"),
            ),
            ("5.0.ip6.arpa.", None),
            ("example.com.", None),
        ];
        for (name, want) in cases {
            let got = reverse_ip(&Name::from_ascii(name).unwrap());
            assert_eq!(got, want.map(|w| w.parse().unwrap()), "{name}");
        }
        let ptr = resolve(
            &t,
            &Name::from_ascii("1.0.0.10.in-addr.arpa.").unwrap(),
            RecordType::PTR,
        );
        assert_eq!(first_answer(&ptr).as_deref(), Some("web.a.svc.cluster.local."));
        let other = resolve(&t, &Name::from_ascii("9.9.9.9.in-addr.arpa.").unwrap(), RecordType::PTR);
        assert_eq!(
            other,
            Resolution::Forward,
            "reverse names meshdns does not own go upstream"
        );
    }

    #[test]
    fn shortcut_follows_the_search_order_after_the_matched_domain() {
        // From namespace b, `web.a` walks web.a.b.svc..., web.a.svc..., so web.a.b.svc... is
        // answered with web.a.svc..., not with the pod's own namespace's web.
        let t = table(true, &["b.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        let res = resolve(&t, &fqdn("web.a.b.svc.cluster.local").unwrap(), RecordType::A);
        assert_eq!(first_answer(&res).as_deref(), Some("10.0.0.1"));
        // `web` alone from namespace b is web.b.svc..., an exact name, not a shortcut.
        let res = resolve(&t, &fqdn("web.b.svc.cluster.local").unwrap(), RecordType::A);
        assert!(matches!(&res, Resolution::Local(a) if a.rule == Rule::Table));
        // Only domains after the matched one are tried: web.svc.cluster.local + b... is not
        // rewritten into an earlier domain.
        let res = resolve(&t, &fqdn("web.svc.cluster.local").unwrap(), RecordType::A);
        assert!(
            matches!(&res, Resolution::Local(a) if a.rule == Rule::NxDomain),
            "{res:?}"
        );
    }

    #[test]
    fn names_outside_the_cluster_domain_are_forwarded() {
        let t = table(true, &[]);
        for name in [
            "example.com",
            "cluster.local.example.com",
            "local",
            "web.a.svc.cluster.localhost",
        ] {
            assert_eq!(
                resolve(&t, &fqdn(name).unwrap(), RecordType::A),
                Resolution::Forward,
                "{name}"
            );
        }
    }
}
