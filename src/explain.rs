//! Why a name resolves as it does. [`explain`] runs the real answer rules
//! ([`crate::lookup::resolve`]) over a table and says which rule answered and which clusters the
//! answer came from, or why the question would go upstream. `meshdns explain` prints it, the
//! admin server's `/debug/table` uses it, and both describe table entries through
//! [`describe_entry`].

use std::fmt::{self, Write as _};
use std::net::SocketAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde::Serialize;

use crate::hub::ClusterStatus;
use crate::lookup::{self, Resolution, Rule};
use crate::table::{Entry, EntryData, Origin, Table};

/// One record as `explain` and `/debug/table` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordView {
    pub name: String,
    pub ttl: u32,
    #[serde(rename = "type")]
    pub rtype: String,
    pub data: String,
}

impl From<&Record> for RecordView {
    fn from(record: &Record) -> Self {
        Self {
            name: record.name.to_string(),
            ttl: record.ttl,
            rtype: record.record_type().to_string(),
            data: record.data.to_string(),
        }
    }
}

impl fmt::Display for RecordView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} IN {} {}", self.name, self.ttl, self.rtype, self.data)
    }
}

/// What meshdns would do with one question, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub name: String,
    #[serde(rename = "type")]
    pub qtype: String,
    /// `answer` (meshdns answers itself) or `forward`.
    pub action: &'static str,
    /// The rule that answered ([`Rule::as_str`]), or `forward`.
    pub rule: &'static str,
    /// The response code of a local answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    pub answers: Vec<RecordView>,
    pub authority: Vec<RecordView>,
    pub additionals: Vec<RecordView>,
    /// An alias whose target's addresses meshdns would fetch upstream into the same answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chase: Option<String>,
    /// The clusters the answer comes from.
    pub clusters: Vec<String>,
    /// Where a forwarded question would go, in order.
    pub upstreams: Vec<String>,
    pub reason: String,
}

/// What `explain` needs to know besides the table.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub upstreams: Vec<SocketAddr>,
    pub clusters: Vec<ClusterStatus>,
}

/// One table name with its records and why it holds them; the rows of `/debug/table`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryView {
    pub name: String,
    pub records: Vec<String>,
    pub reason: String,
    pub clusters: Vec<String>,
}

/// The record types a table entry holds, and what kind of answer it is. The one place that
/// knows the entry kinds: a new kind needs one arm here.
fn entry_kind(data: &EntryData) -> (&'static [RecordType], &'static str) {
    match data {
        EntryData::Addresses { .. } => (&[RecordType::A, RecordType::AAAA], "ClusterIP"),
        EntryData::Alias(_) => (&[RecordType::CNAME], "alias"),
        EntryData::SrvPods(_) => (&[RecordType::SRV], "SRV"),
        EntryData::Txt(_) => (&[RecordType::TXT], "TXT"),
    }
}

/// Why an entry is in the table, as `local ClusterIP, cluster-1` or
/// `gateways of cluster-2, cluster-3`, and the clusters it comes from.
fn entry_reason(entry: &Entry) -> (String, Vec<String>) {
    let (_, kind) = entry_kind(&entry.data);
    match &entry.origin {
        Origin::Local { cluster } => (format!("local {kind}, {cluster}"), vec![cluster.to_string()]),
        Origin::Remote { clusters } => {
            let names: Vec<String> = clusters.iter().map(ToString::to_string).collect();
            let via = match &*entry.data {
                EntryData::Addresses { .. } => String::new(),
                _ => format!(" ({kind})"),
            };
            (format!("gateways of {}{via}", names.join(", ")), names)
        }
    }
}

/// A table entry's records (as the rules answer them) and its reason.
pub fn describe_entry(table: &Table, name: &Name, entry: &Entry) -> EntryView {
    let (types, _) = entry_kind(&entry.data);
    let mut records = Vec::new();
    for qtype in types {
        if let Resolution::Local(answer) = lookup::resolve(table, name, *qtype) {
            records.extend(answer.answers.iter().map(|r| format!("{} {}", r.record_type(), r.data)));
        }
    }
    let (reason, clusters) = entry_reason(entry);
    EntryView {
        name: name.to_string(),
        records,
        reason,
        clusters,
    }
}

/// Every table entry, sorted by name.
pub fn table_entries(table: &Table) -> Vec<EntryView> {
    let mut rows: Vec<EntryView> = table
        .iter()
        .filter_map(|(name, entry)| Some(describe_entry(table, &name?, entry)))
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// What meshdns would answer for `name` (taken as absolute, as a resolver sends it after its
/// search walk) and `qtype`, class IN.
pub fn explain(table: &Table, name: &Name, qtype: RecordType, context: &Context) -> Explanation {
    let mut name = name.clone();
    name.set_fqdn(true);
    let base = Explanation {
        name: name.to_string(),
        qtype: qtype.to_string(),
        action: "forward",
        rule: "forward",
        rcode: None,
        answers: Vec::new(),
        authority: Vec::new(),
        additionals: Vec::new(),
        chase: None,
        clusters: Vec::new(),
        upstreams: context.upstreams.iter().map(ToString::to_string).collect(),
        reason: String::new(),
    };
    match lookup::resolve(table, &name, qtype) {
        Resolution::Forward => {
            let why = forward_reason(table, &name, context);
            let to: Vec<String> = context.upstreams.iter().map(ToString::to_string).collect();
            Explanation {
                reason: format!("would forward upstream to {}: {why}", to.join(", ")),
                ..base
            }
        }
        Resolution::Local(answer) => {
            let (reason, clusters) = local_reason(table, &name, qtype, answer.rule, &answer.answers, context);
            let mut reason = reason;
            if let Some(target) = &answer.chase {
                let _ = write!(
                    reason,
                    "; the {qtype} records of {target} would be fetched upstream into the same answer"
                );
            }
            Explanation {
                action: "answer",
                rule: answer.rule.as_str(),
                rcode: Some(rcode_text(answer.rcode)),
                answers: answer.answers.iter().map(RecordView::from).collect(),
                authority: answer.soa.iter().map(RecordView::from).collect(),
                additionals: answer.additionals.iter().map(RecordView::from).collect(),
                chase: answer.chase.as_ref().map(ToString::to_string),
                clusters,
                upstreams: Vec::new(),
                reason,
                ..base
            }
        }
    }
}

fn rcode_text(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        other => other.to_string().to_uppercase(),
    }
}

fn local_reason(
    table: &Table,
    name: &Name,
    qtype: RecordType,
    rule: Rule,
    answers: &[Record],
    context: &Context,
) -> (String, Vec<String>) {
    match rule {
        Rule::Table => match table.get(name) {
            Some(entry) => entry_reason(entry),
            None => (format!("{name} is answered from the table"), Vec::new()),
        },
        Rule::SearchShortcut => {
            let canonical = answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target) => Some(target.0.clone()),
                _ => None,
            });
            let Some(canonical) = canonical else {
                return ("search shortcut".into(), Vec::new());
            };
            let (why, clusters) = table.get(&canonical).map(entry_reason).unwrap_or_default();
            (
                format!("search shortcut of {canonical}: the name the pod's search walk would try next ({why})"),
                clusters,
            )
        }
        Rule::NoData => match table.get(name) {
            Some(entry) => {
                let (why, clusters) = entry_reason(entry);
                (
                    format!("NODATA: {name} exists ({why}) but has no {qtype} records"),
                    clusters,
                )
            }
            None => (
                format!("NODATA: {name} has table names below it (an empty non-terminal), but no records of its own"),
                Vec::new(),
            ),
        },
        Rule::NxDomain => (nxdomain_reason(table, name, context.clusters.len()), Vec::new()),
    }
}

fn nxdomain_reason(table: &Table, name: &Name, clusters: usize) -> String {
    let below = usize::from(name.num_labels()).saturating_sub(usize::from(table.svc_zone().num_labels()));
    let label = |i: usize| {
        name.iter()
            .nth(i)
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .unwrap_or_default()
    };
    let clusters = match clusters {
        1 => "the 1 cluster".to_string(),
        n => format!("any of {n} clusters"),
    };
    match below {
        1 => format!("NXDOMAIN: no service in namespace {} in {clusters}", label(0)),
        2 => format!(
            "NXDOMAIN: no service {} in namespace {} in {clusters}",
            label(0),
            label(1)
        ),
        _ => format!("NXDOMAIN: no name {name} below {} in {clusters}", table.svc_zone()),
    }
}

fn forward_reason(table: &Table, name: &Name, context: &Context) -> String {
    if !table.cluster_domain().zone_of(name) {
        let reverse = ["in-addr.arpa.", "ip6.arpa."]
            .iter()
            .filter_map(|z| Name::from_ascii(z).ok())
            .any(|zone| zone.zone_of(name));
        if reverse {
            return "a reverse name of no local ClusterIP or endpoint".into();
        }
        return format!("outside the cluster domain {}", table.cluster_domain());
    }
    if !table.svc_zone().zone_of(name) {
        return format!(
            "not below {}: pod names and the zone apex are the cluster's own DNS's to answer",
            table.svc_zone()
        );
    }
    if !table.all_loaded() {
        let missing: Vec<&str> = context
            .clusters
            .iter()
            .filter(|c| !c.loaded)
            .map(|c| c.name.as_str())
            .collect();
        return format!(
            "not every cluster has loaded (missing: {}), so names the table lacks are not denied yet",
            missing.join(", ")
        );
    }
    "the answer rules leave it to the cluster's DNS".into()
}

/// The explanation as `meshdns explain` prints it.
pub fn render_text(explanation: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} {}", explanation.name, explanation.qtype);
    match explanation.rcode.as_deref() {
        Some(rcode) => {
            let _ = writeln!(out, "answer: {rcode}, authoritative (rule: {})", explanation.rule);
            for (section, records) in [
                ("answer", &explanation.answers),
                ("authority", &explanation.authority),
                ("additional", &explanation.additionals),
            ] {
                for record in records {
                    let _ = writeln!(out, "  {section:<10} {record}");
                }
            }
        }
        None => {
            let _ = writeln!(out, "forward");
        }
    }
    let _ = writeln!(out, "why: {}", explanation.reason);
    if !explanation.clusters.is_empty() {
        let _ = writeln!(out, "clusters: {}", explanation.clusters.join(", "));
    }
    out
}
