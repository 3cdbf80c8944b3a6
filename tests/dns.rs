//! The answer rules end to end: a real meshdns on 127.0.0.1:0 loaded from object dumps of
//! four clusters, queried over UDP and TCP, with an in-process upstream for everything else.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use support::dns::{BOTH, Proto, answers, ask, exchange, exchange_raw, has_soa, query_msg};
use support::proxy::{ClusterSpec, Dump, Proxy};
use support::upstream::{Behavior, FakeUpstream};

fn upstream_records() -> Vec<(&'static str, IpAddr)> {
    vec![
        ("www.example.test", "192.0.2.10".parse().unwrap()),
        ("lb.example.test", "198.51.100.9".parse().unwrap()),
        // Exists under the node's corporate search domain: must be reached, never stripped.
        ("helloworld.helloworld.corp.example", "203.0.113.50".parse().unwrap()),
    ]
}

fn clusters() -> Vec<ClusterSpec> {
    let local = Dump::new()
        .service("helloworld", "helloworld", &["10.96.120.15"])
        .service("sleep", "sleep", &["10.96.88.40"])
        .service("dual", "dual", &["10.96.5.5", "fd00::5"])
        .service("v6", "only6", &["fd00::6"])
        .headless("sample", "web")
        .external_name("ext", "alias", "www.example.test")
        .gateway(&["35.202.10.51"]);
    let c2 = Dump::new()
        .service("helloworld", "helloworld", &["10.112.4.20"])
        .service("sample", "httpbin", &["10.112.30.2"])
        .service("shared", "multi", &["10.112.30.3"])
        .gateway(&["34.136.67.85", "2001:db8::85"]);
    let c3 = Dump::new()
        .service("shared", "multi", &["10.113.0.3"])
        .service("hostns", "onlyhost", &["10.113.0.4"])
        .gateway(&["35.1.1.1"]);
    let c4 = Dump::new()
        .service("hostns", "onlyhost", &["10.114.0.4"])
        .service("lbname", "svc", &["10.114.0.5"])
        .gateway(&["lb.example.test"]);
    let c5 = Dump::new().service("nogw", "lonely", &["10.115.0.1"]);
    vec![
        ClusterSpec {
            name: "cluster-1",
            local: true,
            dump: local,
        },
        ClusterSpec {
            name: "cluster-2",
            local: false,
            dump: c2,
        },
        ClusterSpec {
            name: "cluster-3",
            local: false,
            dump: c3,
        },
        ClusterSpec {
            name: "cluster-4",
            local: false,
            dump: c4,
        },
        ClusterSpec {
            name: "cluster-5",
            local: false,
            dump: c5,
        },
    ]
}

struct Case {
    name: &'static str,
    qname: &'static str,
    qtype: RecordType,
    want_rcode: ResponseCode,
    want_answers: &'static [&'static str],
    /// Answered by meshdns itself (AA set, upstream not asked) rather than relayed.
    want_local: bool,
    want_soa: bool,
}

fn cases() -> Vec<Case> {
    use RecordType::*;
    use ResponseCode::*;
    let c = |name, qname, qtype, want_rcode, want_answers, want_local, want_soa| Case {
        name,
        qname,
        qtype,
        want_rcode,
        want_answers,
        want_local,
        want_soa,
    };
    vec![
        c(
            "local ClusterIP",
            "helloworld.helloworld.svc.cluster.local.",
            A,
            NoError,
            &["A 10.96.120.15"],
            true,
            false,
        ),
        c(
            "local wins over remote copies",
            "HelloWorld.HELLOWORLD.svc.Cluster.Local.",
            A,
            NoError,
            &["A 10.96.120.15"],
            true,
            false,
        ),
        c(
            "local family missing is NODATA",
            "helloworld.helloworld.svc.cluster.local.",
            AAAA,
            NoError,
            &[],
            true,
            true,
        ),
        c(
            "dual-stack A",
            "dual.dual.svc.cluster.local.",
            A,
            NoError,
            &["A 10.96.5.5"],
            true,
            false,
        ),
        c(
            "dual-stack AAAA",
            "dual.dual.svc.cluster.local.",
            AAAA,
            NoError,
            &["AAAA fd00::5"],
            true,
            false,
        ),
        c(
            "v6-only A is NODATA",
            "only6.v6.svc.cluster.local.",
            A,
            NoError,
            &[],
            true,
            true,
        ),
        c(
            "other type of a table name is NODATA",
            "sleep.sleep.svc.cluster.local.",
            MX,
            NoError,
            &[],
            true,
            true,
        ),
        c(
            "remote-only A: gateway",
            "httpbin.sample.svc.cluster.local.",
            A,
            NoError,
            &["A 34.136.67.85"],
            true,
            false,
        ),
        c(
            "remote-only AAAA: gateway",
            "httpbin.sample.svc.cluster.local.",
            AAAA,
            NoError,
            &["AAAA 2001:db8::85"],
            true,
            false,
        ),
        c(
            "in two remotes: both gateways",
            "multi.shared.svc.cluster.local.",
            A,
            NoError,
            &["A 34.136.67.85", "A 35.1.1.1"],
            true,
            false,
        ),
        c(
            "IP gateways win over a host-name gateway",
            "onlyhost.hostns.svc.cluster.local.",
            A,
            NoError,
            &["A 35.1.1.1"],
            true,
            false,
        ),
        c(
            "host-name gateway: CNAME chased upstream",
            "svc.lbname.svc.cluster.local.",
            A,
            NoError,
            &["A 198.51.100.9", "CNAME lb.example.test."],
            // The gateway's address is fetched from upstream: not authoritative.
            false,
            false,
        ),
        c(
            "remote without gateway: not in table",
            "lonely.nogw.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            true,
            true,
        ),
        c(
            "short form: namespace search domain",
            "helloworld.helloworld.sleep.svc.cluster.local.",
            A,
            NoError,
            &["A 10.96.120.15", "CNAME helloworld.helloworld.svc.cluster.local."],
            true,
            false,
        ),
        c(
            "short form: FQDN typed without the dot",
            "httpbin.sample.svc.cluster.local.sleep.svc.cluster.local.",
            A,
            NoError,
            &["A 34.136.67.85", "CNAME httpbin.sample.svc.cluster.local."],
            true,
            false,
        ),
        c(
            "short form: second search domain",
            "httpbin.sample.svc.cluster.local.svc.cluster.local.",
            A,
            NoError,
            &["A 34.136.67.85", "CNAME httpbin.sample.svc.cluster.local."],
            true,
            false,
        ),
        c(
            "short form AAAA of a v4-only name: CNAME and no address",
            "helloworld.helloworld.sleep.svc.cluster.local.",
            AAAA,
            NoError,
            &["CNAME helloworld.helloworld.svc.cluster.local."],
            true,
            true,
        ),
        c(
            "exact match wins over a shortcut",
            "sleep.sleep.svc.cluster.local.",
            A,
            NoError,
            &["A 10.96.88.40"],
            true,
            false,
        ),
        c(
            "unknown service: NXDOMAIN",
            "nothere.helloworld.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            true,
            true,
        ),
        c(
            "unknown service AAAA: NXDOMAIN",
            "nothere.helloworld.svc.cluster.local.",
            AAAA,
            NXDomain,
            &[],
            true,
            true,
        ),
        c(
            "unknown walk step: NXDOMAIN",
            "www.example.test.sleep.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            true,
            true,
        ),
        c(
            "namespace is an empty non-terminal",
            "helloworld.svc.cluster.local.",
            A,
            NoError,
            &[],
            true,
            true,
        ),
        c(
            "svc zone is an empty non-terminal",
            "svc.cluster.local.",
            AAAA,
            NoError,
            &[],
            true,
            true,
        ),
        c(
            "outside the cluster: forwarded",
            "www.example.test.",
            A,
            NoError,
            &["A 192.0.2.10"],
            false,
            false,
        ),
        c(
            "other zone NXDOMAIN: relayed",
            "nope.example.test.",
            A,
            NXDomain,
            &[],
            false,
            true,
        ),
        c(
            "search domain outside the zone is never stripped",
            "helloworld.helloworld.corp.example.",
            A,
            NoError,
            &["A 203.0.113.50"],
            false,
            false,
        ),
        c(
            "pod names are the cluster DNS's",
            "10-1-2-3.default.pod.cluster.local.",
            A,
            NXDomain,
            &[],
            false,
            true,
        ),
        c(
            "local headless without endpoints: does not exist",
            "web.sample.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            true,
            true,
        ),
        c(
            "below a local headless name without endpoints",
            "web-0.web.sample.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            true,
            true,
        ),
        c(
            "local ExternalName: CNAME chased upstream",
            "alias.ext.svc.cluster.local.",
            A,
            NoError,
            &["A 192.0.2.10", "CNAME www.example.test."],
            // The target's address is fetched from upstream: not authoritative.
            false,
            false,
        ),
    ]
}

#[tokio::test]
async fn answer_rules_over_udp_and_tcp() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    // Without the response cache, so the TCP pass reaches the upstream as the UDP pass did
    // (tests/cache.rs covers the cache).
    let proxy = Proxy::start(&clusters(), &[upstream.addr], "cache:\n  maxEntries: 0\n").await;
    for proto in BOTH {
        for case in cases() {
            let before = upstream.udp_queries() + upstream.tcp_queries();
            let reply = ask(proxy.addr, proto, case.qname, case.qtype).await;
            let label = format!("{} ({proto:?} {} {})", case.name, case.qname, case.qtype);
            assert_eq!(reply.metadata.response_code, case.want_rcode, "{label}: rcode");
            assert_eq!(answers(&reply), case.want_answers, "{label}: answers");
            assert_eq!(has_soa(&reply), case.want_soa, "{label}: SOA in authority");
            assert_eq!(reply.metadata.authoritative, case.want_local, "{label}: AA");
            assert!(reply.metadata.recursion_available, "{label}: RA");
            let asked_upstream = upstream.udp_queries() + upstream.tcp_queries() > before;
            let chased = case
                .want_answers
                .iter()
                .any(|a| a.starts_with("CNAME") && a.ends_with(".test."));
            assert_eq!(asked_upstream, !case.want_local || chased, "{label}: upstream asked");
            if case.want_local {
                // Every record hangs off the question's name or a CNAME target before it.
                let mut owners = vec![case.qname.to_ascii_lowercase()];
                for record in &reply.answers {
                    let owner = record.name.to_string().to_ascii_lowercase();
                    assert!(
                        owners.contains(&owner),
                        "{label}: unexpected owner {owner} (chain {owners:?})"
                    );
                    if let hickory_proto::rr::RData::CNAME(target) = &record.data {
                        owners.push(target.0.to_string().to_ascii_lowercase());
                    }
                    if owner.ends_with(".cluster.local.") {
                        assert_eq!(record.ttl, 30, "{label}: TTL from config");
                    }
                }
            }
            if case.want_soa && case.want_local {
                let soa = reply
                    .authorities
                    .iter()
                    .find(|r| r.record_type() == RecordType::SOA)
                    .unwrap();
                assert_eq!(soa.ttl, 5, "{label}: negative TTL");
            }
        }
    }
}

#[tokio::test]
async fn answers_keep_the_clients_case() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    let proxy = Proxy::start(&clusters(), &[upstream.addr], "").await;
    for proto in BOTH {
        for qname in [
            "HeLLoWorLD.hElLoWoRlD.sVc.ClUsTeR.lOcAl.",
            "hTTpBin.SaMple.svc.cluster.local.",
        ] {
            let reply = ask(proxy.addr, proto, qname, RecordType::A).await;
            assert_eq!(reply.queries[0].name().to_string(), qname, "question case");
            assert_eq!(reply.answers[0].name.to_string(), qname, "answer owner case");
        }
    }
}

#[tokio::test]
async fn multi_address_answers_are_shuffled() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    let proxy = Proxy::start(&clusters(), &[upstream.addr], "").await;
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let reply = ask(proxy.addr, Proto::Udp, "multi.shared.svc.cluster.local.", RecordType::A).await;
        firsts.insert(support::dns::show(&reply.answers[0]));
    }
    assert_eq!(firsts.len(), 2, "both addresses come first sometimes: {firsts:?}");
}

/// A gateway with many addresses makes an answer that needs EDNS or TCP.
#[tokio::test]
async fn large_answers_truncate_over_udp_and_fit_with_edns_and_tcp() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    let ips: Vec<String> = (1..=60).map(|i| format!("203.0.113.{i}")).collect();
    let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let clusters = vec![
        ClusterSpec {
            name: "c1",
            local: true,
            dump: Dump::new(),
        },
        ClusterSpec {
            name: "c2",
            local: false,
            dump: Dump::new().service("big", "big", &["10.0.0.1"]).gateway(&ip_refs),
        },
    ];
    let proxy = Proxy::start(&clusters, &[upstream.addr], "").await;
    let name = "big.big.svc.cluster.local.";

    let plain = exchange(proxy.addr, Proto::Udp, &query_msg(name, RecordType::A, None, false)).await;
    assert!(plain.metadata.truncation, "no EDNS: 512 bytes, TC set");
    assert!(plain.answers.len() < 60);
    assert!(plain.edns.is_none(), "no OPT without one in the query");
    assert!(plain.to_vec().unwrap().len() <= 512);

    let small = exchange(
        proxy.addr,
        Proto::Udp,
        &query_msg(name, RecordType::A, Some(700), false),
    )
    .await;
    assert!(small.metadata.truncation, "EDNS 700 is too small for 60 records");
    assert!(small.to_vec().unwrap().len() <= 700);
    assert!(small.edns.is_some(), "OPT answered with OPT");

    let tiny = exchange(
        proxy.addr,
        Proto::Udp,
        &query_msg(name, RecordType::A, Some(100), false),
    )
    .await;
    assert!(tiny.metadata.truncation, "a payload below 512 counts as 512");

    let large = exchange(
        proxy.addr,
        Proto::Udp,
        &query_msg(name, RecordType::A, Some(4096), false),
    )
    .await;
    assert!(!large.metadata.truncation);
    assert_eq!(large.answers.len(), 60);

    let tcp = exchange(proxy.addr, Proto::Tcp, &query_msg(name, RecordType::A, None, false)).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 60);
}

#[tokio::test]
async fn malformed_and_unsupported_requests() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    let proxy = Proxy::start(&clusters(), &[upstream.addr], "").await;
    for proto in BOTH {
        // Two questions: FORMERR.
        let mut two = query_msg("helloworld.helloworld.svc.cluster.local.", RecordType::A, None, false);
        two.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("sleep.sleep.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let reply = exchange(proxy.addr, proto, &two).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::FormErr,
            "{proto:?}: two questions"
        );

        // An opcode other than QUERY: NOTIMP.
        let mut status = query_msg("helloworld.helloworld.svc.cluster.local.", RecordType::A, None, false);
        status.metadata.op_code = OpCode::Status;
        let reply = exchange(proxy.addr, proto, &status).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NotImp, "{proto:?}: STATUS");

        // Garbage and a response-typed message never get a reply that crashes anything, and the
        // server keeps answering.
        for junk in [&b"\x00"[..], b"hello world, not dns", &[0xff; 12], &[0u8; 600]] {
            let _ = exchange_raw(proxy.addr, proto, junk, Duration::from_millis(200)).await;
        }
        let mut response = query_msg("x.", RecordType::A, None, false);
        response.metadata.message_type = MessageType::Response;
        let reply = exchange_raw(
            proxy.addr,
            proto,
            &response.to_vec().unwrap(),
            Duration::from_millis(200),
        )
        .await;
        assert!(
            reply.is_none(),
            "{proto:?}: a response is not answered (no reflection loops)"
        );

        let reply = ask(proxy.addr, proto, "sleep.sleep.svc.cluster.local.", RecordType::A).await;
        assert_eq!(answers(&reply), ["A 10.96.88.40"], "{proto:?}: still serving");
    }
}

#[tokio::test]
async fn forwarded_replies_are_relayed_verbatim() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    let proxy = Proxy::start(&clusters(), &[upstream.addr], "").await;
    for proto in BOTH {
        let query = query_msg("WwW.ExAmPlE.TeSt.", RecordType::A, Some(1232), true);
        let reply = exchange(proxy.addr, proto, &query).await;
        assert_eq!(
            reply.queries[0].name().to_string(),
            "WwW.ExAmPlE.TeSt.",
            "question case"
        );
        assert!(reply.metadata.authentic_data, "{proto:?}: AD relayed (DO was set)");
        assert!(!reply.metadata.authoritative);
        assert!(reply.metadata.recursion_desired);
        assert!(reply.edns.is_some(), "{proto:?}: OPT relayed");
        assert_eq!(answers(&reply), ["A 192.0.2.10"]);
        let seen = Message::from_vec(&upstream.last_query().expect("upstream saw it")).unwrap();
        assert_eq!(
            seen.queries[0].name().to_string(),
            "WwW.ExAmPlE.TeSt.",
            "query forwarded as is"
        );
        assert!(seen.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok), "DO forwarded");
        assert_ne!(seen.metadata.id, query.metadata.id, "a fresh ID upstream");
    }
}

#[tokio::test]
async fn truncated_upstream_reply_is_retried_over_tcp() {
    let upstream = FakeUpstream::start(upstream_records(), Behavior::TruncateUdp).await;
    let proxy = Proxy::start(&clusters(), &[upstream.addr], "").await;
    let reply = exchange(
        proxy.addr,
        Proto::Udp,
        &query_msg("www.example.test.", RecordType::A, Some(4096), false),
    )
    .await;
    assert!(!reply.metadata.truncation);
    assert_eq!(answers(&reply), ["A 192.0.2.10"]);
    assert!(upstream.tcp_queries() >= 1, "retried over TCP");
}

#[tokio::test]
async fn failing_upstreams_fall_through_or_servfail_in_time() {
    let good = FakeUpstream::start(upstream_records(), Behavior::Normal).await;
    for behavior in [
        Behavior::Silent,
        Behavior::WrongId,
        Behavior::WrongQuestion,
        Behavior::Garbage,
    ] {
        let bad = FakeUpstream::start(upstream_records(), behavior).await;
        // Bad first, good second: the client gets the good answer.
        let proxy = Proxy::start(&clusters(), &[bad.addr, good.addr], "").await;
        for proto in BOTH {
            let reply = ask(proxy.addr, proto, "www.example.test.", RecordType::A).await;
            assert_eq!(answers(&reply), ["A 192.0.2.10"], "{behavior:?} then good, {proto:?}");
        }
        proxy.app.shutdown().await;

        // Bad alone: SERVFAIL within the deadline (900 ms in these tests), nothing spoofed relayed.
        let proxy = Proxy::start(&clusters(), &[bad.addr], "").await;
        for proto in BOTH {
            let started = Instant::now();
            let reply = ask(proxy.addr, proto, "www.example.test.", RecordType::A).await;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::ServFail,
                "{behavior:?} alone, {proto:?}"
            );
            assert!(reply.answers.is_empty(), "{behavior:?}: nothing relayed");
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "{behavior:?}: {:?}",
                started.elapsed()
            );
        }
        proxy.app.shutdown().await;
    }
}

#[tokio::test]
async fn local_answers_do_not_need_the_upstream() {
    let down = support::upstream::closed_port_addr();
    let proxy = Proxy::start(&clusters(), &[down], "").await;
    for proto in BOTH {
        let reply = ask(proxy.addr, proto, "httpbin.sample.svc.cluster.local.", RecordType::A).await;
        assert_eq!(answers(&reply), ["A 34.136.67.85"]);
        let reply = ask(proxy.addr, proto, "www.example.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }
}
