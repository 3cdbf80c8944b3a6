//! The UDP relay (`meshdns::relay`) must answer forwarded questions exactly as the full path
//! does. For each upstream behaviour below, two servers forward to the same fake upstreams with
//! the same timeouts, one with the relay and one without; every question goes to both and the
//! replies must agree byte for byte (names expanded, records of a section in canonical order),
//! and each must pass the strict reply check.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use meshdns::cache::{Cache, CacheSettings};
use meshdns::handler::DnsHandler;
use meshdns::hub::SharedTable;
use meshdns::metrics::Metrics;
use meshdns::relay::{self, Relay};
use meshdns::server::{DnsServer, ServerSettings};
use meshdns::upstream::{Forwarder, UpstreamConfig};
use support::compare::{canonical, demo_table, mixed_case};
use support::dns::{Proto, exchange_raw, query_msg};
use support::strict::assert_reply;
use support::upstream::{Behavior, FakeUpstream, Spoof, closed_port_addr};

/// Short, so the silent and garbage upstreams end in SERVFAIL quickly.
const TRY_TIMEOUT: Duration = Duration::from_millis(300);
const DEADLINE: Duration = Duration::from_millis(700);
const CLIENT_WAIT: Duration = Duration::from_secs(3);

async fn server(table: &SharedTable, upstreams: &[SocketAddr], relay: bool) -> DnsServer {
    let metrics = Arc::new(Metrics::new());
    let forwarder = Arc::new(Forwarder::from_parts(UpstreamConfig {
        servers: upstreams.to_vec(),
        try_timeout: TRY_TIMEOUT,
        deadline: DEADLINE,
    }));
    let cache = Arc::new(Cache::new(CacheSettings {
        max_entries: 0,
        ..CacheSettings::default()
    }));
    let handler = DnsHandler::with_metrics(Arc::clone(table), Arc::clone(&forwarder), Arc::clone(&metrics))
        .with_cache(Arc::clone(&cache));
    let mut settings = ServerSettings::new(Duration::from_secs(5), Arc::clone(&metrics));
    settings.fast_path = Some(Arc::clone(table));
    if relay {
        settings.relay = Some(Arc::new(Relay::new(forwarder, cache, metrics)));
    }
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    DnsServer::bind(&[listen], handler, settings).await.unwrap()
}

struct Case {
    name: &'static str,
    /// One fake upstream per behaviour, tried in this order.
    upstreams: Vec<Behavior>,
    /// Put a closed port first, so the first try fails at once (ICMP refused).
    closed_first: bool,
    /// The rcode both paths must give for the names the upstream knows.
    want_rcode: ResponseCode,
}

fn cases() -> Vec<Case> {
    let case = |name, upstreams, want_rcode| Case {
        name,
        upstreams,
        closed_first: false,
        want_rcode,
    };
    vec![
        case("normal", vec![Behavior::Normal], ResponseCode::NoError),
        case(
            "big answer (truncated for small buffers)",
            vec![Behavior::BigAnswer(60)],
            ResponseCode::NoError,
        ),
        case(
            "TC over UDP, retried over TCP",
            vec![Behavior::TruncateUdp],
            ResponseCode::NoError,
        ),
        case(
            "SERVFAIL, then a good upstream",
            vec![Behavior::ServFail, Behavior::Normal],
            ResponseCode::NoError,
        ),
        case("only SERVFAIL", vec![Behavior::ServFail], ResponseCode::ServFail),
        case("only REFUSED", vec![Behavior::Refused], ResponseCode::Refused),
        case("silent", vec![Behavior::Silent], ResponseCode::ServFail),
        case("garbage", vec![Behavior::Garbage], ResponseCode::ServFail),
        case(
            "wrong ID, then right",
            vec![Behavior::WrongIdThenRight],
            ResponseCode::NoError,
        ),
        case(
            "spoofed source port, then right",
            vec![Behavior::Spoofed {
                spoof: Spoof::SourcePort,
                then_right: true,
            }],
            ResponseCode::NoError,
        ),
        case(
            "cut mid-record with TC",
            vec![Behavior::CutMidRecord { tc: true }],
            ResponseCode::NoError,
        ),
        Case {
            name: "first upstream down",
            upstreams: vec![Behavior::Normal],
            closed_first: true,
            want_rcode: ResponseCode::NoError,
        },
    ]
}

const RECORDS: [(&str, &str); 4] = [
    ("www.example.test.", "192.0.2.10"),
    ("www.example.test.", "192.0.2.11"),
    ("www.example.test.", "2001:db8::10"),
    ("10-1-2-3.default.pod.cluster.local.", "10.1.2.3"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_full_path_give_the_same_answers() {
    let table = demo_table();
    let records: Vec<(&str, IpAddr)> = RECORDS.iter().map(|(n, ip)| (*n, ip.parse().unwrap())).collect();
    let mut relayed_plans = 0;
    for case in cases() {
        let mut fakes = Vec::new();
        for behavior in &case.upstreams {
            fakes.push(FakeUpstream::start(records.clone(), *behavior).await);
        }
        let mut addrs: Vec<SocketAddr> = fakes.iter().map(|f| f.addr).collect();
        if case.closed_first {
            addrs.insert(0, closed_port_addr());
        }
        let with_relay = server(&table, &addrs, true).await;
        let without = server(&table, &addrs, false).await;
        let (relay_addr, full_addr) = (with_relay.local_addrs()[0], without.local_addrs()[0]);

        // Known names (outside the cluster domain, and a pod name the cluster's DNS owns), a
        // name the upstream denies, and a type it has nothing of.
        let questions = [
            ("www.example.test.", RecordType::A),
            ("www.example.test.", RecordType::AAAA),
            ("www.example.test.", RecordType::MX),
            ("nothere.example.test.", RecordType::A),
            ("10-1-2-3.default.pod.cluster.local.", RecordType::A),
        ];
        let quick = matches!(case.upstreams[..], [Behavior::Silent] | [Behavior::Garbage]);
        for (name, qtype) in questions {
            for spelled in [name.to_string(), mixed_case(name)] {
                for (edns, dnssec_ok) in [
                    (None, false),
                    (Some(512), false),
                    (Some(1232), true),
                    (Some(4096), false),
                ] {
                    // The slow failures take the deadline per question; one spelling and size
                    // of each is enough there.
                    if quick && (spelled != name || edns.is_some()) {
                        continue;
                    }
                    let mut msg = query_msg(&spelled, qtype, edns, dnssec_ok);
                    msg.metadata.checking_disabled = dnssec_ok;
                    let bytes = msg.to_vec().unwrap();
                    if relay::plan(&table.load(), &bytes, false, meshdns::wire::UdpPayload::default()).is_some() {
                        relayed_plans += 1;
                    }
                    let (a, b) = tokio::join!(
                        exchange_raw(relay_addr, Proto::Udp, &bytes, CLIENT_WAIT),
                        exchange_raw(full_addr, Proto::Udp, &bytes, CLIENT_WAIT),
                    );
                    let (Some(a), Some(b)) = (a, b) else {
                        panic!(
                            "{}: {spelled} {qtype} {edns:?}: no reply from one of the paths",
                            case.name
                        );
                    };
                    assert_reply(&bytes, &a, true);
                    assert_reply(&bytes, &b, true);
                    assert_eq!(
                        canonical(&a),
                        canonical(&b),
                        "{}: {spelled} {qtype} EDNS {edns:?}: the relay differs",
                        case.name
                    );
                    if name.starts_with("www") && qtype == RecordType::A {
                        let reply = Message::from_vec(&a).unwrap();
                        assert_eq!(
                            reply.metadata.response_code, case.want_rcode,
                            "{}: {spelled} {edns:?}",
                            case.name
                        );
                    }
                }
            }
        }
        with_relay.shutdown(Duration::from_millis(100)).await;
        without.shutdown(Duration::from_millis(100)).await;
    }
    assert!(relayed_plans > 200, "the relay took {relayed_plans} of the questions");
}

/// Names the table owns or may own never take the relay: table names, search-domain names,
/// names under `svc` and reverse names (PTR for local ClusterIPs).
#[test]
fn the_relay_takes_only_names_the_full_path_would_forward() {
    let table = demo_table();
    let table = table.load();
    let plan = |name: &str, qtype| {
        let bytes = query_msg(name, qtype, Some(1232), false).to_vec().unwrap();
        relay::plan(&table, &bytes, true, meshdns::wire::UdpPayload::default()).is_some()
    };
    for name in [
        "helloworld.helloworld.svc.cluster.local.",
        "helloworld.helloworld.svc.cluster.local.sleep.svc.cluster.local.",
        "nothere.helloworld.svc.cluster.local.",
        "1.0.96.10.in-addr.arpa.",
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
    ] {
        for qtype in [RecordType::A, RecordType::PTR, RecordType::SRV] {
            assert!(!plan(name, qtype), "{name} {qtype} must take the full path");
        }
    }
    for name in ["www.example.test.", "x.pod.cluster.local.", "cluster.local."] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
            assert!(plan(name, qtype), "{name} {qtype} is forwarded as it is");
        }
    }
}

/// The relay answers without the handler. A reply it cannot pass on as it is (too large for the
/// client) is re-encoded the full path's way from the reply already received, never fetched
/// again: the handler here forwards to a closed port, so a second fetch would be SERVFAIL.
#[tokio::test]
async fn the_relay_answers_alone_and_declines_what_needs_re_encoding() {
    let table = demo_table();
    let records: Vec<(&str, IpAddr)> = RECORDS.iter().map(|(n, ip)| (*n, ip.parse().unwrap())).collect();
    let normal = FakeUpstream::start(records.clone(), Behavior::Normal).await;
    let big = FakeUpstream::start(records, Behavior::BigAnswer(60)).await;
    for (upstream, edns, want) in [
        (&normal, None, ResponseCode::NoError),
        (&normal, Some(1232), ResponseCode::NoError),
        (&big, Some(4096), ResponseCode::NoError),
        // 60 addresses do not fit 512 bytes: truncated from the reply in hand.
        (&big, None, ResponseCode::NoError),
    ] {
        let asked_before = upstream.udp_queries() + upstream.tcp_queries();
        let metrics = Arc::new(Metrics::new());
        let config = |servers| UpstreamConfig {
            servers,
            try_timeout: TRY_TIMEOUT,
            deadline: DEADLINE,
        };
        let dead = Arc::new(Forwarder::from_parts(config(vec![closed_port_addr()])));
        let live = Arc::new(Forwarder::from_parts(config(vec![upstream.addr])));
        let cache = Arc::new(Cache::disabled());
        let handler = DnsHandler::with_metrics(Arc::clone(&table), dead, Arc::clone(&metrics));
        let mut settings = ServerSettings::new(Duration::from_secs(5), Arc::clone(&metrics));
        settings.fast_path = Some(Arc::clone(&table));
        settings.relay = Some(Arc::new(Relay::new(live, cache, metrics)));
        let server = DnsServer::bind(&["127.0.0.1:0".parse().unwrap()], handler, settings)
            .await
            .unwrap();
        let bytes = query_msg("www.example.test.", RecordType::A, edns, false)
            .to_vec()
            .unwrap();
        let reply = exchange_raw(server.local_addrs()[0], Proto::Udp, &bytes, CLIENT_WAIT)
            .await
            .expect("a reply");
        assert_reply(&bytes, &reply, true);
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(
            reply.metadata.response_code, want,
            "EDNS {edns:?}, upstream at {}",
            upstream.addr
        );
        let asked = upstream.udp_queries() + upstream.tcp_queries() - asked_before;
        if edns.is_none() && std::ptr::eq(upstream, &big) {
            assert!(reply.metadata.truncation, "truncated for a 512-byte client");
            assert_eq!(asked, 2, "one exchange (UDP, TC, then TCP), not a second fetch");
        } else {
            assert_eq!(asked, 1, "EDNS {edns:?}: asked once");
        }
        server.shutdown(Duration::from_millis(100)).await;
    }
}

/// With the cache on, a repeated question is answered from it on both paths (on the relay's
/// side straight from the cached bytes), in the asker's spelling, with its ID and EDNS size; the upstream sees each question once per server. A hit
/// too large for the client's buffer is truncated by the full path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_are_the_same_on_both_paths() {
    let table = demo_table();
    let records: Vec<(&str, IpAddr)> = RECORDS.iter().map(|(n, ip)| (*n, ip.parse().unwrap())).collect();
    for behavior in [Behavior::Normal, Behavior::BigAnswer(60)] {
        let upstream = FakeUpstream::start(records.clone(), behavior).await;
        let with_relay = cached_server(&table, upstream.addr, true).await;
        let without = cached_server(&table, upstream.addr, false).await;
        let (relay_addr, full_addr) = (with_relay.local_addrs()[0], without.local_addrs()[0]);
        let mut questions = 0;
        for (name, qtype) in [
            ("www.example.test.", RecordType::A),
            ("www.example.test.", RecordType::AAAA),
            ("nothere.example.test.", RecordType::A),
        ] {
            for (edns, dnssec_ok) in [(None, false), (Some(1232), true), (Some(4096), false)] {
                questions += 1;
                // The miss, then hits in other spellings and sizes.
                for spelled in [name.to_string(), mixed_case(name), name.to_uppercase()] {
                    let mut msg = query_msg(&spelled, qtype, edns, dnssec_ok);
                    msg.metadata.checking_disabled = dnssec_ok;
                    let bytes = msg.to_vec().unwrap();
                    let (a, b) = tokio::join!(
                        exchange_raw(relay_addr, Proto::Udp, &bytes, CLIENT_WAIT),
                        exchange_raw(full_addr, Proto::Udp, &bytes, CLIENT_WAIT),
                    );
                    let (Some(a), Some(b)) = (a, b) else {
                        panic!("{behavior:?}: {spelled} {qtype} {edns:?}: no reply from one of the paths");
                    };
                    assert_reply(&bytes, &a, true);
                    assert_reply(&bytes, &b, true);
                    // Both entries were stored within milliseconds, but a second may tick
                    // between them: TTLs are compared to the second, the rest exactly.
                    let (ta, tb) = (ttls(&a), ttls(&b));
                    assert!(
                        ta.iter().zip(&tb).all(|(x, y)| x.abs_diff(*y) <= 1) && ta.len() == tb.len(),
                        "{behavior:?}: {spelled} {qtype}: TTLs {ta:?} vs {tb:?}"
                    );
                    // The question comes back exactly as spelled. Names inside the records
                    // that the stored reply compresses into the question take the asker's case
                    // on the relay, the first asker's on the full path: equal as DNS names.
                    let (ma, mb) = (Message::from_vec(&a).unwrap(), Message::from_vec(&b).unwrap());
                    assert!(
                        ma.queries[0].name().eq_case(mb.queries[0].name()),
                        "{spelled}: question case"
                    );
                    assert_eq!(
                        canonical(&without_ttls(&a)).to_lowercase(),
                        canonical(&without_ttls(&b)).to_lowercase(),
                        "{behavior:?}: {spelled} {qtype} EDNS {edns:?}: the relay's cache hit differs"
                    );
                }
            }
        }
        // Each (question, flags) once per server. (The big upstream's other answers carry no
        // SOA, so they are not cached, and its large one is fetched over UDP and then TCP.)
        let asked = upstream.udp_queries() + upstream.tcp_queries();
        assert!(
            behavior != Behavior::Normal || asked <= 2 * questions,
            "{behavior:?}: the upstream was asked {asked} times for {questions} questions"
        );
        with_relay.shutdown(Duration::from_millis(100)).await;
        without.shutdown(Duration::from_millis(100)).await;
    }
}

async fn cached_server(table: &SharedTable, upstream: SocketAddr, relay: bool) -> DnsServer {
    let metrics = Arc::new(Metrics::new());
    let forwarder = Arc::new(Forwarder::from_parts(UpstreamConfig {
        servers: vec![upstream],
        try_timeout: TRY_TIMEOUT,
        deadline: DEADLINE,
    }));
    let cache = Arc::new(Cache::new(CacheSettings::default()));
    let handler = DnsHandler::with_metrics(Arc::clone(table), Arc::clone(&forwarder), Arc::clone(&metrics))
        .with_cache(Arc::clone(&cache));
    let mut settings = ServerSettings::new(Duration::from_secs(5), Arc::clone(&metrics));
    settings.fast_path = Some(Arc::clone(table));
    if relay {
        settings.relay = Some(Arc::new(Relay::new(forwarder, cache, metrics)));
    }
    DnsServer::bind(&["127.0.0.1:0".parse().unwrap()], handler, settings)
        .await
        .unwrap()
}

fn ttls(reply: &[u8]) -> Vec<u32> {
    let msg = Message::from_vec(reply).unwrap();
    let mut ttls: Vec<u32> = msg.answers.iter().chain(&msg.authorities).map(|r| r.ttl).collect();
    ttls.sort_unstable();
    ttls
}

fn without_ttls(reply: &[u8]) -> Vec<u8> {
    let mut msg = Message::from_vec(reply).unwrap();
    for record in msg.answers.iter_mut().chain(msg.authorities.iter_mut()) {
        record.ttl = 0;
    }
    msg.to_vec().unwrap()
}
