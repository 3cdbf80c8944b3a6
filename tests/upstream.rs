//! Integration tests of `meshdns::upstream::Forwarder` against fake upstreams.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Query, ResponseCode},
    rr::{
        Name, RData, RecordType,
        rdata::opt::{EdnsCode, EdnsOption},
    },
};
use meshdns::upstream::{
    DEFAULT_DEADLINE, DEFAULT_TRY_TIMEOUT, Forward, ForwardError, Forwarder, Transport, UpstreamConfig,
};
use support::upstream::{Behavior, FakeUpstream, closed_port_addr};

const TRY: Duration = Duration::from_millis(250);
const DEADLINE: Duration = Duration::from_millis(600);
/// Scheduling slack for "it was fast" / "it stopped in time" assertions.
const SLACK: Duration = Duration::from_millis(150);
const CLIENT_ID: u16 = 0xBEEF;
/// 0x20-style mixed case, which must survive the round trip.
const QNAME: &str = "WwW.ExAmple.TeST.";
const OPTION_CODE: u16 = 65001;

/// Upstream `i` answers www.example.test with its own address, so a test
/// can tell who answered.
fn answer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, u8::try_from(i + 1).expect("few upstreams"))
}

async fn fake(i: usize, behavior: Behavior) -> FakeUpstream {
    FakeUpstream::start(
        vec![
            ("www.example.test", IpAddr::V4(answer_ip(i))),
            ("www.example.test", IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ],
        behavior,
    )
    .await
}

/// A client query as a stub resolver with DNSSEC interest would send it:
/// RD and CD set, EDNS with DO and a private option.
fn client_query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = CLIENT_ID;
    message.metadata.recursion_desired = true;
    message.metadata.checking_disabled = true;
    message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.set_dnssec_ok(true);
    edns.options_mut()
        .insert(EdnsOption::Unknown(OPTION_CODE, vec![1, 2, 3]));
    message.set_edns(edns);
    message.to_vec().expect("encode query")
}

fn forwarder(servers: Vec<SocketAddr>, try_timeout: Duration, deadline: Duration) -> Forwarder {
    Forwarder::from_parts(UpstreamConfig {
        servers,
        try_timeout,
        deadline,
    })
}

fn first_a(reply: &Message) -> Option<Ipv4Addr> {
    reply.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

enum Up {
    Fake(Behavior),
    /// A loopback port with no listener: ICMP port unreachable / RST.
    Closed,
}

enum Want {
    /// `from`: index of the upstream whose address must be in the answer.
    Answer {
        from: Option<usize>,
        rcode: ResponseCode,
        answers: usize,
    },
    /// Error with this `reason()`.
    Fail(&'static str),
}

struct Case {
    name: &'static str,
    ups: Vec<Up>,
    transport: Transport,
    want: Want,
    /// Lower and upper bound of the call's duration.
    elapsed: (Duration, Duration),
    /// (UDP, TCP) queries each upstream must have seen; `Closed` entries are skipped.
    traffic: Vec<(usize, usize)>,
}

fn fast() -> (Duration, Duration) {
    (Duration::ZERO, SLACK)
}

fn after_one_try() -> (Duration, Duration) {
    (TRY, TRY + SLACK)
}

fn cases() -> Vec<Case> {
    use Behavior::*;
    use Transport::{Tcp, Udp};
    let answer = |from: usize| Want::Answer {
        from: Some(from),
        rcode: ResponseCode::NoError,
        answers: 1,
    };
    vec![
        Case {
            name: "normal over UDP",
            ups: vec![Up::Fake(Normal)],
            transport: Udp,
            want: answer(0),
            elapsed: fast(),
            traffic: vec![(1, 0)],
        },
        Case {
            name: "normal over TCP",
            ups: vec![Up::Fake(Normal)],
            transport: Tcp,
            want: answer(0),
            elapsed: fast(),
            traffic: vec![(0, 1)],
        },
        Case {
            name: "silent first upstream falls through",
            ups: vec![Up::Fake(Silent), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: after_one_try(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "silent first upstream falls through over TCP",
            ups: vec![Up::Fake(Silent), Up::Fake(Normal)],
            transport: Tcp,
            want: answer(1),
            elapsed: after_one_try(),
            traffic: vec![(0, 1), (0, 1)],
        },
        Case {
            name: "slow first upstream falls through",
            ups: vec![Up::Fake(Slow(Duration::from_secs(1))), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: after_one_try(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "all silent fails within the deadline",
            ups: vec![Up::Fake(Silent), Up::Fake(Silent), Up::Fake(Silent)],
            transport: Udp,
            want: Want::Fail("timeout"),
            elapsed: (DEADLINE - Duration::from_millis(20), DEADLINE + SLACK),
            traffic: vec![(1, 0), (1, 0), (1, 0)],
        },
        Case {
            name: "refused port fails fast, next answers",
            ups: vec![Up::Closed, Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: fast(),
            traffic: vec![(0, 0), (1, 0)],
        },
        Case {
            name: "refused port fails fast over TCP, next answers",
            ups: vec![Up::Closed, Up::Fake(Normal)],
            transport: Tcp,
            want: answer(1),
            elapsed: fast(),
            traffic: vec![(0, 0), (0, 1)],
        },
        Case {
            name: "only a refused port",
            ups: vec![Up::Closed],
            transport: Udp,
            want: Want::Fail("network"),
            elapsed: fast(),
            traffic: vec![(0, 0)],
        },
        Case {
            name: "wrong ID is never returned, next answers",
            ups: vec![Up::Fake(WrongId), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: after_one_try(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "wrong ID only",
            ups: vec![Up::Fake(WrongId)],
            transport: Udp,
            want: Want::Fail("bad_reply"),
            elapsed: after_one_try(),
            traffic: vec![(1, 0)],
        },
        Case {
            name: "wrong ID over TCP",
            ups: vec![Up::Fake(WrongId)],
            transport: Tcp,
            want: Want::Fail("bad_reply"),
            elapsed: after_one_try(),
            traffic: vec![(0, 1)],
        },
        Case {
            name: "wrong question is never returned, next answers",
            ups: vec![Up::Fake(WrongQuestion), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: after_one_try(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "wrong question only",
            ups: vec![Up::Fake(WrongQuestion)],
            transport: Udp,
            want: Want::Fail("bad_reply"),
            elapsed: after_one_try(),
            traffic: vec![(1, 0)],
        },
        Case {
            name: "spoof then the right answer",
            ups: vec![Up::Fake(WrongIdThenRight), Up::Fake(Normal)],
            transport: Udp,
            want: answer(0),
            elapsed: fast(),
            traffic: vec![(1, 0), (0, 0)],
        },
        Case {
            name: "spoof then the right answer over TCP",
            ups: vec![Up::Fake(WrongIdThenRight)],
            transport: Tcp,
            want: answer(0),
            elapsed: fast(),
            traffic: vec![(0, 1)],
        },
        Case {
            name: "truncated UDP is retried over TCP",
            ups: vec![Up::Fake(TruncateUdp)],
            transport: Udp,
            want: answer(0),
            elapsed: fast(),
            traffic: vec![(1, 1)],
        },
        Case {
            name: "big answer arrives over TCP after TC",
            ups: vec![Up::Fake(BigAnswer(100))],
            transport: Udp,
            want: Want::Answer {
                from: None,
                rcode: ResponseCode::NoError,
                answers: 100,
            },
            elapsed: fast(),
            traffic: vec![(1, 1)],
        },
        Case {
            name: "garbage only",
            ups: vec![Up::Fake(Garbage)],
            transport: Udp,
            want: Want::Fail("bad_reply"),
            elapsed: after_one_try(),
            traffic: vec![(1, 0)],
        },
        Case {
            name: "garbage over TCP",
            ups: vec![Up::Fake(Garbage)],
            transport: Tcp,
            want: Want::Fail("bad_reply"),
            elapsed: after_one_try(),
            traffic: vec![(0, 1)],
        },
        Case {
            name: "garbage then normal",
            ups: vec![Up::Fake(Garbage), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: after_one_try(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "SERVFAIL first, second answers",
            ups: vec![Up::Fake(ServFail), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: fast(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "REFUSED first, second answers",
            ups: vec![Up::Fake(Refused), Up::Fake(Normal)],
            transport: Udp,
            want: answer(1),
            elapsed: fast(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "SERVFAIL from the only upstream is relayed",
            ups: vec![Up::Fake(ServFail)],
            transport: Udp,
            want: Want::Answer {
                from: None,
                rcode: ResponseCode::ServFail,
                answers: 0,
            },
            elapsed: fast(),
            traffic: vec![(1, 0)],
        },
        Case {
            name: "REFUSED from the last upstream is relayed",
            ups: vec![Up::Fake(ServFail), Up::Fake(Refused)],
            transport: Tcp,
            want: Want::Answer {
                from: None,
                rcode: ResponseCode::Refused,
                answers: 0,
            },
            elapsed: fast(),
            traffic: vec![(0, 1), (0, 1)],
        },
        Case {
            name: "SERVFAIL then silence reports the last error",
            ups: vec![Up::Fake(ServFail), Up::Fake(Silent)],
            transport: Udp,
            want: Want::Fail("timeout"),
            elapsed: after_one_try(),
            traffic: vec![(1, 0), (1, 0)],
        },
        Case {
            name: "no upstreams",
            ups: vec![],
            transport: Udp,
            want: Want::Fail("no_upstreams"),
            elapsed: fast(),
            traffic: vec![],
        },
    ]
}

#[tokio::test]
async fn forwarding_table() {
    let query = client_query(QNAME, RecordType::A);
    let mut failures = Vec::new();
    for case in cases() {
        let mut fakes = Vec::new();
        let mut servers = Vec::new();
        for (i, up) in case.ups.iter().enumerate() {
            match up {
                Up::Fake(behavior) => {
                    let fake = fake(i, *behavior).await;
                    servers.push(fake.addr);
                    fakes.push(Some(fake));
                }
                Up::Closed => {
                    servers.push(closed_port_addr());
                    fakes.push(None);
                }
            }
        }
        let last_server = servers.last().copied();
        let forwarder = forwarder(servers, TRY, DEADLINE);

        let start = Instant::now();
        let result = forwarder.forward(&query, case.transport).await;
        let elapsed = start.elapsed();

        let mut problems = Vec::new();
        match (&case.want, &result) {
            (Want::Answer { from, rcode, answers }, Ok(reply)) => {
                if reply.metadata.id != CLIENT_ID {
                    problems.push(format!("ID {:#06x} not restored", reply.metadata.id));
                }
                if reply.metadata.response_code != *rcode {
                    problems.push(format!("rcode {}", reply.metadata.response_code));
                }
                if reply.answers.len() != *answers {
                    problems.push(format!("{} answers", reply.answers.len()));
                }
                if let Some(from) = from
                    && first_a(reply) != Some(answer_ip(*from))
                {
                    problems.push(format!("answer {:?} not from upstream {from}", first_a(reply)));
                }
                let qname = Name::from_ascii(QNAME).expect("name");
                if !reply.queries.first().is_some_and(|q| q.name().eq_case(&qname)) {
                    problems.push("question case not preserved".into());
                }
            }
            (Want::Fail(reason), Err(err)) => {
                if err.reason() != *reason {
                    problems.push(format!("reason {} ({err})", err.reason()));
                }
                // Errors about an upstream name it, for the logs.
                if let (Some(upstream), "timeout" | "network" | "bad_reply") = (last_server, *reason)
                    && !err.to_string().contains(&upstream.to_string())
                {
                    problems.push(format!("message {err:?} does not name {upstream}"));
                }
            }
            (_, Ok(reply)) => problems.push(format!("unexpected answer: {reply}")),
            (_, Err(err)) => problems.push(format!("unexpected error: {err}")),
        }
        let (min, max) = case.elapsed;
        if elapsed < min || elapsed > max {
            problems.push(format!("took {elapsed:?}, expected {min:?}..{max:?}"));
        }
        for (i, (fake, want)) in fakes.iter().zip(&case.traffic).enumerate() {
            if let Some(fake) = fake {
                let seen = (fake.udp_queries(), fake.tcp_queries());
                if seen != *want {
                    problems.push(format!("upstream {i} saw (udp, tcp) {seen:?}, want {want:?}"));
                }
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn relays_query_and_reply_verbatim_except_id() {
    let upstream = fake(0, Behavior::Normal).await;
    let forwarder = forwarder(vec![upstream.addr], TRY, DEADLINE);
    let query = client_query(QNAME, RecordType::A);

    let reply = forwarder.forward(&query, Transport::Udp).await.expect("answer");

    // What the upstream saw is the client's query with only the ID changed.
    let sent = upstream.last_query().expect("upstream saw the query");
    assert_eq!(sent.len(), query.len());
    assert_eq!(sent[2..], query[2..], "only the ID may differ");

    let md = &reply.metadata;
    assert_eq!(md.id, CLIENT_ID);
    assert_eq!(md.message_type, MessageType::Response);
    assert_eq!(md.response_code, ResponseCode::NoError);
    assert!(md.recursion_available, "RA relayed");
    assert!(md.recursion_desired, "RD relayed");
    assert!(md.checking_disabled, "CD relayed");
    assert!(md.authentic_data, "AD relayed");
    assert!(!md.truncation);

    let qname = Name::from_ascii(QNAME).expect("name");
    assert_eq!(reply.queries.len(), 1);
    assert!(reply.queries[0].name().eq_case(&qname), "0x20 case kept");
    assert_eq!(reply.answers.len(), 1);
    assert!(reply.answers[0].name.eq_case(&qname));
    assert_eq!(reply.answers[0].ttl, 60);
    assert_eq!(first_a(&reply), Some(answer_ip(0)));

    let edns = reply.edns.as_ref().expect("EDNS relayed");
    assert_eq!(edns.max_payload(), 1232);
    assert!(edns.flags().dnssec_ok);
    assert_eq!(
        edns.option(EdnsCode::from(OPTION_CODE)),
        Some(&EdnsOption::Unknown(OPTION_CODE, vec![1, 2, 3]))
    );
}

#[tokio::test]
async fn relays_nxdomain_and_aaaa() {
    let upstream = fake(0, Behavior::Normal).await;
    let forwarder = forwarder(vec![upstream.addr], TRY, DEADLINE);

    let reply = forwarder
        .forward(&client_query("nope.example.test.", RecordType::A), Transport::Udp)
        .await
        .expect("answer");
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.answers.is_empty());
    let soa = reply.authorities.first().expect("SOA in authority");
    assert_eq!(soa.name, Name::from_ascii("example.test.").expect("name"));
    match &soa.data {
        RData::SOA(soa) => assert_eq!(soa.minimum, 300),
        other => panic!("not an SOA: {other:?}"),
    }

    let reply = forwarder
        .forward(&client_query(QNAME, RecordType::AAAA), Transport::Tcp)
        .await
        .expect("answer");
    assert_eq!(reply.metadata.id, CLIENT_ID);
    let addrs: Vec<_> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(aaaa) => Some(aaaa.0),
            _ => None,
        })
        .collect();
    assert_eq!(addrs, vec![Ipv6Addr::LOCALHOST]);
}

#[tokio::test]
async fn every_attempt_uses_a_fresh_id() {
    let upstream = fake(0, Behavior::Normal).await;
    let forwarder = forwarder(vec![upstream.addr], TRY, DEADLINE);
    let query = client_query(QNAME, RecordType::A);
    let mut ids = Vec::new();
    for _ in 0..8 {
        forwarder.forward(&query, Transport::Udp).await.expect("answer");
        let sent = upstream.last_query().expect("query seen");
        ids.push(u16::from_be_bytes([sent[0], sent[1]]));
    }
    ids.sort_unstable();
    ids.dedup();
    // Eight equal 16-bit random draws would mean the ID is not random.
    assert!(ids.len() > 1, "upstream IDs not random: {ids:?}");
}

#[tokio::test]
async fn try_timeout_is_capped_by_the_deadline() {
    let upstream = fake(0, Behavior::Slow(Duration::from_secs(2))).await;
    let deadline = Duration::from_millis(300);
    let forwarder = forwarder(vec![upstream.addr], Duration::from_secs(3), deadline);

    let start = Instant::now();
    let err = forwarder
        .forward(&client_query(QNAME, RecordType::A), Transport::Udp)
        .await
        .expect_err("too slow");
    let elapsed = start.elapsed();

    assert_eq!(err.reason(), "timeout", "{err}");
    assert!(elapsed >= deadline - Duration::from_millis(20), "{elapsed:?}");
    assert!(elapsed < deadline + SLACK, "{elapsed:?}");
}

#[tokio::test]
async fn unparseable_queries_are_rejected_without_sending() {
    let upstream = fake(0, Behavior::Normal).await;
    let forwarder = forwarder(vec![upstream.addr], TRY, DEADLINE);

    let good = client_query(QNAME, RecordType::A);
    let mut response = good.clone();
    response[2] |= 0x80; // QR: a response, not a query
    let mut no_question = good.clone();
    no_question[4..6].copy_from_slice(&0u16.to_be_bytes());
    let cut_question = good[..16].to_vec();

    let bad: [(&str, &[u8]); 5] = [
        ("empty", &[]),
        ("short header", &good[..7]),
        ("cut question", &cut_question),
        ("response", &response),
        ("no question", &no_question),
    ];
    for (name, bytes) in bad {
        for transport in [Transport::Udp, Transport::Tcp] {
            match forwarder.forward(bytes, transport).await {
                Err(err @ ForwardError::BadQuery(_)) => assert_eq!(err.reason(), "bad_query"),
                other => panic!("{name} over {transport}: {other:?}"),
            }
        }
    }
    assert_eq!((upstream.udp_queries(), upstream.tcp_queries()), (0, 0));
}

#[test]
fn defaults_fit_under_glibc_timeout() {
    assert_eq!(DEFAULT_TRY_TIMEOUT, Duration::from_secs(2));
    assert_eq!(DEFAULT_DEADLINE, Duration::from_secs(4));
    assert!(DEFAULT_DEADLINE < Duration::from_secs(5));
    let config = UpstreamConfig::new(vec![]);
    assert_eq!(config.try_timeout, DEFAULT_TRY_TIMEOUT);
    assert_eq!(config.deadline, DEFAULT_DEADLINE);
}

#[tokio::test]
async fn fake_upstream_stops_when_dropped() {
    let upstream = fake(0, Behavior::Normal).await;
    let addr = upstream.addr;
    drop(upstream);
    // Aborted tasks release their sockets the next time the runtime runs.
    tokio::time::sleep(Duration::from_millis(20)).await;

    let forwarder = forwarder(vec![addr], TRY, DEADLINE);
    for transport in [Transport::Udp, Transport::Tcp] {
        let err = forwarder
            .forward(&client_query(QNAME, RecordType::A), transport)
            .await
            .expect_err("nothing listens any more");
        assert_eq!(err.reason(), "network", "{transport}: {err}");
    }
}
