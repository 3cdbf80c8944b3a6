//! The process's life as Kubernetes drives it: SIGTERM in the middle of a burst of queries
//! leaves none that arrived before it unanswered and exits 0; the drain is bounded; SIGHUP
//! re-reads the config; logs come one line per start-up step, as text or JSON.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use serde_json::Value;
use support::dns::{Proto, answers, ask, exchange_raw, query_msg};
use support::process::Meshdns;
use support::proxy::Dump;
use support::upstream::{Behavior, FakeUpstream};

const START_WAIT: Duration = Duration::from_secs(20);
/// How long a test waits for something meshdns does at once (a reload, an exit).
const SOON: Duration = Duration::from_secs(5);
/// How long a query of the burst waits for its answer: far more than a slow upstream takes.
const QUERY_WAIT: Duration = Duration::from_secs(3);

/// Writes a config with these clusters (name, local, dump) into `dir`.
fn write_config(dir: &Path, upstream: SocketAddr, extra: &str, clusters: &[(&str, bool, &Dump)]) -> String {
    let mut yaml = format!(
        "listen: [\"127.0.0.1:0\"]\nadmin: \"\"\nresolvConf: resolv.conf\nupstreams: [\"{upstream}\"]\n{extra}clusters:\n"
    );
    for (name, local, dump) in clusters {
        std::fs::write(dir.join(format!("{name}.yaml")), dump.yaml()).expect("write dump");
        yaml.push_str(&format!(
            "  - name: {name}\n    local: {local}\n    objects: {name}.yaml\n"
        ));
    }
    std::fs::write(
        dir.join("resolv.conf"),
        "nameserver 127.0.0.1\nsearch sleep.svc.cluster.local svc.cluster.local cluster.local\n",
    )
    .expect("write resolv.conf");
    let path = dir.join("meshdns.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path.to_string_lossy().into_owned()
}

fn local_dump() -> Dump {
    Dump::new().service("sleep", "sleep", &["10.96.88.40"])
}

/// One query of the burst: when it was handed to the socket, and whether it got its answer.
struct Sent {
    at: Instant,
    forwarded: bool,
    answered: bool,
}

async fn one_query(dns: SocketAddr, proto: Proto, name: &str) -> Sent {
    let msg = query_msg(name, RecordType::A, Some(1232), false);
    let bytes = msg.to_vec().expect("encode");
    // The timestamp is taken when the query leaves: over UDP `exchange_raw` sends at once,
    // over TCP right after the connect.
    let at = Instant::now();
    let reply = exchange_raw(dns, proto, &bytes, QUERY_WAIT).await;
    let answered = reply
        .and_then(|r| Message::from_vec(&r).ok())
        .is_some_and(|m| m.metadata.id == msg.metadata.id && m.metadata.response_code == ResponseCode::NoError);
    Sent {
        at,
        forwarded: name.starts_with("www"),
        answered,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_every_query_received_before_it() {
    // A slow upstream keeps forwarded queries in flight when the signal comes.
    let upstream = FakeUpstream::start(
        vec![("www.example.test", "192.0.2.10".parse().unwrap())],
        Behavior::Slow(Duration::from_millis(300)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        upstream.addr,
        "upstreamTimeout: 2s\nupstreamDeadline: 3s\ndrainTimeout: 5s\n",
        &[("cluster-1", true, &local_dump())],
    );
    let meshdns = Meshdns::spawn(&["serve", "--config", &config], "info");
    let dns = meshdns.dns_addr();
    let mut meshdns = Some(meshdns);

    let burst = Instant::now();
    let mut queries = tokio::task::JoinSet::new();
    let mut signalled = None;
    let mut exit = None;
    for i in 0..300u32 {
        let name = if i % 3 == 0 {
            "www.example.test."
        } else {
            "sleep.sleep.svc.cluster.local."
        };
        let proto = if i % 5 == 0 { Proto::Tcp } else { Proto::Udp };
        queries.spawn(one_query(dns, proto, name));
        if i == 150 {
            // Everything spawned so far has had time to leave.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let at = Instant::now();
            signalled = Some(at);
            meshdns.as_ref().expect("running").signal("TERM");
            let mut meshdns = meshdns.take().expect("signalled once");
            exit = Some(tokio::task::spawn_blocking(move || {
                let status = meshdns.wait_exit(Duration::from_secs(10));
                (status, at.elapsed(), meshdns.log())
            }));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let signalled = signalled.unwrap();
    let mut results = Vec::new();
    while let Some(sent) = queries.join_next().await {
        results.push(sent.unwrap());
    }
    let (status, exited, log) = exit.expect("signalled").await.unwrap();
    assert_eq!(status.code(), Some(0), "{log:#?}");

    let before: Vec<&Sent> = results.iter().filter(|s| s.at < signalled).collect();
    let unanswered = before.iter().filter(|s| !s.answered).count();
    let forwarded_in_flight = before
        .iter()
        .filter(|s| s.forwarded && signalled.duration_since(s.at) < Duration::from_millis(300))
        .count();
    eprintln!(
        "{} queries before the signal ({} forwarded and still in flight at it), {} after; exit {:?} after the signal, burst {:?}",
        before.len(),
        forwarded_in_flight,
        results.len() - before.len(),
        exited,
        burst.elapsed(),
    );
    assert!(before.len() >= 100, "the signal came too early to prove anything");
    assert!(
        forwarded_in_flight > 0,
        "no forwarded query was in flight at the signal"
    );
    assert_eq!(unanswered, 0, "queries received before SIGTERM went unanswered");
    assert!(exited < Duration::from_secs(5), "exit {exited:?} after SIGTERM");
    assert!(
        log.iter().any(|l| l.contains("shutting down") && l.contains("SIGTERM")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("meshdns stopped")), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_is_bounded_and_sigint_exits_0() {
    let upstream = FakeUpstream::start(vec![], Behavior::Silent).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        upstream.addr,
        "upstreamTimeout: 20s\nupstreamDeadline: 30s\ndrainTimeout: 1s\n",
        &[("cluster-1", true, &local_dump())],
    );
    let mut meshdns = Meshdns::spawn(&["serve", "--config", &config], "info");
    let dns = meshdns.dns_addr();
    let stuck = tokio::spawn(async move {
        let msg = query_msg("www.example.test.", RecordType::A, None, false);
        exchange_raw(dns, Proto::Udp, &msg.to_vec().unwrap(), QUERY_WAIT).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    meshdns.signal("INT");
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = meshdns.wait_exit(SOON);
        (status, meshdns.log())
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{log:#?}");
    assert!(
        took >= Duration::from_millis(900),
        "left before the drain time: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "drain not bounded: {took:?}");
    assert!(log.iter().any(|l| l.contains("abandoning")), "{log:#?}");
    assert_eq!(stuck.await.unwrap(), None, "the stuck query was abandoned");
}

async fn wait_answer(dns: SocketAddr, name: &str, want: &[&str]) -> Message {
    let started = Instant::now();
    loop {
        let reply = ask(dns, Proto::Udp, name, RecordType::A).await;
        if answers(&reply) == want {
            return reply;
        }
        assert!(started.elapsed() < SOON, "{name} never became {want:?}: {reply:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_config() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let dir = tempfile::tempdir().unwrap();
    let c2 = Dump::new()
        .service("sample", "httpbin", &["10.112.30.2"])
        .gateway(&["34.136.67.85"]);
    let c3 = Dump::new()
        .service("sample", "extra", &["10.113.0.9"])
        .gateway(&["35.1.1.1"]);
    let local = local_dump();
    let v1 = [("cluster-1", true, &local), ("cluster-2", false, &c2)];
    let config = write_config(dir.path(), upstream.addr, "", &v1);
    let mut meshdns = Meshdns::spawn(&["serve", "--config", &config], "info");
    let dns = meshdns.dns_addr();
    // One line per start-up step.
    for step in [
        "reading config",
        "upstreams and search domains",
        "cluster configured",
        "waiting for every cluster",
        "cluster loaded",
        "listening for DNS",
        "meshdns ready",
    ] {
        meshdns.wait_log(&[step], SOON);
    }

    let httpbin = "httpbin.sample.svc.cluster.local.";
    let extra = "extra.sample.svc.cluster.local.";
    let reply = wait_answer(dns, httpbin, &["A 34.136.67.85"]).await;
    assert_eq!(reply.answers[0].ttl, 30);
    let reply = ask(dns, Proto::Udp, extra, RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);

    // A cluster added, the TTL changed, and a listen address that only a restart applies.
    let v2 = [
        ("cluster-1", true, &local),
        ("cluster-2", false, &c2),
        ("cluster-3", false, &c3),
    ];
    write_config(dir.path(), upstream.addr, "ttl: 60\n", &v2);
    let yaml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", "127.0.0.2:0");
    std::fs::write(&config, yaml).unwrap();
    meshdns.signal("HUP");
    wait_answer(dns, extra, &["A 35.1.1.1"]).await;
    let reply = wait_answer(dns, httpbin, &["A 34.136.67.85"]).await;
    assert_eq!(reply.answers[0].ttl, 60);
    meshdns.wait_log(&["after a restart", "listen"], SOON);
    meshdns.wait_log(&["cluster added", "cluster-3"], SOON);

    // A broken file changes nothing.
    std::fs::write(
        &config,
        "clusters: [{name: cluster-1, local: true, objects: cluster-1.yaml}]\nbogus: 1\n",
    )
    .unwrap();
    meshdns.signal("HUP");
    meshdns.wait_log(&["config not applied", "bogus"], SOON);
    wait_answer(dns, extra, &["A 35.1.1.1"]).await;
    wait_answer(dns, httpbin, &["A 34.136.67.85"]).await;

    // A cluster removed: its names go.
    let v3 = [("cluster-1", true, &local), ("cluster-3", false, &c3)];
    write_config(dir.path(), upstream.addr, "", &v3);
    meshdns.signal("HUP");
    let started = Instant::now();
    loop {
        let reply = ask(dns, Proto::Udp, httpbin, RecordType::A).await;
        if reply.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(started.elapsed() < SOON, "cluster-2 was never removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = wait_answer(dns, extra, &["A 35.1.1.1"]).await;
    assert_eq!(reply.answers[0].ttl, 30);

    meshdns.signal("TERM");
    let status = tokio::task::spawn_blocking(move || meshdns.wait_exit(SOON))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_a_line_per_query_at_debug() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let up = upstream.addr.to_string();
    let meshdns = Meshdns::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--admin",
            "",
            "--log-format",
            "json",
        ],
        "meshdns=debug",
    );
    let listening = meshdns.wait_log(&["listening for DNS"], START_WAIT);
    let line: Value = serde_json::from_str(&listening).expect("a JSON log line");
    let dns: SocketAddr = line["addr"].as_str().expect("addr field").parse().unwrap();
    assert_eq!(line["level"], "INFO");

    let reply = ask(
        dns,
        Proto::Udp,
        "helloworld.helloworld.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(answers(&reply), ["A 10.96.120.15"]);
    let query = meshdns.wait_log(&["\"query\"", "helloworld.helloworld"], SOON);
    let query: Value = serde_json::from_str(&query).unwrap();
    assert_eq!(query["level"], "DEBUG");
    assert_eq!(query["outcome"], "local");
    assert_eq!(query["qtype"], "A");
    assert!(query["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{query}");
    assert!(query["elapsed_us"].is_u64(), "{query}");
    for line in meshdns.log() {
        let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            !parsed["target"].as_str().unwrap_or_default().starts_with("hickory"),
            "hickory's own lines stay quiet: {line}"
        );
    }
}
