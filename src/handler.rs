//! The wire side: hickory-server's [`RequestHandler`] for meshdns. It validates the request,
//! asks the answer rules ([`crate::lookup`]) what to do, and either encodes the local answer or
//! relays the upstream's reply under the client's ID and question. Forwarded questions and
//! alias chases go through the response cache ([`crate::cache`]) first. No name logic lives here.

use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{debug, warn};

use crate::cache::{Cache, CacheKey};
use crate::hub::SharedTable;
use crate::lookup::{self, LocalAnswer, Resolution};
use crate::metrics::{Metrics, Outcome};
use crate::upstream::{Forward, ForwardError, Transport};
use crate::wire::{EDNS_VERSION, UdpPayload};

/// Payload advertised in meshdns's own queries (chasing an alias): the DNS flag day 2020 value
/// that avoids IP fragmentation.
pub const CHASE_UDP_PAYLOAD: u16 = 1232;

/// Answers DNS requests from the table, forwarding what the table does not own.
pub struct DnsHandler<F> {
    table: SharedTable,
    forwarder: Arc<F>,
    metrics: Arc<Metrics>,
    cache: Arc<Cache>,
    payload: UdpPayload,
}

/// Where a relayed reply came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Upstream,
    Cache,
}

impl<F: Forward> DnsHandler<F> {
    pub fn new(table: SharedTable, forwarder: Arc<F>) -> Self {
        Self::with_metrics(table, forwarder, Arc::new(Metrics::new()))
    }

    /// Like [`DnsHandler::new`], counting every answered query in `metrics`.
    pub fn with_metrics(table: SharedTable, forwarder: Arc<F>, metrics: Arc<Metrics>) -> Self {
        Self {
            table,
            forwarder,
            metrics,
            cache: Arc::new(Cache::disabled()),
            payload: UdpPayload::default(),
        }
    }

    /// Advertises `payload` (the `maxUdpPayload` setting) in OPT records instead of the
    /// default; the listeners cap UDP replies with the same value.
    pub fn with_udp_payload(mut self, payload: UdpPayload) -> Self {
        self.payload = payload;
        self
    }

    /// Answers forwarded questions and alias chases from `cache` while it holds them.
    pub fn with_cache(mut self, cache: Arc<Cache>) -> Self {
        self.cache = cache;
        self
    }

    /// The reply to `query` (wire bytes, asking `key`'s question about `qname`): from the cache
    /// while it holds one, else from upstream, offered to the cache on the way back.
    async fn forward(
        &self,
        key: Option<&CacheKey>,
        qname: &Name,
        query: &[u8],
        transport: Transport,
    ) -> (Result<Message, ForwardError>, Source) {
        if let Some(key) = key
            && let Some(hit) = self.cache.get(key, qname, Instant::now())
        {
            return (Ok(hit), Source::Cache);
        }
        let reply = self.forwarder.forward(query, transport).await;
        if let (Some(key), Ok(reply)) = (key, &reply) {
            self.cache.put(key, reply, Instant::now());
        }
        (reply, Source::Upstream)
    }

    /// The cache key of a question, when the cache is on and may answer it.
    fn cache_key(&self, query: &Query, metadata: &Metadata, edns: Option<&Edns>) -> Option<CacheKey> {
        if !self.cache.enabled() {
            return None;
        }
        CacheKey::for_query(query.name(), query.query_type(), query.query_class(), metadata, edns)
    }

    /// Fetches the addresses of an alias target from upstream, so that stub resolvers, which do
    /// not chase CNAMEs themselves, get the whole chain in one answer. Returns whether the
    /// answer now holds data fetched from upstream, which meshdns is not authoritative for.
    async fn chase(&self, answer: &mut LocalAnswer, target: &Name, qtype: RecordType) -> bool {
        // An alias into the cluster (an ExternalName pointing at another service) is answered
        // from the table itself.
        if let Resolution::Local(local) = lookup::resolve(&self.table.load(), target, qtype)
            && local.chase.is_none()
        {
            answer.answers.extend(local.answers);
            answer.rcode = local.rcode;
            answer.soa = local.soa;
            return false;
        }
        let mut msg = Message::query();
        msg.metadata.id = rand::random();
        msg.metadata.recursion_desired = true;
        let question = Query::query(target.clone(), qtype);
        let mut edns = Edns::new();
        edns.set_max_payload(CHASE_UDP_PAYLOAD);
        // Keyed like any client's query with the same bits, so chases and clients share entries.
        let key = self.cache_key(&question, &msg.metadata, Some(&edns));
        msg.add_query(question);
        msg.set_edns(edns);
        let reply = match msg.to_vec() {
            Ok(bytes) => self.forward(key.as_ref(), target, &bytes, Transport::Udp).await.0,
            Err(error) => {
                warn!(%error, "cannot encode alias chase query");
                answer.rcode = ResponseCode::ServFail;
                return false;
            }
        };
        match reply {
            Ok(reply) => {
                answer.answers.extend(alias_chain(reply.answers, target, qtype));
                // The alias exists; whether its target does is the upstream's to say.
                answer.rcode = reply.metadata.response_code;
                // A negative answer about the target carries the target zone's SOA, which
                // tells resolvers how long to cache it.
                answer.soa = reply
                    .authorities
                    .into_iter()
                    .find(|r| r.record_type() == RecordType::SOA);
            }
            Err(error) => {
                debug!(%target, %error, "alias target did not resolve upstream");
                answer.rcode = ResponseCode::ServFail;
            }
        }
        true
    }
}

/// Of an upstream's answer records, the chain that answers `qtype` about `target`: the CNAMEs
/// from `target` on, then the records of the asked type owned by where the chain ends. An
/// upstream's other records (unrelated names, another type) are not the alias's to pass on
/// under meshdns's answer.
fn alias_chain(records: Vec<Record>, target: &Name, qtype: RecordType) -> Vec<Record> {
    let mut chain = Vec::new();
    let mut owner = target.clone();
    // Each step takes a CNAME out of the records, so this ends.
    for _ in 0..records.len() {
        let Some(cname) = records
            .iter()
            .find(|r| r.name == owner && r.record_type() == RecordType::CNAME)
        else {
            break;
        };
        let hickory_proto::rr::RData::CNAME(next) = &cname.data else {
            break;
        };
        let next = next.0.clone();
        chain.push(cname.clone());
        if chain.iter().any(|r: &Record| r.name == next) {
            break;
        }
        owner = next;
    }
    chain.extend(records.into_iter().filter(|r| {
        r.name == owner
            && (r.record_type() == qtype || qtype == RecordType::ANY)
            && r.record_type() != RecordType::CNAME
    }));
    chain
}

/// The full path's response to `request` made from an upstream's (or the cache's) `reply`: its
/// header and records under the client's ID and question spelling, with `edns` (from
/// [`response_edns`]). The handler and the relay's declined replies both answer with it.
pub fn forwarded_response<'q>(
    request: &'q Request,
    reply: &'q Message,
    edns: Option<&'q Edns>,
) -> hickory_server::zone_handler::MessageResponse<
    'q,
    'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
> {
    let mut metadata = reply.metadata;
    metadata.id = request.metadata.id;
    MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        reply.answers.iter(),
        reply.authorities.iter(),
        std::iter::empty(),
        reply.additionals.iter(),
    )
}

/// The EDNS section of a response: present when the query had one, version 0, advertising
/// meshdns's own payload size (the listeners truncate UDP answers to what the client takes).
/// An upstream's OPT keeps its flags and options; meshdns's own echoes the client's DO bit.
pub fn response_edns(request: &Request, upstream: Option<&Edns>, payload: UdpPayload) -> Option<Edns> {
    let client = request.edns.as_ref()?;
    let mut edns = upstream.cloned().unwrap_or_default();
    edns.set_max_payload(payload.advertised());
    edns.set_version(EDNS_VERSION);
    if upstream.is_none() {
        edns.set_dnssec_ok(client.flags().dnssec_ok);
    }
    Some(edns)
}

fn transport(protocol: Protocol) -> Transport {
    match protocol {
        Protocol::Udp => Transport::Udp,
        _ => Transport::Tcp,
    }
}

fn failed(request: &Request, rcode: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl<F: Forward> RequestHandler for DnsHandler<F> {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let edns = response_edns(request, None, self.payload);
        let send_error = |rcode| {
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            let mut response = builder.error_msg(&request.metadata, rcode);
            response.metadata_mut().recursion_available = true;
            response
        };

        // The listeners answer these with a bare header (`wire::bare_reply`) before a request
        // is made; this covers a handler driven another way.
        if request.metadata.op_code != OpCode::Query {
            return send(&mut response_handle, send_error(ResponseCode::NotImp), request).await;
        }
        let [query] = request.queries.queries() else {
            return send(&mut response_handle, send_error(ResponseCode::FormErr), request).await;
        };
        let qname = query.original().name();
        let qtype = query.query_type();
        let refusal = if request.edns.as_ref().is_some_and(|e| e.version() > EDNS_VERSION) {
            // RFC 6891 6.1.3: an OPT of the version meshdns speaks and no answer; never
            // forwarded (the upstream may speak it, but the reply would not be meshdns's) and
            // never cached.
            Some(ResponseCode::BADVERS)
        } else if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            Some(ResponseCode::Refused)
        } else {
            None
        };
        if let Some(rcode) = refusal {
            debug!(client = %request.src(), name = %qname, %qtype, outcome = Outcome::Refused.as_str(), %rcode, elapsed_us = started.elapsed().as_micros() as u64, "query");
            self.metrics
                .request(transport(request.protocol()), qtype, Outcome::Refused, started);
            return send(&mut response_handle, send_error(rcode), request).await;
        }

        let resolution = if query.query_class() == DNSClass::IN {
            lookup::resolve(&self.table.load(), qname, qtype)
        } else {
            Resolution::Forward
        };

        match resolution {
            Resolution::Local(mut answer) => {
                let fetched = match answer.chase.take() {
                    Some(target) => self.chase(&mut answer, &target, qtype).await,
                    None => false,
                };
                lookup::shuffle_addresses(&mut answer.answers, &mut rand::rng());
                let mut metadata = Metadata::response_from_request(&request.metadata);
                // AA only for what the table holds: an alias target's records came from
                // upstream (RFC 1034 4.3.2: authoritative data only).
                metadata.authoritative = !fetched;
                metadata.recursion_available = true;
                metadata.response_code = answer.rcode;
                let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                let none: &[Record] = &[];
                let response = builder.build(
                    metadata,
                    answer.answers.iter(),
                    none.iter(),
                    answer.soa.iter(),
                    answer.additionals.iter(),
                );
                debug!(client = %request.src(), name = %qname, %qtype, outcome = answer.rule.as_str(), rcode = %answer.rcode, elapsed_us = started.elapsed().as_micros() as u64, "query");
                self.metrics.request(
                    transport(request.protocol()),
                    qtype,
                    Outcome::from(answer.rule),
                    started,
                );
                send(&mut response_handle, response, request).await
            }
            Resolution::Forward => {
                let key = self.cache_key(query.original(), &request.metadata, request.edns.as_ref());
                let transport = transport(request.protocol());
                match self.forward(key.as_ref(), qname, request.as_slice(), transport).await {
                    (Ok(reply), source) => {
                        let metadata = reply.metadata;
                        // A cached reply has no OPT record: the client's query decides it.
                        let edns = response_edns(request, reply.edns.as_ref(), self.payload);
                        let response = forwarded_response(request, &reply, edns.as_ref());
                        let outcome = match source {
                            Source::Upstream => Outcome::Forwarded,
                            Source::Cache => Outcome::CacheHit,
                        };
                        debug!(client = %request.src(), name = %qname, %qtype, outcome = outcome.as_str(), rcode = %metadata.response_code, elapsed_us = started.elapsed().as_micros() as u64, "query");
                        self.metrics.request(transport, qtype, outcome, started);
                        send(&mut response_handle, response, request).await
                    }
                    (Err(error), _) => {
                        debug!(client = %request.src(), name = %qname, %qtype, outcome = "error", %error, elapsed_us = started.elapsed().as_micros() as u64, "query");
                        self.metrics.request(transport, qtype, Outcome::Error, started);
                        send(&mut response_handle, send_error(ResponseCode::ServFail), request).await
                    }
                }
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            debug!(client = %request.src(), %error, "cannot send response");
            failed(request, ResponseCode::ServFail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::RData;
    use hickory_proto::rr::rdata::{A, CNAME};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn cname(from: &str, to: &str) -> Record {
        Record::from_rdata(name(from), 30, RData::CNAME(CNAME(name(to))))
    }

    fn a(owner: &str, last: u8) -> Record {
        Record::from_rdata(name(owner), 30, RData::A(A::new(192, 0, 2, last)))
    }

    #[test]
    fn an_alias_chase_keeps_the_chain_and_nothing_else() {
        let target = "www.example.test.";
        let shown = |records: Vec<Record>| records.iter().map(ToString::to_string).collect::<Vec<_>>();
        let cases: Vec<(&str, Vec<Record>, Vec<Record>)> = vec![
            (
                "addresses of the target",
                vec![a(target, 1), a(target, 2)],
                vec![a(target, 1), a(target, 2)],
            ),
            (
                "a CNAME chain, then its end's addresses",
                vec![
                    cname(target, "edge.cdn.test."),
                    cname("edge.cdn.test.", "e1.cdn.test."),
                    a("e1.cdn.test.", 3),
                ],
                vec![
                    cname(target, "edge.cdn.test."),
                    cname("edge.cdn.test.", "e1.cdn.test."),
                    a("e1.cdn.test.", 3),
                ],
            ),
            (
                "unrelated names the upstream added are dropped",
                vec![a("evil.example.", 9), a(target, 1), cname("other.test.", "x.test.")],
                vec![a(target, 1)],
            ),
            (
                "an address of a name the chain does not end at is dropped",
                vec![cname(target, "edge.cdn.test."), a(target, 7), a("edge.cdn.test.", 4)],
                vec![cname(target, "edge.cdn.test."), a("edge.cdn.test.", 4)],
            ),
            (
                "a CNAME loop ends",
                vec![cname(target, "b.test."), cname("b.test.", target)],
                vec![cname(target, "b.test."), cname("b.test.", target)],
            ),
        ];
        for (what, records, want) in cases {
            assert_eq!(
                shown(alias_chain(records, &name(target), RecordType::A)),
                shown(want),
                "{what}"
            );
        }
    }
}
