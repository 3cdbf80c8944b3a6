//! The bodies of the fuzz targets in `fuzz/`, kept in the library so that `tests/fuzz_corpus.rs`
//! can replay every checked-in corpus file through exactly the same checks in `cargo test`
//! (the fuzz crate is a separate workspace that the normal test suite cannot depend on).
//!
//! Every function takes arbitrary bytes. It must not panic on them; it panics, through an
//! assertion, only when an invariant of the code under test is broken, which is what the
//! fuzzer reports as a crash. Not part of meshdns's API.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service as K8sService, ServicePort as K8sServicePort, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as K8sEndpoint, EndpointConditions, EndpointPort, EndpointSlice as K8sEndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;

use crate::cluster::{ClusterState, DEFAULT_GATEWAY_SELECTOR, Ingress, LabelSelector, ObjectKey, SERVICE_NAME_LABEL};
use crate::explain;
use crate::fast;
use crate::handler::DnsHandler;
use crate::hub::SharedTable;
use crate::lookup::{self, Resolution};
use crate::metrics::Metrics;
use crate::resolv::{DNS_PORT, MAX_NAMESERVERS, ResolvConf};
use crate::server::{Encoded, Incoming, encode, incoming, take_frame, udp_limit};
use crate::source::dump::parse_dump;
use crate::source::kubeconfig::{KubeconfigError, check_untrusted, parse_kubeconfig};
use crate::source::live::{Folder, HEADLESS_LABEL};
use crate::strict;
use crate::table::{ClusterInput, Table, TableSettings};
use crate::upstream::{Forward, ForwardError, Transport};
use crate::wire::{self, UdpPayload};

/// A fuzz target: the name of its directory under `fuzz/corpus/` and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, for the corpus replay.
pub const TARGETS: &[Target] = &[
    ("handler_datagram", handler_datagram),
    ("tcp_framing", tcp_framing),
    ("dump_parser", dump_parser),
    ("kubeconfig", kubeconfig),
    ("resolv_conf", resolv_conf),
    ("watch_events", watch_events),
    ("relay_reply", relay_reply),
];

// ---------------------------------------------------------------------------------------------
// handler_datagram

/// The local cluster of the handler's table: headless services with per-pod names,
/// ExternalName aliases (in and out of the cluster), SRV ports, dual stack.
const HANDLER_LOCAL: &str = include_str!("../tests/fixtures/k8s-dns-cluster-1.yaml");
/// A remote cluster with an IP gateway.
const HANDLER_REMOTE: &str = include_str!("../tests/fixtures/k8s-dns-cluster-2.yaml");
/// Gateway of a remote cluster given as a host name, so remote-only names become a CNAME that
/// is chased upstream.
const HOSTNAME_GATEWAY: &str = "gw.cluster-4.example.test";
/// Where the fuzzed datagrams come from: an address the server answers.
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000);

/// The table, handler and runtime the datagram target runs against, built once per thread.
struct HandlerFixture {
    table: SharedTable,
    handler: DnsHandler<FakeUpstream>,
    runtime: tokio::runtime::Runtime,
    metrics: Metrics,
}

thread_local! {
    static HANDLER: HandlerFixture = HandlerFixture::new();
}

fn table_settings() -> TableSettings {
    let mut search: Vec<String> = crate::demo::SEARCH.iter().map(ToString::to_string).collect();
    search.push("corp.example".into());
    TableSettings {
        cluster_domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        search,
    }
}

fn gateway_selector() -> LabelSelector {
    LabelSelector::parse(DEFAULT_GATEWAY_SELECTOR).expect("the default gateway selector parses")
}

impl HandlerFixture {
    fn new() -> Self {
        let selector = gateway_selector();
        let parse = |text: &str| parse_dump(text.as_bytes(), &selector).expect("fixture dump parses");
        let states = [
            parse(HANDLER_LOCAL),
            parse(HANDLER_REMOTE),
            parse(crate::demo::CLUSTER_2),
            parse(crate::demo::CLUSTER_1),
        ];
        let hostname_gateway = [Ingress::Hostname(HOSTNAME_GATEWAY.into())];
        let input = |name, local, state, gateway_override| ClusterInput {
            name,
            local,
            state,
            loaded: true,
            gateway_override,
        };
        let inputs = [
            input("cluster-1", true, &states[0], None),
            input("cluster-2", false, &states[1], None),
            input("cluster-3", false, &states[2], None),
            input("cluster-4", false, &states[3], Some(&hostname_gateway[..])),
        ];
        let (table, _) = Table::build(&table_settings(), &inputs, 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime can be built");
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(table));
        Self {
            handler: DnsHandler::new(Arc::clone(&table), Arc::new(FakeUpstream)),
            table,
            runtime,
            metrics: Metrics::new(),
        }
    }

    /// What the server sends back for `bytes` received over `transport`: the steps of the
    /// server's `incoming()` (header check, decoding, the FORMERR fallback), then the handler.
    /// Returns the decoded request too, when there was one.
    async fn exchange(&self, bytes: &[u8], transport: Transport) -> Exchange {
        let mut exchange = Exchange::default();
        let request = match incoming(bytes, CLIENT, transport, &self.metrics) {
            Incoming::Query(request) => request,
            Incoming::Reply(reply) => {
                exchange.reply = Some(reply);
                return exchange;
            }
            Incoming::Dropped => return exchange,
        };
        let capture = Capture {
            limit: match transport {
                Transport::Udp => udp_limit(&request, UdpPayload::default()),
                Transport::Tcp => u16::MAX,
            },
            replies: Arc::default(),
        };
        self.handler
            .handle_request::<_, TokioTime>(&request, capture.clone())
            .await;
        let mut replies = std::mem::take(&mut *capture.replies.lock().unwrap_or_else(|p| p.into_inner()));
        assert!(
            replies.len() <= 1,
            "the handler sent {} replies to one query",
            replies.len()
        );
        if let Some((reply, fell_back)) = replies.pop() {
            exchange.reply = Some(reply);
            exchange.fell_back = fell_back;
        }
        exchange.request = Some(*request);
        exchange
    }
}

/// What the server does with one received message.
#[derive(Default)]
struct Exchange {
    /// The decoded query, when it decoded.
    request: Option<Request>,
    reply: Option<Vec<u8>>,
    /// The response could not be encoded and the reply is the server's bare SERVFAIL.
    fell_back: bool,
}

/// A query into the request handler, over UDP and over TCP, exactly as the server would pass
/// it on. The reply, if any, must decode, be a response with the query's ID and, for a query
/// with one question, echo that question byte for byte (0x20 case included); a UDP reply must
/// fit the client's size. Where the UDP fast path ([`fast`]) answers, its reply must pass the
/// same checks and say what the full path says.
pub fn handler_datagram(data: &[u8]) {
    HANDLER.with(|fixture| {
        for transport in [Transport::Udp, Transport::Tcp] {
            let exchange = fixture.runtime.block_on(fixture.exchange(data, transport));
            let request = exchange.request.as_ref();
            if let Some(reply) = &exchange.reply {
                if exchange.fell_back {
                    check_fallback(data, request, reply, transport);
                } else {
                    check_reply(data, request, reply, transport);
                }
            }
            if transport == Transport::Udp {
                check_fast_path(&fixture.table.load(), data, request, exchange.reply.as_deref());
            }
        }
    });
}

/// Room the server gives one fast-path reply.
const FAST_REPLY_MAX: usize = 4096;

/// The fast path's reply to `query`, at a few rotations, against the full path's `full`: the
/// same header, question (byte for byte), answer records (as a set: the fast path rotates
/// addresses, the full path shuffles them), authority, additional records and EDNS.
fn check_fast_path(table: &Table, query: &[u8], request: Option<&Request>, full: Option<&[u8]>) {
    let mut out = vec![0u8; FAST_REPLY_MAX];
    for rotation in [0, 1, 5] {
        let Some(answer) = fast::answer(table, query, rotation, UdpPayload::default(), &mut out) else {
            return;
        };
        let reply = out.get(..answer.len).expect("the fast path reports what it wrote");
        let full = full.expect("the fast path answered a query the full path does not answer");
        let full_bytes = full;
        assert!(
            request.is_some(),
            "the fast path answered a query hickory cannot decode"
        );
        check_reply(query, request, reply, Transport::Udp);
        let fast = Message::from_vec(reply).expect("checked above");
        let full = Message::from_vec(full).expect("checked above");
        assert_eq!(fast.metadata, full.metadata, "fast and full path headers");
        assert_eq!(fast.queries, full.queries, "fast and full path questions");
        let sorted = |records: &[Record]| {
            let mut all: Vec<String> = records.iter().map(ToString::to_string).collect();
            all.sort();
            all
        };
        assert_eq!(
            sorted(&fast.answers),
            sorted(&full.answers),
            "fast and full path answers"
        );
        assert_eq!(fast.authorities, full.authorities, "fast and full path authority");
        assert_eq!(fast.additionals, full.additionals, "fast and full path additionals");
        assert_eq!(fast.edns, full.edns, "fast and full path EDNS");
        // And on the wire: the same header bytes, question bytes and records (names expanded,
        // answers in canonical order), not only the same decoded message.
        let (fast, full) = (
            strict::check(reply).expect("checked above"),
            strict::check(full_bytes).expect("checked above"),
        );
        assert_eq!(reply[..4], full_bytes[..4], "fast and full path header flags");
        let sorted = |layout: &strict::Layout| {
            let mut records = layout.records.clone();
            records.sort();
            records
        };
        assert_eq!(sorted(&fast), sorted(&full), "fast and full path records on the wire");
        assert_eq!(
            (fast.questions, fast.answers, fast.authorities, fast.additionals),
            (full.questions, full.answers, full.authorities, full.additionals),
            "fast and full path counts"
        );
    }
}

fn check_reply(query: &[u8], request: Option<&Request>, reply: &[u8], transport: Transport) {
    let header = Header::read(&mut BinDecoder::new(query)).expect("only queries with a header are answered");
    let layout = strict::check(reply).unwrap_or_else(|e| panic!("{transport} reply is not strictly well-formed: {e}"));
    let message = Message::from_vec(reply).unwrap_or_else(|e| panic!("{transport} reply does not decode: {e}"));
    let meta = &message.metadata;
    assert_eq!(
        meta.message_type,
        MessageType::Response,
        "{transport} reply is not a response"
    );
    assert_eq!(meta.id, header.metadata.id, "{transport} reply has another ID");
    assert_eq!(
        meta.op_code, header.metadata.op_code,
        "{transport} reply has another opcode"
    );
    // A header-only FORMERR or NOTIMP: QR, the ID and the opcode, no other flag.
    let bare = |rcode: u8, why: &str| {
        assert_eq!(layout.rcode, u16::from(rcode), "{why}");
        assert_eq!(
            reply[2..4],
            [wire::FLAG_QR | (query[2] & wire::OPCODE_MASK), rcode],
            "{why}: flags"
        );
        assert_eq!(reply.len(), wire::HEADER_LEN, "{why}: header only");
    };
    if header.metadata.op_code != OpCode::Query {
        bare(wire::RCODE_NOTIMP, "another opcode");
        return;
    }
    let Some(request) = request else {
        bare(wire::RCODE_FORMERR, "undecodable query");
        return;
    };
    if request.queries.queries().len() != 1 {
        bare(wire::RCODE_FORMERR, "question count");
        return;
    }
    let limit = match transport {
        Transport::Udp => udp_limit(request, UdpPayload::default()),
        Transport::Tcp => u16::MAX,
    };
    assert!(
        reply.len() <= usize::from(limit),
        "{transport} reply of {} bytes exceeds the client's {limit}",
        reply.len()
    );
    assert_eq!(
        layout.opt.is_some(),
        request.edns.is_some(),
        "{transport}: an OPT record exactly when the query had one"
    );
    if let Some(opt) = layout.opt {
        assert_eq!(opt.version, wire::EDNS_VERSION, "meshdns speaks EDNS version 0");
        assert_eq!(opt.payload, UdpPayload::default().advertised(), "advertised payload");
    }
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        // hickory names rcode 16 BADSIG (it is both, RFC 6891 and RFC 8945): compare numbers.
        assert_eq!(layout.rcode, wire::RCODE_BADVERS, "EDNS version above 0");
        assert_eq!(
            message.answers.len() + message.authorities.len(),
            0,
            "BADVERS has no answer"
        );
    }
    if transport == Transport::Tcp {
        assert!(!meta.truncation, "TC over TCP");
    }
    let [asked] = request.queries.queries() else {
        unreachable!("one question, checked above");
    };
    let asked = asked.original();
    let [echoed] = &message.queries[..] else {
        panic!(
            "{transport} reply has {} questions, not the one asked",
            message.queries.len()
        );
    };
    assert!(
        echoed.name().eq_case(asked.name()) && echoed.name().is_fqdn() == asked.name().is_fqdn(),
        "{transport} reply echoes {} for {}",
        echoed.name(),
        asked.name()
    );
    assert_eq!(echoed.query_type(), asked.query_type(), "echoed question type");
    assert_eq!(echoed.query_class(), asked.query_class(), "echoed question class");
}

/// The server's bare SERVFAIL for a response it could not encode. Only a query with several
/// questions can cause it (the FORMERR echoing them all does not fit 512 bytes): one question
/// always fits, so its answer must encode.
fn check_fallback(query: &[u8], request: Option<&Request>, reply: &[u8], transport: Transport) {
    let request = request.expect("only a decoded query reaches the handler");
    assert_ne!(
        request.queries.queries().len(),
        1,
        "the {transport} answer to a one-question query could not be encoded"
    );
    let header = Header::read(&mut BinDecoder::new(query)).expect("a decoded query has a header");
    let message = Message::from_vec(reply).expect("the bare SERVFAIL decodes");
    assert_eq!(message.metadata.id, header.metadata.id, "fallback ID");
    assert_eq!(message.metadata.response_code, ResponseCode::ServFail, "fallback rcode");
}

/// One reply, and whether it is the server's fallback SERVFAIL.
type Captured = (Vec<u8>, bool);

/// Captures what the handler sends, encoded by the server's own `server::encode`.
#[derive(Clone)]
struct Capture {
    /// What the server's responder cuts replies to for this request.
    limit: u16,
    replies: Arc<Mutex<Vec<Captured>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let Encoded { info, bytes, fell_back } = encode(response, self.limit)?;
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((bytes, fell_back));
        Ok(info)
    }
}

/// An upstream that answers at once, without I/O. What it answers depends only on the
/// question's name, so every input replays the same way: a failure (SERVFAIL to the client),
/// NXDOMAIN with a SOA, a CNAME with many addresses (truncation), or a large TXT with an EDNS
/// option echoed.
struct FakeUpstream;

impl Forward for FakeUpstream {
    fn forward(
        &self,
        query: &[u8],
        _transport: Transport,
    ) -> impl std::future::Future<Output = Result<Message, ForwardError>> + Send {
        std::future::ready(fake_reply(query))
    }
}

fn fake_reply(query: &[u8]) -> Result<Message, ForwardError> {
    let query = Message::from_vec(query).map_err(|_| ForwardError::Deadline)?;
    let mut reply = Message::new(query.metadata.id, MessageType::Response, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    let Some(question) = query.queries.first() else {
        return Ok(reply);
    };
    let qname = question.name().to_lowercase();
    let selector: usize = qname.iter().flatten().map(|&b| usize::from(b)).sum();
    let zone = Name::from_ascii("example.test.").map_err(|_| ForwardError::Deadline)?;
    match selector % 4 {
        0 => return Err(ForwardError::Deadline),
        1 => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 7200, 1800, 86_400, 60);
            reply.add_authority(Record::from_rdata(zone, 60, RData::SOA(soa)));
        }
        2 => {
            let target = Name::from_ascii("target.example.test.").map_err(|_| ForwardError::Deadline)?;
            reply.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::CNAME(CNAME(target.clone())),
            ));
            for i in 0..40u8 {
                let rdata = match question.query_type() {
                    RecordType::AAAA => RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(i)))),
                    _ => RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
                };
                reply.add_answer(Record::from_rdata(target.clone(), 60, rdata));
            }
        }
        _ => {
            let text = vec!["meshdns fuzzing ".repeat(12); 3];
            reply.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::TXT(TXT::new(text)),
            ));
            if query.edns.is_some() {
                let mut edns = Edns::new();
                edns.set_max_payload(1232);
                // A server cookie (RFC 7873), as real resolvers return one.
                edns.options_mut().insert(EdnsOption::Unknown(10, vec![7; 24]));
                reply.set_edns(edns);
            }
        }
    }
    Ok(reply)
}

// ---------------------------------------------------------------------------------------------
// tcp_framing

/// A TCP byte stream into [`take_frame`], delivered in chunks whose sizes the input chooses:
/// the frames must come out whole and in order, the same whatever the chunking, and what is
/// left in the buffer must be exactly the bytes not yet framed.
///
/// Input: one byte `n`, then `n % 16` chunk sizes (used in turn; 0 = a read that brought
/// nothing), then the stream.
pub fn tcp_framing(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (sizes, stream) = rest.split_at(usize::from(n % 16).min(rest.len()));
    // Without one non-zero size the stream would never arrive: deliver it whole.
    let sizes: &[u8] = if sizes.iter().any(|&s| s != 0) { sizes } else { &[] };

    // What the stream holds, read in one piece.
    let mut expected = Vec::new();
    let mut framed = 0;
    while let Some(&[hi, lo]) = stream.get(framed..framed + 2) {
        let end = framed + 2 + usize::from(u16::from_be_bytes([hi, lo]));
        let Some(frame) = stream.get(framed + 2..end) else {
            break;
        };
        expected.push(frame);
        framed = end;
    }

    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut consumed = 0;
    let mut frames = Vec::new();
    let mut turn = 0;
    loop {
        while let Some(frame) = take_frame(&mut buf) {
            consumed += 2 + frame.len();
            frames.push(frame);
        }
        assert_eq!(
            &buf[..],
            stream.get(consumed..fed).unwrap_or_default(),
            "the buffer must hold exactly the bytes not yet framed"
        );
        if fed == stream.len() {
            break;
        }
        let size = match sizes.get(turn % sizes.len().max(1)) {
            Some(&size) => usize::from(size),
            None => stream.len(),
        };
        turn += 1;
        let end = (fed + size).min(stream.len());
        buf.extend_from_slice(stream.get(fed..end).unwrap_or_default());
        fed = end;
    }
    assert_eq!(frames.len(), expected.len(), "number of frames");
    for (i, (got, want)) in frames.iter().zip(&expected).enumerate() {
        assert_eq!(&got[..], *want, "frame {i}");
    }
    assert_eq!(consumed, framed, "bytes framed");
    assert_eq!(buf.len(), stream.len() - framed, "bytes left over");
}

// ---------------------------------------------------------------------------------------------
// dump_parser

/// Bytes as an object dump: an error or a state, never a panic. A state must hold lowercase
/// keys, and building a table from it (as the local cluster and as a remote one) and answering
/// every name of that table must not panic either.
pub fn dump_parser(data: &[u8]) {
    let Ok(state) = parse_dump(data, &gateway_selector()) else {
        return;
    };
    let lowercase = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
    for key in state.services.keys().chain(state.endpoint_slices.keys()) {
        assert!(
            lowercase(key.namespace()) && lowercase(key.name()),
            "key {key} is not lowercase"
        );
    }
    for slice in state.endpoint_slices.values() {
        assert!(
            lowercase(&slice.service),
            "slice service {} is not lowercase",
            slice.service
        );
    }
    for table in tables_of(&state) {
        let mut names: BTreeSet<Name> = table.iter().filter_map(|(name, _)| name).collect();
        names.extend(reverse_names(&state));
        for name in &names {
            for qtype in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::SRV,
                RecordType::PTR,
                RecordType::ANY,
            ] {
                let _ = lookup::resolve(&table, name, qtype);
            }
        }
        let _ = explain::table_entries(&table);
    }
}

/// Tables of `state` as the local cluster and as the only remote one (whose gateway it holds
/// itself), beside an empty cluster of the other kind.
fn tables_of(state: &ClusterState) -> [Table; 2] {
    let empty = ClusterState::default();
    let settings = table_settings();
    let input = |name, local, state| ClusterInput {
        name,
        local,
        state,
        loaded: true,
        gateway_override: None,
    };
    [
        Table::build(&settings, &[input("c1", true, state), input("c2", false, &empty)], 1).0,
        Table::build(&settings, &[input("c1", true, &empty), input("c2", false, state)], 1).0,
    ]
}

/// The reverse names of every address a state holds.
fn reverse_names(state: &ClusterState) -> Vec<Name> {
    let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
    for svc in state.services.values() {
        if let crate::cluster::ServiceKind::ClusterIp(list) = &svc.kind {
            ips.extend(list);
        }
    }
    for slice in state.endpoint_slices.values() {
        ips.extend(slice.endpoints.iter().flat_map(|e| e.addresses.iter()));
    }
    ips.iter().map(|ip| Name::from(*ip)).collect()
}

// ---------------------------------------------------------------------------------------------
// kubeconfig

/// Text as a kubeconfig, trusted and untrusted: never a panic; an untrusted kubeconfig is
/// accepted only if the trusted one is and only without anything that runs a program or names
/// a file of the pod; one refused only as untrusted is refused for exactly that.
pub fn kubeconfig(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let trusted = parse_kubeconfig(text, false);
    let untrusted = parse_kubeconfig(text, true);
    match (&trusted, &untrusted) {
        (Err(t), Err(u)) => {
            if !matches!(u, KubeconfigError::Untrusted { .. }) {
                assert_eq!(t.to_string(), u.to_string(), "the same text fails the same way");
            }
        }
        (Err(e), Ok(_)) => panic!("accepted as untrusted but refused as trusted: {e}"),
        (Ok(config), Err(e)) => {
            assert!(
                matches!(e, KubeconfigError::Untrusted { .. }),
                "refused only as untrusted: {e}"
            );
            assert!(
                check_untrusted(config).is_err(),
                "the rules refuse what parsing refused"
            );
        }
        (Ok(_), Ok(config)) => {
            for user in config.auth_infos.iter().filter_map(|u| u.auth_info.as_ref()) {
                assert!(user.exec.is_none() && user.auth_provider.is_none(), "a program to run");
                assert!(
                    user.token_file.is_none() && user.client_certificate.is_none() && user.client_key.is_none(),
                    "a user file path"
                );
            }
            for cluster in config.clusters.iter().filter_map(|c| c.cluster.as_ref()) {
                assert!(cluster.certificate_authority.is_none(), "a CA file path");
                assert!(cluster.insecure_skip_tls_verify != Some(true), "TLS verification off");
                assert!(cluster.proxy_url.is_none(), "a proxy");
            }
            assert!(
                config
                    .clusters
                    .iter()
                    .any(|c| c.cluster.as_ref().is_some_and(|c| c.server.is_some())),
                "a kubeconfig without a server"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// resolv_conf

/// Bytes as resolv.conf: never a panic; at most [`MAX_NAMESERVERS`] nameservers on port 53;
/// search domains lowercase, non-empty, without the trailing dot.
pub fn resolv_conf(data: &[u8]) {
    let conf = ResolvConf::parse(data);
    assert!(conf.nameservers.len() <= MAX_NAMESERVERS, "{:?}", conf.nameservers);
    assert!(
        conf.nameservers.iter().all(|ns| ns.port() == DNS_PORT),
        "{:?}",
        conf.nameservers
    );
    for domain in &conf.search {
        assert!(!domain.is_empty(), "empty search domain");
        assert!(!domain.ends_with('.'), "search domain {domain:?} keeps its dot");
        assert!(
            !domain.bytes().any(|b| b.is_ascii_uppercase()),
            "search domain {domain:?}"
        );
    }
    assert_eq!(conf, ResolvConf::parse(data), "parsing is deterministic");
}

// ---------------------------------------------------------------------------------------------
// watch_events

/// The cluster name the folder reports under.
const WATCH_CLUSTER: &str = "fuzz";
/// Bound on decoded events, so one input stays fast.
const MAX_EVENTS: usize = 64;

/// A sequence of watch events on Services and EndpointSlices (a few names, namespaces, IPs and
/// ports, chosen by the input) folded by [`Folder`]. A fold that says nothing changed must have
/// changed nothing; and the state folded event by event must equal the state of one fresh list
/// of the objects that are left, as must every answer of the tables built from the two (the
/// table must not depend on the order the state's maps happen to iterate in).
pub fn watch_events(data: &[u8]) {
    let mut input = Unstructured(data);
    let mut folder = Folder::new(gateway_selector());
    let mut services: Model<K8sService> = Model::default();
    let mut slices: Model<K8sEndpointSlice> = Model::default();
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        let op = input.byte();
        let before = folder.state.clone();
        let changed = if op.is_multiple_of(2) {
            let event = input.event(Unstructured::service);
            services.apply(&event, |s| object_key(&s.metadata));
            folder.fold_service(event, WATCH_CLUSTER)
        } else {
            let event = input.event(Unstructured::slice);
            slices.apply(&event, |s| object_key(&s.metadata));
            folder.fold_slice(event, WATCH_CLUSTER)
        };
        if !changed {
            assert_eq!(folder.state, before, "a fold reported no change but changed the state");
        }
    }

    let mut fresh = Folder::new(gateway_selector());
    fresh.fold_service(Event::Init, WATCH_CLUSTER);
    for svc in services.objects.values() {
        fresh.fold_service(Event::InitApply(svc.clone()), WATCH_CLUSTER);
    }
    fresh.fold_service(Event::InitDone, WATCH_CLUSTER);
    fresh.fold_slice(Event::Init, WATCH_CLUSTER);
    for slice in slices.objects.values() {
        fresh.fold_slice(Event::InitApply(slice.clone()), WATCH_CLUSTER);
    }
    fresh.fold_slice(Event::InitDone, WATCH_CLUSTER);
    assert_eq!(folder.state, fresh.state, "folded state differs from a fresh list");

    for (folded, listed) in tables_of(&folder.state).iter().zip(tables_of(&fresh.state).iter()) {
        assert_eq!(
            table_dump(folded, &folder.state),
            table_dump(listed, &fresh.state),
            "tables of equal states answer differently"
        );
    }
}

/// The objects a watch has left: the key of an object is the folder's (namespace defaulted,
/// lowercase), and a relist replaces everything when it completes.
struct Model<T> {
    objects: BTreeMap<ObjectKey, T>,
    relist: Option<BTreeMap<ObjectKey, T>>,
}

impl<T> Default for Model<T> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            relist: None,
        }
    }
}

impl<T: Clone> Model<T> {
    fn apply(&mut self, event: &Event<T>, key: impl Fn(&T) -> ObjectKey) {
        match event {
            Event::Apply(object) => {
                self.objects.insert(key(object), object.clone());
            }
            Event::Delete(object) => {
                self.objects.remove(&key(object));
            }
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let Some(relist) = &mut self.relist {
                    relist.insert(key(object), object.clone());
                }
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.objects = relist;
                }
            }
        }
    }
}

fn object_key(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// Everything a table answers, in a canonical order: every question about every name it holds
/// (and their parents, and the reverse names of the state's addresses) with the records of the
/// answer sorted (the handler shuffles addresses anyway), and the `/debug/table` rows.
fn table_dump(table: &Table, state: &ClusterState) -> Vec<String> {
    let mut names: BTreeSet<Name> = BTreeSet::new();
    for (name, _) in table.iter() {
        let Some(mut name) = name else { continue };
        while name.num_labels() > 0 && names.insert(name.clone()) {
            name = name.base_name();
        }
    }
    names.extend(reverse_names(state));
    let mut out = Vec::new();
    for name in &names {
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SRV,
            RecordType::PTR,
            RecordType::CNAME,
        ] {
            let answer = match lookup::resolve(table, name, qtype) {
                Resolution::Forward => "forward".to_string(),
                Resolution::Local(answer) => {
                    let mut answers: Vec<String> = answer.answers.iter().map(ToString::to_string).collect();
                    let mut additionals: Vec<String> = answer.additionals.iter().map(ToString::to_string).collect();
                    answers.sort();
                    additionals.sort();
                    format!(
                        "{} {} {answers:?} {additionals:?} soa={} chase={:?}",
                        answer.rule.as_str(),
                        answer.rcode,
                        answer.soa.is_some(),
                        answer.chase
                    )
                }
            };
            out.push(format!("{name} {qtype}: {answer}"));
        }
    }
    for mut row in explain::table_entries(table) {
        row.records.sort();
        out.push(format!("{row:?}"));
    }
    out
}

/// Reads choices from the fuzz input, one byte at a time; past its end every choice is the
/// first one, so every input decodes to something.
struct Unstructured<'a>(&'a [u8]);

const NAMESPACES: &[Option<&str>] = &[
    Some("a"),
    Some("b"),
    Some("istio-system"),
    None,
    Some("default"),
    Some("A"),
];
const SERVICE_NAMES: &[&str] = &["web", "db", "gw", "Web", "", "bad.name"];
const SLICE_NAMES: &[&str] = &["web-abc", "web-def", "db-1", "db-2", ""];
const CLUSTER_IPS: &[&str] = &[
    "10.0.0.1", "10.0.0.2", "fd00::1", "None", "none", "bogus", "", "10.1.0.1",
];
const EXTERNAL_NAMES: &[Option<&str>] = &[
    Some("example.com."),
    Some(""),
    None,
    Some("web.a.svc.cluster.local"),
    Some("Bad..Name"),
];
const PORT_NAMES: &[Option<&str>] = &[None, Some("http"), Some(""), Some("grpc"), Some("HTTP")];
const PORT_PROTOCOLS: &[Option<&str>] = &[None, Some("TCP"), Some("udp"), Some("SCTP"), Some("bogus")];
const SERVICE_PORTS: &[i32] = &[80, 0, -1, 70_000, 443];
const ENDPOINT_PORTS: &[Option<i32>] = &[Some(80), Some(0), None, Some(8080), Some(-5)];
const ENDPOINT_IPS: &[&str] = &["10.1.0.1", "10.1.0.2", "fd00::10", "10.0.0.1", "x", "10.1.0.3"];
const HOSTNAMES: &[Option<&str>] = &[None, Some("pod-0"), Some("POD-0"), Some("pod-1")];
const INGRESS_IPS: &[Option<&str>] = &[Some("34.1.1.1"), Some("2001:db8::1"), Some("nope"), Some(""), None];
const INGRESS_HOSTS: &[Option<&str>] = &[None, Some("gw.example.com."), Some("GW.example.com"), Some("")];
const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6", "FQDN"];
const SLICE_SERVICES: &[Option<&str>] = &[Some("web"), Some("db"), Some("Web"), None, Some("gw")];

impl Unstructured<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        let i = usize::from(self.byte()) % items.len().max(1);
        items[i]
    }

    fn count(&mut self, max: u8) -> usize {
        usize::from(self.byte() % (max + 1))
    }

    fn string(&mut self, items: &[&str]) -> String {
        self.pick(items).to_string()
    }

    fn opt_string(&mut self, items: &[Option<&str>]) -> Option<String> {
        self.pick(items).map(str::to_string)
    }

    fn event<T>(&mut self, object: impl Fn(&mut Self) -> T) -> Event<T> {
        match self.byte() % 5 {
            0 => Event::Apply(object(self)),
            1 => Event::Delete(object(self)),
            2 => Event::Init,
            3 => Event::InitApply(object(self)),
            _ => Event::InitDone,
        }
    }

    fn meta(&mut self, names: &[&str], labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            namespace: self.opt_string(NAMESPACES),
            name: Some(self.string(names)),
            labels: (!labels.is_empty()).then_some(labels),
            ..ObjectMeta::default()
        }
    }

    fn service(&mut self) -> K8sService {
        let mut labels = BTreeMap::new();
        let which = self.byte();
        if which & 1 != 0 {
            labels.insert("istio".to_string(), "eastwestgateway".to_string());
        }
        if which & 2 != 0 {
            labels.insert("app".to_string(), "x".to_string());
        }
        let metadata = self.meta(SERVICE_NAMES, labels);
        let spec = match self.byte() % 4 {
            0 => None,
            kind => {
                let cluster_ips = (0..self.count(2)).map(|_| self.string(CLUSTER_IPS)).collect();
                let cluster_ip = self.byte().is_multiple_of(2).then(|| self.string(CLUSTER_IPS));
                let ports = (0..self.count(2))
                    .map(|_| K8sServicePort {
                        name: self.opt_string(PORT_NAMES),
                        port: self.pick(SERVICE_PORTS),
                        protocol: self.opt_string(PORT_PROTOCOLS),
                        ..K8sServicePort::default()
                    })
                    .collect();
                let publish_not_ready_addresses = self.pick(&[None, Some(true), Some(false)]);
                let (type_, external_name) = match kind {
                    1 => (Some("ExternalName".to_string()), self.opt_string(EXTERNAL_NAMES)),
                    2 => (Some("LoadBalancer".to_string()), None),
                    _ => (None, None),
                };
                Some(ServiceSpec {
                    cluster_ips: Some(cluster_ips),
                    cluster_ip,
                    ports: Some(ports),
                    publish_not_ready_addresses,
                    type_,
                    external_name,
                    ..ServiceSpec::default()
                })
            }
        };
        let status = (!self.byte().is_multiple_of(2)).then(|| {
            let ingress = (0..self.count(2))
                .map(|_| LoadBalancerIngress {
                    ip: self.opt_string(INGRESS_IPS),
                    hostname: self.opt_string(INGRESS_HOSTS),
                    ..LoadBalancerIngress::default()
                })
                .collect();
            ServiceStatus {
                load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress) }),
                ..ServiceStatus::default()
            }
        });
        K8sService { metadata, spec, status }
    }

    fn slice(&mut self) -> K8sEndpointSlice {
        let mut labels = BTreeMap::new();
        if let Some(service) = self.opt_string(SLICE_SERVICES) {
            labels.insert(SERVICE_NAME_LABEL.to_string(), service);
        }
        if self.byte().is_multiple_of(2) {
            labels.insert(HEADLESS_LABEL.to_string(), String::new());
        }
        let metadata = self.meta(SLICE_NAMES, labels);
        let address_type = self.string(ADDRESS_TYPES);
        let endpoints = (0..self.count(3))
            .map(|_| K8sEndpoint {
                addresses: (0..self.count(2)).map(|_| self.string(ENDPOINT_IPS)).collect(),
                conditions: self
                    .pick(&[None, Some(Some(true)), Some(Some(false)), Some(None)])
                    .map(|ready| EndpointConditions {
                        ready,
                        ..EndpointConditions::default()
                    }),
                hostname: self.opt_string(HOSTNAMES),
                ..K8sEndpoint::default()
            })
            .collect();
        let ports = (!self.byte().is_multiple_of(3)).then(|| {
            (0..self.count(2))
                .map(|_| EndpointPort {
                    name: self.opt_string(PORT_NAMES),
                    port: self.pick(ENDPOINT_PORTS),
                    protocol: self.opt_string(PORT_PROTOCOLS),
                    ..EndpointPort::default()
                })
                .collect()
        });
        K8sEndpointSlice {
            address_type,
            endpoints,
            metadata,
            ports,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// relay_reply

/// The table the relay decides against: the cluster domain only, so every other name is
/// forwarded.
fn relay_table() -> &'static Table {
    static TABLE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        Table::empty(&TableSettings {
            cluster_domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            search: vec!["default.svc.cluster.local".into()],
        })
    })
}

/// `data` is a query (its length in the first two bytes) and an upstream's reply to it. When
/// the relay takes the query and the forwarder's checks accept the reply, the relay's reply to
/// the client, if it makes one, carries the client's ID and question bytes, fits its buffer,
/// keeps the upstream's rcode and records and has an OPT record exactly when the query did.
/// Stored in the cache, the reply answered from the cached bytes says what the full path's
/// cache hit says.
pub fn relay_reply(data: &[u8]) {
    use crate::cache::{Cache, CacheSettings};
    use crate::relay::{self, Relay, Step};
    use crate::upstream::{Forwarder, UpstreamConfig, check_reply, parse_query};

    let [l0, l1, rest @ ..] = data else { return };
    let Some((query, upstream)) = rest.split_at_checked(usize::from(u16::from_be_bytes([*l0, *l1]))) else {
        return;
    };
    let table = relay_table();
    let payload = UdpPayload::default();
    let Some(plan) = relay::plan(table, query, false, payload) else {
        return;
    };
    let (Ok((client_id, expected)), [i0, i1, ..]) = (parse_query(query), upstream) else {
        return;
    };
    let Ok(accepted) = check_reply(upstream, u16::from_be_bytes([*i0, *i1]), &expected, Transport::Udp) else {
        return;
    };
    let client = Message::from_vec(query).ok();
    let client_edns = client.as_ref().and_then(|m| m.edns.clone());
    let limit = usize::from(payload.limit(client_edns.as_ref().map(Edns::max_payload)));
    let Some(question) = crate::wire::skip_name(query, crate::wire::HEADER_LEN).and_then(|end| query.get(12..end + 4))
    else {
        return;
    };

    if let Some(bytes) = relay::client_reply(query, &plan, &accepted, upstream.to_vec()) {
        strict::check(&bytes).unwrap_or_else(|e| panic!("the relayed reply is not strictly well-formed: {e}"));
        let reply = Message::from_vec(&bytes).expect("the relayed reply decodes");
        assert_eq!(reply.metadata.id, client_id);
        assert!(bytes.len() <= limit, "{} bytes for a {limit}-byte buffer", bytes.len());
        assert_eq!(
            bytes.get(12..12 + question.len()),
            Some(question),
            "the question as sent"
        );
        assert_eq!(reply.metadata.response_code, accepted.metadata.response_code);
        assert_eq!(reply.answers, accepted.answers);
        assert_eq!(reply.authorities, accepted.authorities);
        assert_eq!(reply.additionals, accepted.additionals);
        assert_eq!(reply.edns.is_some(), client_edns.is_some());
        if let Some(got) = &reply.edns {
            assert_eq!(got.max_payload(), payload.advertised());
        }
    }

    // The same reply through the cache: the relay's hit against the full path's.
    let Some(key) = relay::plan(table, query, true, payload).and_then(|plan| plan.cache_key().cloned()) else {
        return;
    };
    let cache = Arc::new(Cache::new(CacheSettings::default()));
    let forwarder = Arc::new(Forwarder::from_parts(UpstreamConfig::new(Vec::new())));
    let relay = Relay::new(forwarder, Arc::clone(&cache), Arc::new(Metrics::new()));
    let now = std::time::Instant::now();
    cache.put(&key, &accepted, now);
    let Some(full) = cache.get(&key, expected.name(), now) else {
        return;
    };
    let mut out = [0u8; 4096];
    if let Step::Answered { len, .. } = relay.step(table, query, &mut out) {
        let bytes = &out[..len];
        strict::check(bytes).unwrap_or_else(|e| panic!("the cached reply is not strictly well-formed: {e}"));
        let reply = Message::from_vec(bytes).expect("the cached reply decodes");
        assert_eq!(reply.metadata.id, client_id);
        assert!(len <= limit);
        assert_eq!(bytes.get(12..12 + question.len()), Some(question));
        assert_eq!(reply.metadata.response_code, full.metadata.response_code);
        assert_eq!(reply.answers, full.answers);
        assert_eq!(reply.authorities, full.authorities);
        assert_eq!(reply.additionals, full.additionals);
        assert_eq!(reply.edns.is_some(), client_edns.is_some());
    }
}
