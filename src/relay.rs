//! Forwarding on the UDP fast path: a plain query for a name the table does not own is sent to
//! the upstreams as the client's own bytes, and the upstream's reply goes back as the upstream's
//! own bytes, with the client's ID and question spelling and the client's EDNS size written in.
//! No hickory `Request`, no response builder, no second encoding.
//!
//! The exchange itself is the one the full path uses ([`Forwarder::forward_wire`]): the same
//! fresh port and random ID per attempt, the same checks of source, ID and question, the same
//! fall-through on SERVFAIL and REFUSED, the same TCP retry on TC and the same deadline. Only
//! what is sent back differs in how it is made, not in what it says: the reply must equal, once
//! decoded, what the handler would have encoded from the same upstream reply. Where it would
//! not (a reply larger than the client's buffer, which the handler truncates; an OPT record
//! the client did not ask for; a signed reply), [`client_reply`] declines and the query takes
//! the full path. `tests/relay.rs` sends the same questions to servers with and without this
//! path, against the same upstreams, and requires the same replies.
//!
//! A reply relayed here is offered to the response cache like any other, and a question the
//! cache holds is answered at once by [`Relay::step`] in the receive loop, from the cached bytes:
//! TTLs lowered in place, the client's ID and question spelling, and an OPT record of meshdns's
//! own. One difference from the full path's cache hit is allowed: a name inside the records
//! that the stored reply compresses into the question takes the current asker's case rather
//! than the first asker's (equal as DNS names, RFC 4343).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, RecordType};

use crate::cache::{Cache, CacheKey, Hit, QueryFlags};
use crate::fast::{self, Parsed};
use crate::lookup::{self, Decision};
use crate::metrics::{Metrics, Outcome};
use crate::table::Table;
use crate::upstream::{Forwarder, Transport};
use crate::wire::{
    self, FLAG_AD, FLAG_CD, FLAG_QR, FLAG_RA, FLAG_RD, HEADER_LEN, OPT_LEN, RCODE_SERVFAIL, TYPE_A, TYPE_AAAA,
    TYPE_OPT, TYPE_SIG, TYPE_TSIG, UdpPayload, opt_record,
};

/// Reverse zones: a reverse name may be a PTR the table answers, which the full path decides.
const REVERSE_ZONES: [&[u8]; 2] = [b"\x07in-addr\x04arpa", b"\x03ip6\x04arpa"];

/// What the relay needs to know of a query it takes.
pub struct Plan {
    pub qtype: RecordType,
    /// Length of the question (name, type, class) at offset 12.
    question_len: usize,
    /// The client's EDNS payload size and DO bit, if it sent an OPT record.
    edns: Option<(u16, bool)>,
    /// The client's RD and CD bits, for the SERVFAIL reply.
    flags: u8,
    cache_key: Option<CacheKey>,
    /// The UDP size rule the reply follows.
    payload: UdpPayload,
}

impl Plan {
    /// The response cache's key for the question, when the plan was made with the cache on.
    pub fn cache_key(&self) -> Option<&CacheKey> {
        self.cache_key.as_ref()
    }

    /// The largest reply the client takes over UDP.
    fn limit(&self) -> usize {
        usize::from(self.payload.limit(self.edns.map(|(size, _)| size)))
    }
}

/// The plan for `query` if it is a plain query (as [`fast`] reads them) that the full path
/// would forward as it is: a name outside the cluster domain (reverse names excepted), or one
/// inside it that the table leaves to the cluster's DNS. `None` leaves it to the full path.
pub fn plan(table: &Table, query: &[u8], caching: bool, payload: UdpPayload) -> Option<Plan> {
    let parsed = fast::parse(query)?;
    let key = parsed.key.as_bytes();
    match lookup::decide(table, key) {
        Decision::OutsideZone if !REVERSE_ZONES.iter().any(|zone| lookup::in_zone(key, zone)) => {}
        Decision::Forward => {}
        _ => return None,
    }
    let Parsed {
        head,
        question,
        key,
        qtype,
        edns,
    } = parsed;
    let qtype = RecordType::from(qtype);
    let cache_key = if caching {
        let flags = QueryFlags {
            recursion_desired: head[2] & FLAG_RD != 0,
            checking_disabled: head[3] & FLAG_CD != 0,
            authentic_data: head[3] & FLAG_AD != 0,
            dnssec_ok: edns.is_some_and(|(_, dnssec_ok)| dnssec_ok),
        };
        Some(CacheKey::from_key(key.as_bytes(), qtype, DNSClass::IN, flags)?)
    } else {
        None
    };
    Some(Plan {
        qtype,
        question_len: question.len(),
        edns,
        // RD sits in byte 2 and CD in byte 3 (different bits), so one byte holds both.
        flags: (head[2] & FLAG_RD) | (head[3] & FLAG_CD),
        cache_key,
        payload,
    })
}

/// See [`Relay::step`].
// The plan (its cache key) stays on the stack: boxing it would allocate for every query.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// A reply of this many bytes is in the output buffer, from the cache.
    Answered {
        len: usize,
        qtype: RecordType,
    },
    Forward(Plan),
    FullPath,
}

/// What became of a relayed query.
pub enum Relayed {
    /// The reply for the client (counted already).
    Reply(Vec<u8>),
    /// The full path must answer it: with the upstream's reply, decoded, when one came back
    /// that cannot be passed on as it is (it is re-encoded, never fetched again; counted
    /// already), or from scratch.
    Declined(Option<Message>),
}

/// Forwards plain UDP queries without the handler.
pub struct Relay {
    forwarder: Arc<Forwarder>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    payload: UdpPayload,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("forwarder", &self.forwarder)
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(forwarder: Arc<Forwarder>, cache: Arc<Cache>, metrics: Arc<Metrics>) -> Self {
        Self {
            forwarder,
            cache,
            metrics,
            payload: UdpPayload::default(),
        }
    }

    /// Replies follow `payload` (the `maxUdpPayload` setting) instead of the default.
    pub fn with_udp_payload(mut self, payload: UdpPayload) -> Self {
        self.payload = payload;
        self
    }

    /// What to do with a UDP query: answer it from the cache into `out` at once, forward it
    /// ([`Relay::relay`]), or leave it to the full path.
    pub fn step(&self, table: &Table, query: &[u8], out: &mut [u8]) -> Step {
        let Some(plan) = plan(table, query, self.cache.enabled(), self.payload) else {
            return Step::FullPath;
        };
        let Some(key) = &plan.cache_key else {
            return Step::Forward(plan);
        };
        // Room for the OPT record the reply gets when the query had one.
        let room = plan
            .limit()
            .min(out.len())
            .saturating_sub(if plan.edns.is_some() { OPT_LEN } else { 0 });
        let Some(buffer) = out.get_mut(..room) else {
            return Step::FullPath;
        };
        match self.cache.write_hit(key, Instant::now(), buffer) {
            Hit::Miss => Step::Forward(plan),
            // The full path answers it from the cache, truncated.
            Hit::TooLarge => Step::FullPath,
            Hit::Written(len) => match cached_reply(query, &plan, out, len) {
                Some(len) => Step::Answered { len, qtype: plan.qtype },
                None => Step::FullPath,
            },
        }
    }

    /// Forwards `query` and makes the client's reply from the upstream's.
    pub async fn relay(&self, query: &[u8], plan: &Plan, client: SocketAddr) -> Relayed {
        let started = Instant::now();
        let name = fast::QuestionName(query);
        match self.forwarder.forward_wire(query, Transport::Udp).await {
            Ok(reply) => {
                if let Some(key) = &plan.cache_key {
                    self.cache.put(key, &reply.message, Instant::now());
                }
                let rcode = reply.message.metadata.response_code;
                let crate::upstream::Relayed { message, wire } = reply;
                let relayed = client_reply(query, plan, &message, wire);
                let path = if relayed.is_some() {
                    "relay"
                } else {
                    "relay, re-encoded"
                };
                tracing::debug!(%client, %name, qtype = %plan.qtype, outcome = Outcome::Forwarded.as_str(), %rcode, elapsed_us = started.elapsed().as_micros() as u64, path, "query");
                self.metrics
                    .request(Transport::Udp, plan.qtype, Outcome::Forwarded, started);
                match relayed {
                    Some(bytes) => Relayed::Reply(bytes),
                    None => Relayed::Declined(Some(message)),
                }
            }
            Err(error) => {
                tracing::debug!(%client, %name, qtype = %plan.qtype, outcome = "error", %error, elapsed_us = started.elapsed().as_micros() as u64, path = "relay", "query");
                self.metrics
                    .request(Transport::Udp, plan.qtype, Outcome::Error, started);
                match servfail(query, plan) {
                    Some(bytes) => Relayed::Reply(bytes),
                    None => Relayed::Declined(None),
                }
            }
        }
    }
}

/// The client's reply made from the upstream's `wire`, which the forwarder accepted as a
/// response to this question and decoded as `decoded`: the client's ID, its question as
/// spelled, an OPT record exactly when the client sent one, sized to the client's buffer.
/// `None` when only re-encoding gives what the full path would send, and whenever the bytes do
/// not walk record by record exactly as hickory-proto decoded them (a malformed record can make
/// a decoder read past its length; the full path then sends what hickory read, and so does
/// the relay, by declining).
pub fn client_reply(query: &[u8], plan: &Plan, decoded: &Message, mut wire: Vec<u8>) -> Option<Vec<u8>> {
    let question = query.get(HEADER_LEN..HEADER_LEN + plan.question_len)?;
    let echoed = wire.get_mut(HEADER_LEN..HEADER_LEN + plan.question_len)?;
    // The upstream may have changed the case; anything else (a compressed echo) is the full
    // path's to sort out.
    if !echoed.eq_ignore_ascii_case(question) {
        return None;
    }
    echoed.copy_from_slice(question);
    let mut opt = None;
    let mut records = decoded
        .answers
        .iter()
        .chain(&decoded.authorities)
        .chain(&decoded.additionals);
    let end = wire::walk(&wire, plan.question_len, |record| {
        if points_into_header(&wire, record) {
            return None;
        }
        match record.rtype {
            TYPE_OPT if record.additional && opt.is_none() => opt = Some((record.start, record.end)),
            // Signatures are not carried over by the full path's re-encoding.
            TYPE_OPT | TYPE_SIG | TYPE_TSIG => return None,
            _ => {
                let seen = records.next()?;
                let ttl = wire.get(record.ttl..record.ttl + 4)?;
                if u16::from(seen.record_type()) != record.rtype
                    || seen.ttl != u32::from_be_bytes([ttl[0], ttl[1], ttl[2], ttl[3]])
                {
                    return None;
                }
            }
        }
        Some(())
    })?;
    // Bytes after the last record, or records hickory read that the walk did not: the two
    // readings differ.
    if end != wire.len() || records.next().is_some() || opt.is_some() != decoded.edns.is_some() {
        return None;
    }
    // The OPT record's size is rewritten below; a record after it might name a part of it.
    if opt.is_some_and(|(_, opt_end)| opt_end != end) {
        return None;
    }
    let additionals = wire::count(&wire, 10)?;
    wire.get_mut(..2)?.copy_from_slice(query.get(..2)?);
    match (plan.edns, opt) {
        (Some(_), Some((opt, _))) => {
            // The OPT record's class is the sender's UDP payload size; the full path advertises
            // meshdns's own, and keeps the upstream's flags and options.
            let payload = plan.payload.advertised().to_be_bytes();
            wire.get_mut(opt + 3..opt + 5)?.copy_from_slice(&payload);
        }
        (Some((_, dnssec_ok)), None) => {
            // The full path then sends an OPT of its own: meshdns's size, the client's DO bit.
            wire.extend_from_slice(&opt_record(plan.payload, dnssec_ok));
            wire.get_mut(10..12)?
                .copy_from_slice(&additionals.checked_add(1)?.to_be_bytes());
        }
        // An OPT the client did not ask for: the full path leaves it out.
        (None, Some(_)) => return None,
        (None, None) => {}
    }
    // The full path truncates what does not fit; that takes the full path.
    (wire.len() <= plan.limit()).then_some(wire)
}

/// Makes the cached reply of `len` bytes at the start of `out` the client's, as the full path
/// makes a cache hit: the client's ID and question as spelled, and the OPT record of meshdns's
/// own when the query had one (the cache keeps none). Returns the reply's length.
fn cached_reply(query: &[u8], plan: &Plan, out: &mut [u8], len: usize) -> Option<usize> {
    let question = query.get(HEADER_LEN..HEADER_LEN + plan.question_len)?;
    // The same key means the same name in another spelling.
    let stored = out.get_mut(HEADER_LEN..HEADER_LEN + plan.question_len)?;
    if !stored.eq_ignore_ascii_case(question) {
        return None;
    }
    stored.copy_from_slice(question);
    out.get_mut(..2)?.copy_from_slice(query.get(..2)?);
    let Some((_, dnssec_ok)) = plan.edns else {
        return Some(len);
    };
    let additionals = wire::count(out, 10)?.checked_add(1)?;
    out.get_mut(10..12)?.copy_from_slice(&additionals.to_be_bytes());
    let opt = opt_record(plan.payload, dnssec_ok);
    out.get_mut(len..len + OPT_LEN)?.copy_from_slice(&opt);
    Some(len + OPT_LEN)
}

/// Whether a name of `record` may be a compression pointer into the header, which the relay
/// rewrites (the ID, the additional count): the owner's, or, in the data of any type but A and
/// AAAA (which hold no names), any two bytes that read as one. A false alarm only sends the
/// reply the full way.
fn points_into_header(wire: &[u8], record: wire::RecordAt) -> bool {
    if wire::final_pointer(wire, record.start).is_some_and(|to| to < HEADER_LEN) {
        return true;
    }
    let data = wire.get(record.data..record.end).unwrap_or_default();
    !matches!(record.rtype, TYPE_A | TYPE_AAAA)
        && data.windows(2).any(|pair| {
            pair[0] & wire::POINTER_BITS == wire::POINTER_BITS
                && (usize::from(pair[0] & !wire::POINTER_BITS) << 8 | usize::from(pair[1])) < HEADER_LEN
        })
}

/// SERVFAIL as the full path sends it when forwarding failed: the client's ID, RD and CD, RA
/// set, the question, and the OPT record if the client sent one.
pub fn servfail(query: &[u8], plan: &Plan) -> Option<Vec<u8>> {
    let question = query.get(HEADER_LEN..HEADER_LEN + plan.question_len)?;
    let mut out = Vec::with_capacity(HEADER_LEN + question.len() + 11);
    out.extend_from_slice(query.get(..2)?);
    out.push(FLAG_QR | (plan.flags & FLAG_RD));
    out.push(FLAG_RA | (plan.flags & FLAG_CD) | RCODE_SERVFAIL);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&u16::from(plan.edns.is_some()).to_be_bytes());
    out.extend_from_slice(question);
    if let Some((_, dnssec_ok)) = plan.edns {
        out.extend_from_slice(&opt_record(plan.payload, dnssec_ok));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::TableSettings;
    use hickory_proto::op::{Edns, MessageType, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record};

    fn table() -> Table {
        Table::empty(&TableSettings {
            cluster_domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            search: vec![],
        })
    }

    fn query(name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut msg = Message::query();
        msg.metadata.id = 0x1234;
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(payload) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            msg.set_edns(e);
        }
        msg.to_vec().unwrap()
    }

    /// The upstream's reply to `query` (its question lowercased, ID 0x9999).
    fn upstream_reply(query: &[u8], edns: Option<u16>, extra: impl FnOnce(&mut Message)) -> Vec<u8> {
        let asked = Message::from_vec(query).unwrap();
        let mut reply = Message::new(0x9999, MessageType::Response, asked.metadata.op_code);
        reply.metadata.recursion_available = true;
        let question = asked.queries[0].clone();
        let owner = question.name().to_lowercase();
        reply.add_query(Query::query(owner.clone(), RecordType::A));
        reply.add_answer(Record::from_rdata(owner, 60, RData::A(A::new(192, 0, 2, 1))));
        if let Some(payload) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            reply.set_edns(e);
        }
        extra(&mut reply);
        reply.to_vec().unwrap()
    }

    fn relay_of(query: &[u8], wire: Vec<u8>) -> Option<Message> {
        let plan = plan(&table(), query, false, UdpPayload::default()).expect("forwarded");
        let decoded = Message::from_vec(&wire).unwrap();
        client_reply(query, &plan, &decoded, wire).map(|bytes| Message::from_vec(&bytes).unwrap())
    }

    #[test]
    fn the_client_gets_its_id_its_spelling_and_its_buffer_size() {
        let q = query("WwW.Example.TEST.", Some(1232));
        // The upstream's OPT carries an option (a server cookie): it is passed on.
        let reply = relay_of(
            &q,
            upstream_reply(&q, Some(4096), |reply| {
                if let Some(edns) = reply.edns.as_mut() {
                    edns.options_mut()
                        .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(10, vec![7; 16]));
                }
            }),
        )
        .unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.queries[0].name().to_ascii(), "WwW.Example.TEST.");
        assert_eq!(reply.edns.as_ref().unwrap().max_payload(), 1232);
        assert_eq!(reply.answers.len(), 1);
    }

    #[test]
    fn an_opt_record_is_added_for_an_edns_client_and_never_given_to_others() {
        let q = query("www.example.test.", Some(700));
        let reply = relay_of(&q, upstream_reply(&q, None, |_| {})).unwrap();
        assert_eq!(
            reply.edns.as_ref().unwrap().max_payload(),
            1232,
            "meshdns advertises its own size"
        );
        let plain = query("www.example.test.", None);
        assert!(relay_of(&plain, upstream_reply(&plain, Some(1232), |_| {})).is_none());
        assert!(
            relay_of(&plain, upstream_reply(&plain, None, |_| {}))
                .unwrap()
                .edns
                .is_none()
        );
    }

    #[test]
    fn bytes_that_do_not_walk_as_decoded_decline() {
        let q = query("www.example.test.", None);
        let wire = upstream_reply(&q, None, |_| {});
        assert!(relay_of(&q, wire.clone()).is_some());
        let mut trailing = wire.clone();
        trailing.extend_from_slice(&[0, 0, 0]);
        assert!(relay_of(&q, trailing).is_none(), "trailing bytes");
        let plan = plan(&table(), &q, false, UdpPayload::default()).unwrap();
        let mut other = Message::from_vec(&wire).unwrap();
        other.answers[0].ttl += 1;
        assert!(client_reply(&q, &plan, &other, wire.clone()).is_none(), "another TTL");
        other.answers.clear();
        assert!(client_reply(&q, &plan, &other, wire).is_none(), "another record count");
    }

    #[test]
    fn a_reply_larger_than_the_clients_buffer_declines() {
        let q = query("www.example.test.", None);
        let wire = upstream_reply(&q, None, |reply| {
            let owner = reply.queries[0].name().clone();
            for i in 0..40 {
                reply.add_answer(Record::from_rdata(owner.clone(), 60, RData::A(A::new(10, 0, 0, i))));
            }
        });
        assert!(wire.len() > 512);
        assert!(relay_of(&q, wire).is_none());
    }

    #[test]
    fn a_cache_hit_is_written_from_the_stored_bytes() {
        use crate::cache::CacheSettings;
        use crate::upstream::UpstreamConfig;
        let cache = Arc::new(Cache::new(CacheSettings::default()));
        let forwarder = Arc::new(Forwarder::from_parts(UpstreamConfig::new(vec![])));
        let relay = Relay::new(forwarder, Arc::clone(&cache), Arc::new(Metrics::new()));
        let first = query("www.example.test.", Some(1232));
        let Some(Plan {
            cache_key: Some(key), ..
        }) = plan(&table(), &first, true, UdpPayload::default())
        else {
            panic!("a forwarded, cacheable question");
        };
        let mut out = [0u8; 4096];
        assert!(matches!(relay.step(&table(), &first, &mut out), Step::Forward(_)));
        let stored = Message::from_vec(&upstream_reply(&first, Some(4096), |_| {})).unwrap();
        cache.put(&key, &stored, Instant::now());

        let again = query("WWW.example.TEST.", Some(1232));
        let Step::Answered { len, qtype } = relay.step(&table(), &again, &mut out) else {
            panic!("a hit");
        };
        assert_eq!(qtype, RecordType::A);
        let reply = Message::from_vec(&out[..len]).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.queries[0].name().to_ascii(), "WWW.example.TEST.");
        assert_eq!(reply.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        assert_eq!(reply.answers.len(), 1);
        assert!(reply.answers[0].ttl <= 60);
        // The same flags without EDNS: the same entry, and no OPT record in the reply.
        let plain = query("www.example.test.", None);
        let Step::Answered { len, .. } = relay.step(&table(), &plain, &mut out) else {
            panic!("a hit");
        };
        assert!(Message::from_vec(&out[..len]).unwrap().edns.is_none());
    }

    #[test]
    fn servfail_carries_the_question_flags_and_opt() {
        let q = query("Www.example.test.", Some(1232));
        let plan = plan(&table(), &q, false, UdpPayload::default()).unwrap();
        let reply = Message::from_vec(&servfail(&q, &plan).unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, hickory_proto::op::ResponseCode::ServFail);
        assert_eq!(reply.metadata.id, 0x1234);
        assert!(reply.metadata.recursion_desired && reply.metadata.recursion_available);
        assert_eq!(reply.queries[0].name().to_ascii(), "Www.example.test.");
        assert_eq!(reply.edns.unwrap().max_payload(), 1232);
    }
}
