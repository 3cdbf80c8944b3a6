//! The fast answer path: the common questions, an A or AAAA query for a name the table holds
//! (directly or through a search domain the client appended) and a question about a name the
//! table denies (NXDOMAIN) or holds nothing of (NODATA), answered straight from the datagram's
//! bytes into a reply buffer, without building a hickory `Request`, without allocating and
//! without spawning a task. Which rule applies is decided by [`lookup::decide`], the same
//! function the full path uses.
//!
//! It is a pure function over a table snapshot, like [`crate::lookup`], and deliberately
//! narrow: it answers only what it can answer exactly as the full path would (the same header
//! flags, records, TTLs, SOA and EDNS), and declines everything else, which then takes the
//! full path through [`crate::handler`]. Declining is always safe, so every check here errs on
//! the side of declining: a name with a compression pointer, a second question, an unknown
//! EDNS version, trailing bytes or an answer that would not fit the client's buffer all go the
//! full way, where hickory-proto parses them and truncates properly.
//!
//! The reply reuses the query's own question bytes, so the client's spelling (0x20 mixed case)
//! comes back as sent, and every answer record names the question by a compression pointer to
//! it (offset 12). Address records are written here (a fixed 16 or 28 bytes each); the SOA
//! of negative answers is encoded by hickory-proto once per table build
//! ([`Table::soa_wire`]). The tests and the `handler_datagram` fuzz target compare this path
//! with the full one.

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::RecordType;

use crate::lookup::{self, Decision as Lookup, Rule};
use crate::name_key::KeyBuf;
use crate::table::{EntryData, Found, Table};
use crate::wire::{
    CLASS_IN, EDNS_DO, EDNS_VERSION, FLAG_AA, FLAG_CD, FLAG_QR, FLAG_RA, FLAG_RD, FLAG_TC, HEADER_LEN, MAX_LABEL,
    MAX_NAME_WIRE, OPCODE_MASK, RCODE_NO_ERROR, RCODE_NX_DOMAIN, TYPE_A, TYPE_AAAA, TYPE_AXFR, TYPE_CNAME, TYPE_IXFR,
    TYPE_OPT, UdpPayload, opt_record,
};

/// Offset of the question name, the target of every answer's compression pointer.
const NAME_POINTER: [u8; 2] = [0xC0, HEADER_LEN as u8];
/// A compression pointer is these two bits and a 14-bit offset.
const POINTER_FLAG: u16 = 0xC000;
const MAX_POINTER: u16 = 0x3FFF;
/// EDNS Client Subnet (RFC 7871), an option whose content hickory parses.
const OPTION_CLIENT_SUBNET: u16 = 8;

/// What the fast path wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastAnswer {
    /// Bytes of the reply at the start of the output buffer.
    pub len: usize,
    pub qtype: RecordType,
    /// Which answer rule produced it, for logs and metrics.
    pub rule: Rule,
}

/// The parts of a query the fast path needs.
pub(crate) struct Parsed<'q> {
    /// Header bytes 0..4: ID and flags.
    pub head: [u8; 4],
    /// The question as sent: name, type and class.
    pub question: &'q [u8],
    pub key: KeyBuf,
    pub qtype: u16,
    /// The client's EDNS payload size and DO bit, if it sent an OPT record.
    pub edns: Option<(u16, bool)>,
}

/// Answers `query` from `table` into `out`, or declines (`None`) and leaves the query to the
/// full path. `rotation` picks which address comes first, so clients that take the first
/// address spread over all of them.
pub fn answer(table: &Table, query: &[u8], rotation: usize, payload: UdpPayload, out: &mut [u8]) -> Option<FastAnswer> {
    let parsed = parse(query)?;
    let limit = usize::from(payload.limit(parsed.edns.map(|(size, _)| size))).min(out.len());
    let mut w = Writer {
        out,
        len: 0,
        limit,
        payload,
    };
    let qtype = RecordType::from(parsed.qtype);
    let ttl = table.ttl().to_be_bytes();
    let rule = match lookup::decide(table, parsed.key.as_bytes()) {
        Lookup::Found(Found::Entry(entry)) => {
            let EntryData::Addresses { v4, v6 } = &*entry.data else {
                return None;
            };
            let count = match parsed.qtype {
                TYPE_A => v4.len(),
                TYPE_AAAA => v6.len(),
                _ => return None,
            };
            if count == 0 {
                // NODATA, never NXDOMAIN: musl drops a name when either family is NXDOMAIN.
                negative(&mut w, &parsed, table, RCODE_NO_ERROR)?;
                Rule::NoData
            } else {
                header(&mut w, &parsed, RCODE_NO_ERROR, count, 0)?;
                addresses(&mut w, parsed.qtype, v4, v6, NAME_POINTER, rotation, &ttl)?;
                Rule::Table
            }
        }
        Lookup::Shortcut(canonical) => {
            // The alias to the table name, then that name's addresses; a name without the
            // asked family is left to the full path (CNAME plus SOA).
            let Some(Found::Entry(entry)) = table.find(canonical.as_bytes()) else {
                return None;
            };
            let EntryData::Addresses { v4, v6 } = &*entry.data else {
                return None;
            };
            let count = match parsed.qtype {
                TYPE_A => v4.len(),
                TYPE_AAAA => v6.len(),
                _ => 0,
            };
            if count == 0 {
                return None;
            }
            header(&mut w, &parsed, RCODE_NO_ERROR, count + 1, 0)?;
            let target = canonical.as_bytes();
            w.put(&NAME_POINTER)?;
            w.put(&TYPE_CNAME.to_be_bytes())?;
            w.put(&CLASS_IN.to_be_bytes())?;
            w.put(&ttl)?;
            w.put(&u16::try_from(target.len() + 1).ok()?.to_be_bytes())?;
            // The address records name the alias target by a pointer to it.
            let at = u16::try_from(w.len).ok().filter(|&at| at <= MAX_POINTER)?;
            w.put(target)?;
            w.put(&[0])?;
            addresses(
                &mut w,
                parsed.qtype,
                v4,
                v6,
                (POINTER_FLAG | at).to_be_bytes(),
                rotation,
                &ttl,
            )?;
            Rule::SearchShortcut
        }
        Lookup::EmptyNonTerminal => {
            negative(&mut w, &parsed, table, RCODE_NO_ERROR)?;
            Rule::NoData
        }
        Lookup::NxDomain => {
            negative(&mut w, &parsed, table, RCODE_NX_DOMAIN)?;
            Rule::NxDomain
        }
        _ => return None,
    };
    opt(&mut w, &parsed)?;
    Some(FastAnswer {
        len: w.len,
        qtype,
        rule,
    })
}

/// Header and question of the reply. `rcode` fits the header (no extended rcode).
fn header(w: &mut Writer<'_>, parsed: &Parsed<'_>, rcode: u8, answers: usize, authorities: u16) -> Option<()> {
    let [id_hi, id_lo, flags_hi, flags_lo] = parsed.head;
    w.put(&[
        id_hi,
        id_lo,
        FLAG_QR | FLAG_AA | (flags_hi & FLAG_RD),
        FLAG_RA | (flags_lo & FLAG_CD) | rcode,
    ])?;
    w.put(&1u16.to_be_bytes())?;
    w.put(&u16::try_from(answers).ok()?.to_be_bytes())?;
    w.put(&authorities.to_be_bytes())?;
    w.put(&u16::from(parsed.edns.is_some()).to_be_bytes())?;
    w.put(parsed.question)
}

/// NODATA or NXDOMAIN: no answers, the zone's SOA as authority (RFC 2308). The caller adds
/// the OPT record, as for every answer.
fn negative(w: &mut Writer<'_>, parsed: &Parsed<'_>, table: &Table, rcode: u8) -> Option<()> {
    let soa = table.soa_wire();
    if soa.is_empty() {
        return None;
    }
    header(w, parsed, rcode, 0, 1)?;
    w.put(soa)
}

/// The OPT record, if the query had one: meshdns's own ([`opt_record`]), DO echoed. Written
/// once, by [`answer`], after every kind of reply.
fn opt(w: &mut Writer<'_>, parsed: &Parsed<'_>) -> Option<()> {
    match parsed.edns {
        Some((_, dnssec_ok)) => {
            let record = opt_record(w.payload, dnssec_ok);
            w.put(&record)
        }
        None => Some(()),
    }
}

/// The address records of the asked family, each owned by `owner` (a compression pointer).
fn addresses(
    w: &mut Writer<'_>,
    qtype: u16,
    v4: &[Ipv4Addr],
    v6: &[Ipv6Addr],
    owner: [u8; 2],
    rotation: usize,
    ttl: &[u8; 4],
) -> Option<()> {
    match qtype {
        TYPE_A => address_records(w, v4, owner, rotation, ttl, |ip| ip.octets()),
        _ => address_records(w, v6, owner, rotation, ttl, |ip| ip.octets()),
    }
}

/// Writes one record per address, starting at `rotation`, each owned by `owner`.
fn address_records<T: Copy, const N: usize>(
    w: &mut Writer<'_>,
    ips: &[T],
    owner: [u8; 2],
    rotation: usize,
    ttl: &[u8; 4],
    octets: impl Fn(T) -> [u8; N],
) -> Option<()> {
    let rtype = if N == 4 { TYPE_A } else { TYPE_AAAA };
    let start = if ips.is_empty() { 0 } else { rotation % ips.len() };
    let (tail, head) = ips.split_at(start);
    for &ip in head.iter().chain(tail) {
        w.put(&owner)?;
        w.put(&rtype.to_be_bytes())?;
        w.put(&CLASS_IN.to_be_bytes())?;
        w.put(ttl)?;
        w.put(&u16::try_from(N).ok()?.to_be_bytes())?;
        w.put(&octets(ip))?;
    }
    Some(())
}

/// Whether a name in the question section holds a compression pointer into the header (an
/// offset below 12). Such a query is malformed, and echoing its question, as every reply
/// does, would make a reply whose pointer lands in the reply's own header. Anything that
/// cannot be walked counts as no: decoding rejects it anyway.
pub fn question_points_into_header(query: &[u8]) -> bool {
    let Some(&[hi, lo]) = query.get(4..6) else {
        return false;
    };
    let mut at = HEADER_LEN;
    for _ in 0..u16::from_be_bytes([hi, lo]) {
        loop {
            let Some(&len) = query.get(at) else { return false };
            match len {
                0 => {
                    at += 1;
                    break;
                }
                1..=MAX_LABEL => at += 1 + usize::from(len),
                _ if u16::from(len) << 8 & POINTER_FLAG == POINTER_FLAG => {
                    let Some(&low) = query.get(at + 1) else { return false };
                    if (usize::from(len & 0x3F) << 8 | usize::from(low)) < HEADER_LEN {
                        return true;
                    }
                    at += 2;
                    break;
                }
                _ => return false,
            }
        }
        at += 4;
    }
    false
}

/// The question name of a datagram the fast path answered, as the client spelled it, for log
/// lines; rendered only when a log line is actually written.
pub struct QuestionName<'q>(pub &'q [u8]);

impl std::fmt::Display for QuestionName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut pos = HEADER_LEN;
        while let Some(&len) = self.0.get(pos) {
            let Some(label) = self.0.get(pos + 1..pos + 1 + usize::from(len)).filter(|_| len > 0) else {
                break;
            };
            for &byte in label {
                // Escaped as in zone files, so a label holding a dot reads unambiguously.
                match byte {
                    b'.' | b'\\' => write!(f, "\\{}", char::from(byte))?,
                    0x21..=0x7e => write!(f, "{}", char::from(byte))?,
                    _ => write!(f, "\\{byte:03}")?,
                }
            }
            f.write_str(".")?;
            pos += 1 + usize::from(len);
        }
        if pos == HEADER_LEN {
            f.write_str(".")?;
        }
        Ok(())
    }
}

/// Appends to the reply buffer; `None` once the reply would exceed the client's limit.
struct Writer<'o> {
    out: &'o mut [u8],
    len: usize,
    limit: usize,
    payload: UdpPayload,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.len.checked_add(bytes.len()).filter(|&end| end <= self.limit)?;
        self.out.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(())
    }
}

/// Reads a plain query: one question, no answer or authority records, at most an OPT record
/// (version 0) as additional, nothing after it. Anything else is the full path's.
pub(crate) fn parse(query: &[u8]) -> Option<Parsed<'_>> {
    let header = query.get(..HEADER_LEN)?;
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let flags_hi = header[2];
    if flags_hi & (FLAG_QR | OPCODE_MASK | FLAG_TC) != 0 {
        return None;
    }
    let additionals = count(10);
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || additionals > 1 {
        return None;
    }
    let mut key = KeyBuf::default();
    let mut pos = HEADER_LEN;
    loop {
        let len = *query.get(pos)?;
        if len == 0 {
            pos += 1;
            break;
        }
        if len > MAX_LABEL {
            return None;
        }
        let label = query.get(pos + 1..pos + 1 + usize::from(len))?;
        key.push_label(label)?;
        pos += 1 + usize::from(len);
    }
    if pos - HEADER_LEN > MAX_NAME_WIRE {
        return None;
    }
    let fixed = query.get(pos..pos + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    // Zone transfers are refused by the full path, whatever the name.
    if u16::from_be_bytes([fixed[2], fixed[3]]) != CLASS_IN || matches!(qtype, TYPE_AXFR | TYPE_IXFR) {
        return None;
    }
    let question = query.get(HEADER_LEN..pos + 4)?;
    let rest = query.get(pos + 4..)?;
    let edns = match additionals {
        0 if rest.is_empty() => None,
        1 => Some(parse_opt(rest)?),
        _ => return None,
    };
    Some(Parsed {
        head: [header[0], header[1], header[2], header[3]],
        question,
        key,
        qtype,
        edns,
    })
}

/// The payload size and DO bit of an OPT record that makes up all of `rest`.
fn parse_opt(rest: &[u8]) -> Option<(u16, bool)> {
    let [0, t0, t1, p0, p1, _ext_rcode, version, f0, f1, l0, l1, options @ ..] = rest else {
        return None;
    };
    // Another version is answered BADVERS by the full path.
    if u16::from_be_bytes([*t0, *t1]) != TYPE_OPT || *version != EDNS_VERSION {
        return None;
    }
    if usize::from(u16::from_be_bytes([*l0, *l1])) != options.len() {
        return None;
    }
    // Options (a cookie from dig, say) are not echoed by the full path either, but each must
    // be well-formed, as hickory checks; a client subnet option hickory also reads, so a query
    // with one is left to it.
    let mut rest = options;
    while let [c0, c1, n0, n1, tail @ ..] = rest {
        if u16::from_be_bytes([*c0, *c1]) == OPTION_CLIENT_SUBNET {
            return None;
        }
        rest = tail.get(usize::from(u16::from_be_bytes([*n0, *n1]))..)?;
    }
    if !rest.is_empty() {
        return None;
    }
    let payload = u16::from_be_bytes([*p0, *p1]);
    Some((payload, u16::from_be_bytes([*f0, *f1]) & EDNS_DO != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterState, ObjectKey, PortProtocol, Service, ServiceKind, ServicePort};
    use crate::lookup::{self, Resolution};
    use crate::table::{ClusterInput, TableSettings};
    use hickory_proto::op::{Edns, Message, MessageType, Query};
    use hickory_proto::rr::{Name, Record};

    fn table() -> Table {
        let mut local = ClusterState::default();
        let service = |ips: &[&str]| Service {
            kind: ServiceKind::ClusterIp(ips.iter().map(|s| s.parse().unwrap()).collect()),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: PortProtocol::Tcp,
            }]
            .into(),
            publish_not_ready: false,
        };
        local
            .services
            .insert(ObjectKey::new("a", "web"), service(&["10.0.0.1"]));
        local.services.insert(
            ObjectKey::new("a", "dual"),
            service(&["10.0.0.2", "10.0.0.3", "fd00::2", "fd00::3"]),
        );
        let settings = TableSettings {
            cluster_domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            search: vec![
                "a.svc.cluster.local".into(),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
        };
        let inputs = [ClusterInput {
            name: "c1",
            local: true,
            state: &local,
            loaded: true,
            gateway_override: None,
        }];
        Table::build(&settings, &inputs, 1).0
    }

    fn query(name: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut msg = Message::query();
        msg.metadata.id = 0xbeef;
        msg.metadata.recursion_desired = true;
        msg.metadata.checking_disabled = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some((payload, dnssec_ok)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(dnssec_ok);
            msg.set_edns(e);
        }
        msg.to_vec().unwrap()
    }

    fn sorted(records: &[Record]) -> Vec<String> {
        let mut v: Vec<String> = records.iter().map(ToString::to_string).collect();
        v.sort();
        v
    }

    struct Case {
        name: &'static str,
        qname: &'static str,
        qtype: RecordType,
        edns: Option<(u16, bool)>,
        want_rule: Option<Rule>,
    }

    #[test]
    fn answers_as_the_full_rules_do_or_declines() {
        let table = table();
        let cases = [
            Case {
                name: "A, one address, no EDNS",
                qname: "web.a.svc.cluster.local.",
                qtype: RecordType::A,
                edns: None,
                want_rule: Some(Rule::Table),
            },
            Case {
                name: "0x20 case is echoed",
                qname: "wEb.A.svc.CLUSTER.local.",
                qtype: RecordType::A,
                edns: Some((1232, false)),
                want_rule: Some(Rule::Table),
            },
            Case {
                name: "AAAA, two addresses, EDNS with DO",
                qname: "dual.a.svc.cluster.local.",
                qtype: RecordType::AAAA,
                edns: Some((4096, true)),
                want_rule: Some(Rule::Table),
            },
            Case {
                name: "AAAA of a v4-only service is NODATA with SOA",
                qname: "web.a.svc.cluster.local.",
                qtype: RecordType::AAAA,
                edns: Some((100, false)),
                want_rule: Some(Rule::NoData),
            },
            Case {
                name: "SRV goes the full way",
                qname: "_http._tcp.web.a.svc.cluster.local.",
                qtype: RecordType::SRV,
                edns: None,
                want_rule: None,
            },
            Case {
                name: "search-expanded name: CNAME to the table name and its addresses",
                qname: "Web.A.a.svc.cluster.local.",
                qtype: RecordType::A,
                edns: Some((1232, false)),
                want_rule: Some(Rule::SearchShortcut),
            },
            Case {
                name: "search-expanded name without the family goes the full way",
                qname: "web.a.a.svc.cluster.local.",
                qtype: RecordType::AAAA,
                edns: None,
                want_rule: None,
            },
            Case {
                name: "unknown name below svc is NXDOMAIN with SOA",
                qname: "nothere.a.svc.cluster.local.",
                qtype: RecordType::A,
                edns: None,
                want_rule: Some(Rule::NxDomain),
            },
            Case {
                name: "NXDOMAIN holds for any type",
                qname: "nothere.a.svc.cluster.local.",
                qtype: RecordType::MX,
                edns: Some((1232, true)),
                want_rule: Some(Rule::NxDomain),
            },
            Case {
                name: "a namespace is an empty non-terminal: NODATA",
                qname: "a.svc.cluster.local.",
                qtype: RecordType::A,
                edns: None,
                want_rule: Some(Rule::NoData),
            },
            Case {
                name: "pod names of the cluster domain go the full way",
                qname: "10-0-0-1.a.pod.cluster.local.",
                qtype: RecordType::A,
                edns: None,
                want_rule: None,
            },
            Case {
                name: "name outside the table goes the full way",
                qname: "example.com.",
                qtype: RecordType::A,
                edns: None,
                want_rule: None,
            },
            Case {
                name: "ANY goes the full way",
                qname: "web.a.svc.cluster.local.",
                qtype: RecordType::ANY,
                edns: None,
                want_rule: None,
            },
        ];
        for case in cases {
            let bytes = query(case.qname, case.qtype, case.edns);
            let mut out = [0u8; 4096];
            let got = answer(&table, &bytes, 1, UdpPayload::default(), &mut out);
            assert_eq!(got.map(|a| a.rule), case.want_rule, "{}", case.name);
            let Some(got) = got else { continue };
            // Exactly the records the header counts, one OPT at most (hickory would not notice).
            let layout = crate::strict::check(&out[..got.len]).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(layout.opt.is_some(), case.edns.is_some(), "{}: OPT", case.name);
            let reply = Message::from_vec(&out[..got.len]).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let meta = &reply.metadata;
            assert_eq!(meta.id, 0xbeef, "{}", case.name);
            assert_eq!(meta.message_type, MessageType::Response, "{}", case.name);
            assert!(meta.authoritative && meta.recursion_available, "{}", case.name);
            assert!(meta.recursion_desired && meta.checking_disabled, "{}", case.name);
            assert!(!meta.truncation && !meta.authentic_data, "{}", case.name);
            assert_eq!(
                reply.queries[0].name().to_string(),
                case.qname,
                "{}: the question keeps the client's case",
                case.name
            );
            let Resolution::Local(want) = lookup::resolve(&table, &Name::from_ascii(case.qname).unwrap(), case.qtype)
            else {
                panic!("{}: the full rules forward it", case.name);
            };
            assert_eq!(meta.response_code, want.rcode, "{}", case.name);
            assert_eq!(sorted(&reply.answers), sorted(&want.answers), "{}", case.name);
            assert_eq!(sorted(&reply.authorities), sorted(want.soa.as_slice()), "{}", case.name);
            match (case.edns, reply.edns.as_ref()) {
                (None, None) => {}
                (Some((payload, dnssec_ok)), Some(edns)) => {
                    let _ = payload;
                    assert_eq!(
                        edns.max_payload(),
                        1232,
                        "{}: meshdns advertises its own size",
                        case.name
                    );
                    assert_eq!(edns.flags().dnssec_ok, dnssec_ok, "{}", case.name);
                    assert_eq!(edns.version(), 0, "{}", case.name);
                }
                (want, got) => panic!("{}: EDNS {want:?} vs {got:?}", case.name),
            }
        }
    }

    #[test]
    fn a_well_formed_cookie_option_is_answered() {
        let table = table();
        let mut bytes = query("web.a.svc.cluster.local.", RecordType::A, Some((1232, false)));
        let n = bytes.len();
        bytes[n - 1] = 12;
        bytes.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let mut out = [0u8; 512];
        assert!(answer(&table, &bytes, 0, UdpPayload::default(), &mut out).is_some());
        assert!(!question_points_into_header(&bytes));
        let mut compressed = bytes[..12].to_vec();
        compressed.extend_from_slice(&[1, b'a', 0xC0, 2, 0, 1, 0, 1]);
        assert!(question_points_into_header(&compressed));
    }

    #[test]
    fn question_names_print_as_sent() {
        let bytes = query("wEb.A.svc.cluster.local.", RecordType::A, None);
        assert_eq!(QuestionName(&bytes).to_string(), "wEb.A.svc.cluster.local.");
        let mut odd = bytes[..12].to_vec();
        odd.extend_from_slice(&[3, b'a', b'.', 0xff, 0, 0, 1, 0, 1]);
        assert_eq!(QuestionName(&odd).to_string(), "a\\.\\255.");
    }

    #[test]
    fn rotation_moves_the_first_address() {
        let table = table();
        let bytes = query("dual.a.svc.cluster.local.", RecordType::A, None);
        let first = |rotation| {
            let mut out = [0u8; 512];
            let got = answer(&table, &bytes, rotation, UdpPayload::default(), &mut out).unwrap();
            Message::from_vec(&out[..got.len]).unwrap().answers[0].data.to_string()
        };
        assert_ne!(first(0), first(1));
        assert_eq!(first(0), first(2));
    }

    #[test]
    fn declines_what_it_cannot_answer_exactly() {
        let table = table();
        let plain = query("web.a.svc.cluster.local.", RecordType::A, None);
        let with_edns = query("web.a.svc.cluster.local.", RecordType::A, Some((1232, false)));
        let edit = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = base.to_vec();
            f(&mut b);
            b
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short header", plain[..11].to_vec()),
            ("a response", edit(&plain, &|b| b[2] |= FLAG_QR)),
            ("opcode NOTIFY", edit(&plain, &|b| b[2] |= 4 << 3)),
            ("TC set", edit(&plain, &|b| b[2] |= FLAG_TC)),
            ("two questions", edit(&plain, &|b| b[5] = 2)),
            ("an answer record", edit(&plain, &|b| b[7] = 1)),
            ("trailing bytes", edit(&plain, &|b| b.push(0))),
            ("cut in the name", plain[..20].to_vec()),
            ("class CH", edit(&plain, &|b| *b.last_mut().unwrap() = 3)),
            (
                "AXFR",
                edit(&plain, &|b| {
                    let n = b.len();
                    b[n - 3] = 252;
                }),
            ),
            (
                "IXFR",
                edit(&plain, &|b| {
                    let n = b.len();
                    b[n - 3] = 251;
                }),
            ),
            (
                "compressed name",
                edit(&plain, &|b| {
                    b.truncate(12);
                    b.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
                }),
            ),
            (
                "EDNS version 1",
                edit(&with_edns, &|b| {
                    let n = b.len();
                    b[n - 5] = 1;
                }),
            ),
            (
                "OPT length past the end",
                edit(&with_edns, &|b| {
                    let n = b.len();
                    b[n - 1] = 4;
                }),
            ),
            (
                "additional that is not OPT",
                edit(&with_edns, &|b| b[plain.len() + 2] = 1),
            ),
        ];
        for (name, bytes) in cases {
            let mut out = [0u8; 512];
            assert_eq!(
                answer(&table, &bytes, 0, UdpPayload::default(), &mut out),
                None,
                "{name}"
            );
        }
        let mut tiny = [0u8; 40];
        assert_eq!(
            answer(&table, &plain, 0, UdpPayload::default(), &mut tiny),
            None,
            "does not fit the buffer"
        );
    }
}
