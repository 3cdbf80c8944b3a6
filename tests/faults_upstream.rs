//! Upstream faults seen from the client (issue #8): every case runs a real meshdns on
//! 127.0.0.1:0 in front of fault-injecting fake upstreams, and checks what a client gets back,
//! how fast, and that nothing a spoofer sent ever reaches it. `tests/upstream.rs` checks the
//! forwarder alone; this checks the whole path, client-side sizes and SERVFAIL included.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use meshdns::app::App;
use meshdns::config::{Config, Overrides};
use support::dns::{BOTH, Proto, answers, exchange_raw, query_msg};
use support::proxy::{Dump, Proxy, Spec, Src, write_config};
use support::strict::DEFAULT_UDP_PAYLOAD;
use support::upstream::{Behavior, FakeUpstream, SPOOFED_V4, Spoof, closed_port_addr};

/// Per-upstream try timeout and whole-query deadline of the meshdns under test: short, so the
/// set stays fast, and far enough apart that "gave up after one try" and "hit the deadline"
/// are told apart.
const TRY: Duration = Duration::from_millis(200);
const DEADLINE: Duration = Duration::from_millis(500);
/// Scheduling slack on top of a bound: every case runs at once, on a few threads.
const MARGIN: Duration = Duration::from_millis(250);
/// Cases run at the same time.
const PARALLEL: usize = 4;
/// "At once": no timeout was waited for.
const FAST: Duration = Duration::from_millis(150);
const QNAME: &str = "www.example.test.";

/// Upstream `i` answers QNAME with its own address, so a test can tell who answered.
fn answer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, u8::try_from(i + 1).expect("few upstreams"))
}

#[derive(Clone, Copy, Debug)]
enum Up {
    Fake(Behavior),
    /// A loopback port nothing listens on: ICMP port unreachable (UDP), RST (TCP).
    Closed,
}

#[derive(Clone, Copy, Debug)]
enum Want {
    /// NOERROR, TC clear, exactly this A record.
    Answer(Ipv4Addr),
    ServFail,
    /// TC set, the whole message within `limit` bytes, OPT answered with OPT.
    Truncated {
        limit: usize,
    },
    /// NOERROR, TC clear, this many A records.
    Count(usize),
}

#[derive(Clone)]
struct Case {
    name: &'static str,
    ups: Vec<Up>,
    protos: &'static [Proto],
    /// EDNS payload size the client advertises; `None`: no OPT record.
    edns: Option<u16>,
    want: Want,
    /// The client's wait must fall in this range.
    not_before: Duration,
    within: Duration,
}

fn cases() -> Vec<Case> {
    use Behavior::*;
    const UDP: &[Proto] = &[Proto::Udp];
    let good = Up::Fake(Normal);
    let spoof = |spoof, then_right| Up::Fake(Spoofed { spoof, then_right });
    // The faulty upstream alone: SERVFAIL after its one try. With a good one behind it: the
    // good one's answer after the faulty one's try.
    let alone = |name: &'static str, up: Up, protos: &'static [Proto], within: Duration| Case {
        name,
        ups: vec![up],
        protos,
        edns: Some(1232),
        want: Want::ServFail,
        not_before: Duration::ZERO,
        within,
    };
    let then_good = |name: &'static str, up: Up, protos: &'static [Proto], within: Duration| Case {
        name,
        ups: vec![up, good],
        protos,
        edns: Some(1232),
        want: Want::Answer(answer_ip(1)),
        not_before: Duration::ZERO,
        within,
    };
    let after_try = TRY + MARGIN;
    vec![
        // Down: refused at once, no timeout waited.
        alone("down alone", Up::Closed, &BOTH, FAST),
        then_good("down, then good", Up::Closed, &BOTH, FAST),
        // Silent: one try, then the next upstream or SERVFAIL.
        Case {
            not_before: TRY - Duration::from_millis(20),
            ..alone("silent alone", Up::Fake(Silent), &BOTH, after_try)
        },
        then_good("silent, then good", Up::Fake(Silent), &BOTH, after_try),
        Case {
            name: "three silent upstreams: SERVFAIL at the deadline, not after three tries",
            ups: vec![Up::Fake(Silent); 3],
            protos: UDP,
            edns: None,
            want: Want::ServFail,
            not_before: DEADLINE - Duration::from_millis(20),
            within: DEADLINE + MARGIN,
        },
        // Slow beyond the whole deadline: its late answer is not waited for.
        alone("slow alone", Up::Fake(Slow(DEADLINE * 2)), &BOTH, after_try),
        then_good("slow, then good", Up::Fake(Slow(DEADLINE * 2)), &BOTH, after_try),
        // Spoofs: a wrong ID, a wrong question, another source address or port. Each is dropped.
        alone("wrong ID alone", spoof(Spoof::Id, false), &BOTH, after_try),
        then_good("wrong ID, then good", spoof(Spoof::Id, false), &BOTH, after_try),
        Case {
            want: Want::Answer(answer_ip(0)),
            ..alone("wrong ID, then the right reply", spoof(Spoof::Id, true), &BOTH, FAST)
        },
        alone("wrong question alone", spoof(Spoof::Question, false), &BOTH, after_try),
        then_good(
            "wrong question, then good",
            spoof(Spoof::Question, false),
            &BOTH,
            after_try,
        ),
        Case {
            want: Want::Answer(answer_ip(0)),
            ..alone(
                "wrong question, then the right reply",
                spoof(Spoof::Question, true),
                &BOTH,
                FAST,
            )
        },
        alone(
            "reply from 127.0.0.2 alone",
            spoof(Spoof::SourceAddr, false),
            UDP,
            after_try,
        ),
        then_good(
            "reply from 127.0.0.2, then good",
            spoof(Spoof::SourceAddr, false),
            UDP,
            after_try,
        ),
        Case {
            want: Want::Answer(answer_ip(0)),
            ..alone(
                "reply from 127.0.0.2, then the right reply",
                spoof(Spoof::SourceAddr, true),
                UDP,
                FAST,
            )
        },
        alone(
            "reply from another port alone",
            spoof(Spoof::SourcePort, false),
            UDP,
            after_try,
        ),
        Case {
            want: Want::Answer(answer_ip(0)),
            ..alone(
                "reply from another port, then the right reply",
                spoof(Spoof::SourcePort, true),
                UDP,
                FAST,
            )
        },
        // Truncation: TC is retried over TCP and the client gets the whole answer.
        Case {
            want: Want::Answer(answer_ip(0)),
            ..alone("TC set: retried over TCP", Up::Fake(TruncateUdp), UDP, FAST)
        },
        // A reply cut inside a record does not parse: dropped like garbage.
        alone(
            "cut mid-record alone",
            Up::Fake(CutMidRecord { tc: false }),
            &BOTH,
            after_try,
        ),
        then_good(
            "cut mid-record, then good",
            Up::Fake(CutMidRecord { tc: false }),
            &BOTH,
            after_try,
        ),
        // Garbage that starts with the right ID.
        alone("garbage alone", Up::Fake(Garbage), &BOTH, after_try),
        then_good("garbage, then good", Up::Fake(Garbage), &BOTH, after_try),
        // Larger than the client can take: fitted to its size with TC, whole over TCP.
        Case {
            name: "100 records, client without EDNS",
            ups: vec![Up::Fake(BigAnswer(100))],
            protos: UDP,
            edns: None,
            want: Want::Truncated { limit: 512 },
            not_before: Duration::ZERO,
            within: FAST,
        },
        Case {
            name: "100 records, client with EDNS 1232",
            ups: vec![Up::Fake(BigAnswer(100))],
            protos: UDP,
            edns: Some(1232),
            want: Want::Truncated { limit: 1232 },
            not_before: Duration::ZERO,
            within: FAST,
        },
        // meshdns's maxUdpPayload (1232 by default) caps what a client's offer can get.
        Case {
            name: "100 records, client with EDNS 4096",
            ups: vec![Up::Fake(BigAnswer(100))],
            protos: UDP,
            edns: Some(4096),
            want: Want::Truncated { limit: 1232 },
            not_before: Duration::ZERO,
            within: FAST,
        },
        Case {
            name: "100 records over TCP",
            ups: vec![Up::Fake(BigAnswer(100))],
            protos: &[Proto::Tcp],
            edns: None,
            want: Want::Count(100),
            not_before: Duration::ZERO,
            within: FAST,
        },
    ]
}

/// A meshdns with one local cluster, forwarding to `upstreams` with [`TRY`] and [`DEADLINE`].
async fn start_proxy(upstreams: &[SocketAddr]) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [Spec {
        name: "cluster-1",
        local: true,
        src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
    }];
    let path = write_config(dir.path(), &specs, upstreams, "");
    // write_config's timeouts suit most tests; these cases want them shorter.
    let text = std::fs::read_to_string(&path).expect("read config");
    let ours = format!(
        "upstreamTimeout: {}ms\nupstreamDeadline: {}ms\n",
        TRY.as_millis(),
        DEADLINE.as_millis()
    );
    let patched = text.replace("upstreamTimeout: 300ms\nupstreamDeadline: 900ms\n", &ours);
    assert_ne!(patched, text, "write_config's timeouts moved; update this test");
    std::fs::write(&path, patched).expect("write config");
    let config = Config::load(&path, &Overrides::default()).expect("config loads");
    let app = App::start(&config).await.expect("meshdns starts");
    let addr = app.dns_addrs()[0];
    Proxy { app, addr, dir }
}

fn records(msg: &Message) -> impl Iterator<Item = &Record> {
    msg.answers.iter().chain(&msg.authorities).chain(&msg.additionals)
}

/// Runs one case over one transport; returns what went wrong and how long the client waited.
async fn run(case: &Case, proto: Proto) -> (Vec<String>, Duration) {
    let mut fakes = Vec::new();
    let mut servers = Vec::new();
    for (i, up) in case.ups.iter().enumerate() {
        match up {
            Up::Fake(behavior) => {
                let records = vec![
                    (QNAME, IpAddr::V4(answer_ip(i))),
                    (QNAME, IpAddr::V6(Ipv6Addr::LOCALHOST)),
                ];
                let fake = FakeUpstream::start(records, *behavior).await;
                servers.push(fake.addr);
                fakes.push(fake);
            }
            Up::Closed => servers.push(closed_port_addr()),
        }
    }
    let proxy = start_proxy(&servers).await;
    let query = query_msg(QNAME, RecordType::A, case.edns, false);
    let query_bytes = query.to_vec().expect("encode query");
    let started = Instant::now();
    let raw = exchange_raw(proxy.addr, proto, &query_bytes, DEADLINE + Duration::from_secs(2)).await;
    let waited = started.elapsed();
    proxy.app.shutdown().await;

    let mut problems = Vec::new();
    let Some(raw) = raw else {
        return (vec![format!("no reply at all after {waited:?}")], waited);
    };
    if waited < case.not_before || waited > case.within {
        problems.push(format!(
            "answered after {waited:?}, want {:?}..{:?}",
            case.not_before, case.within
        ));
    }
    // Nothing spoofed, whatever else happened: not in any section, not even in the raw bytes.
    if raw.windows(4).any(|w| w == SPOOFED_V4.octets()) {
        problems.push("the spoofed address is in the reply's bytes".into());
    }
    if let Err(why) = support::strict::reply(&query_bytes, &raw, proto == Proto::Udp, DEFAULT_UDP_PAYLOAD) {
        problems.push(format!("the reply is not strictly well-formed: {why}"));
    }
    let reply = match Message::from_vec(&raw) {
        Ok(reply) => reply,
        Err(error) => {
            problems.push(format!("the reply does not parse: {error}"));
            return (problems, waited);
        }
    };
    if reply.metadata.id != query.metadata.id {
        problems.push(format!("reply ID {} is not the query's", reply.metadata.id));
    }
    if records(&reply).any(|r| matches!(&r.data, RData::A(a) if a.0 == SPOOFED_V4)) {
        problems.push("a spoofed record was relayed".into());
    }
    let rcode = reply.metadata.response_code;
    let tc = reply.metadata.truncation;
    let a_count = reply.answers.iter().filter(|r| matches!(r.data, RData::A(_))).count();
    match case.want {
        Want::Answer(ip) => {
            let want = [format!("A {ip}")];
            if rcode != ResponseCode::NoError || tc || answers(&reply) != want {
                problems.push(format!("got {rcode} tc={tc} {:?}, want {want:?}", answers(&reply)));
            }
        }
        Want::ServFail => {
            if rcode != ResponseCode::ServFail || !reply.answers.is_empty() {
                problems.push(format!(
                    "got {rcode} {:?}, want SERVFAIL and no answers",
                    answers(&reply)
                ));
            }
        }
        Want::Truncated { limit } => {
            if !tc || raw.len() > limit || rcode != ResponseCode::NoError {
                problems.push(format!(
                    "got {rcode} tc={tc} in {} bytes, want TC within {limit}",
                    raw.len()
                ));
            }
            if case.edns.is_some() != reply.edns.is_some() {
                problems.push(format!(
                    "OPT in the query: {}, in the reply: {}",
                    case.edns.is_some(),
                    reply.edns.is_some()
                ));
            }
            // What did fit is the upstream's own data, record for record.
            if reply
                .answers
                .iter()
                .any(|r| !matches!(&r.data, RData::A(a) if a.0.octets()[..2] == [10, 0]))
            {
                problems.push(format!("answers not from the upstream: {:?}", answers(&reply)));
            }
        }
        Want::Count(n) => {
            if rcode != ResponseCode::NoError || tc || a_count != n {
                problems.push(format!("got {rcode} tc={tc} with {a_count} A records, want {n}"));
            }
        }
    }
    drop(fakes);
    (problems, waited)
}

/// Every case with its own meshdns and upstreams, [`PARALLEL`] at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_faults_seen_by_the_client() {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    for case in cases() {
        for &proto in case.protos {
            let case = case.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                // Bounded: enough at once to keep the set short, few enough that a loaded
                // two-CPU machine still answers within the bounds.
                let _permit = limit.acquire().await.expect("semaphore open");
                let (problems, waited) = run(&case, proto).await;
                (format!("{} over {proto:?}", case.name), problems, waited)
            });
        }
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (name, problems, waited) = done.expect("case task");
        eprintln!("{name}: {waited:?}");
        if !problems.is_empty() {
            failures.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    eprintln!("all upstream fault cases: {:?}", started.elapsed());
    failures.sort();
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

/// A datagram cut at the byte level with TC set (some middleboxes and old servers do this)
/// should still make the forwarder retry over TCP, as RFC 1035 asks of a TC reply, instead of
/// dropping it as unparseable and letting the client wait for SERVFAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tc_reply_cut_mid_record_is_retried_over_tcp() {
    let case = Case {
        name: "TC set and cut mid-record",
        ups: vec![Up::Fake(Behavior::CutMidRecord { tc: true })],
        protos: &[Proto::Udp],
        edns: Some(1232),
        want: Want::Answer(answer_ip(0)),
        not_before: Duration::ZERO,
        within: FAST,
    };
    let (problems, waited) = run(&case, Proto::Udp).await;
    eprintln!("{}: {waited:?}", case.name);
    assert!(problems.is_empty(), "{}: {}", case.name, problems.join("; "));
}
