//! The operator's view: `/metrics` counts exactly what was asked, `/ready` follows a cluster
//! that loads late, the debug pages show clusters and table, `meshdns explain` agrees with what
//! the server answers, and `meshdns check` lists every problem of a config.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use serde_json::Value;
use support::apiserver::{FakeApiServer, service};
use support::dns::{Proto, answers, ask, exchange, exchange_raw, query_msg};
use support::process::{BIN, Meshdns};
use support::proxy::{ClusterSpec, Dump, Proxy, Spec, Src, write_config};
use support::upstream::{Behavior, FakeUpstream, closed_port_addr};

/// Bound for a live cluster to load after its API server comes back (kube's watcher backoff).
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain HTTP/1.1 GET; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).expect("connect to the admin server");
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: meshdns\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// Every sample of a Prometheus text exposition, by `name{labels}` as written.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    samples(&body)
}

/// `after - before` for every series that changed.
fn deltas(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, prefix: &str) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

fn expected(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn seed_clusters() -> Vec<ClusterSpec> {
    vec![
        ClusterSpec {
            name: "cluster-1",
            local: true,
            dump: Dump::new()
                .service("helloworld", "helloworld", &["10.96.120.15"])
                .service("sleep", "sleep", &["10.96.88.40"]),
        },
        ClusterSpec {
            name: "cluster-2",
            local: false,
            dump: Dump::new()
                .service("helloworld", "helloworld", &["10.112.4.20"])
                .service("sample", "httpbin", &["10.112.30.2"])
                .service("shared", "multi", &["10.112.30.3"])
                .gateway(&["34.136.67.85"]),
        },
        ClusterSpec {
            name: "cluster-3",
            local: false,
            dump: Dump::new()
                .service("shared", "multi", &["10.113.0.3"])
                .gateway(&["35.1.1.1"]),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_queries_sent() {
    let upstream = FakeUpstream::start(
        vec![("www.example.test", "192.0.2.10".parse().unwrap())],
        Behavior::Normal,
    )
    .await;
    let closed = closed_port_addr();
    // The closed port comes first: every forwarded query fails there once, then succeeds.
    let proxy = Proxy::start(&seed_clusters(), &[closed, upstream.addr], "").await;
    let admin = proxy.app.admin_addr().expect("the admin server runs");
    let dns = proxy.addr;

    let before = tokio::task::spawn_blocking(move || scrape(admin)).await.unwrap();
    let cases: &[(Proto, &str, RecordType, ResponseCode)] = &[
        (
            Proto::Udp,
            "helloworld.helloworld.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            Proto::Udp,
            "httpbin.sample.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            Proto::Tcp,
            "helloworld.helloworld.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            Proto::Udp,
            "helloworld.helloworld.svc.cluster.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
        (
            Proto::Tcp,
            "helloworld.helloworld.sleep.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        (
            Proto::Udp,
            "nothere.helloworld.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            Proto::Udp,
            "nothere.helloworld.svc.cluster.local.",
            RecordType::AAAA,
            ResponseCode::NXDomain,
        ),
        (Proto::Udp, "www.example.test.", RecordType::A, ResponseCode::NoError),
        // The same question again: answered from the response cache.
        (Proto::Udp, "www.example.test.", RecordType::A, ResponseCode::NoError),
        (Proto::Udp, "www.example.test.", RecordType::CAA, ResponseCode::NoError),
    ];
    for (proto, name, qtype, rcode) in cases {
        let reply = ask(dns, *proto, name, *qtype).await;
        assert_eq!(reply.metadata.response_code, *rcode, "{name} {qtype}");
    }
    // Not DNS, a response, and two questions: dropped, dropped, FORMERR.
    let wait = Duration::from_millis(300);
    assert_eq!(exchange_raw(dns, Proto::Udp, b"hello", wait).await, None);
    let mut response = query_msg("x.example.test.", RecordType::A, None, false);
    response.metadata.message_type = hickory_proto::op::MessageType::Response;
    let bytes = response.to_vec().unwrap();
    assert_eq!(exchange_raw(dns, Proto::Udp, &bytes, wait).await, None);
    let mut two = query_msg("a.example.test.", RecordType::A, None, false);
    two.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii("b.example.test.").unwrap(),
        RecordType::A,
    ));
    let reply = exchange(dns, Proto::Udp, &two).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    let after = tokio::task::spawn_blocking(move || scrape(admin)).await.unwrap();
    assert_eq!(
        deltas(&before, &after, "meshdns_requests_total"),
        expected(&[
            (
                r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="local"}"#,
                2.0
            ),
            (
                r#"meshdns_requests_total{protocol="tcp",qtype="A",outcome="local"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="udp",qtype="AAAA",outcome="local_nodata"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="tcp",qtype="A",outcome="search_shortcut"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="local_nxdomain"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="udp",qtype="AAAA",outcome="local_nxdomain"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="forwarded"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="cache_hit"}"#,
                1.0
            ),
            (
                r#"meshdns_requests_total{protocol="udp",qtype="other",outcome="forwarded"}"#,
                1.0
            ),
        ]),
    );
    let up = upstream.addr;
    assert_eq!(
        deltas(&before, &after, "meshdns_upstream_requests_total"),
        expected(&[
            (
                &format!(r#"meshdns_upstream_requests_total{{upstream="{closed}",transport="udp"}}"#),
                2.0
            ),
            (
                &format!(r#"meshdns_upstream_requests_total{{upstream="{up}",transport="udp"}}"#),
                2.0
            ),
        ]),
    );
    assert_eq!(
        deltas(&before, &after, "meshdns_upstream_failures_total"),
        expected(&[(
            &format!(r#"meshdns_upstream_failures_total{{upstream="{closed}",reason="network"}}"#),
            2.0
        )]),
    );
    assert_eq!(
        deltas(&before, &after, "meshdns_upstream_request_duration_seconds_count"),
        expected(&[(
            &format!(r#"meshdns_upstream_request_duration_seconds_count{{upstream="{up}"}}"#),
            2.0
        )]),
    );
    assert_eq!(
        deltas(&before, &after, "meshdns_dropped_packets_total"),
        expected(&[
            (r#"meshdns_dropped_packets_total{protocol="udp",reason="short"}"#, 1.0),
            (
                r#"meshdns_dropped_packets_total{protocol="udp",reason="response"}"#,
                1.0
            ),
        ]),
    );
    assert_eq!(
        deltas(&before, &after, "meshdns_malformed_requests_total"),
        expected(&[(
            r#"meshdns_malformed_requests_total{protocol="udp",reason="question_count"}"#,
            1.0
        )]),
    );
    assert_eq!(
        deltas(&before, &after, "meshdns_request_duration_seconds_count"),
        expected(&[
            (r#"meshdns_request_duration_seconds_count{outcome="local"}"#, 3.0),
            (r#"meshdns_request_duration_seconds_count{outcome="local_nodata"}"#, 1.0),
            (
                r#"meshdns_request_duration_seconds_count{outcome="search_shortcut"}"#,
                1.0
            ),
            (
                r#"meshdns_request_duration_seconds_count{outcome="local_nxdomain"}"#,
                2.0
            ),
            (r#"meshdns_request_duration_seconds_count{outcome="forwarded"}"#, 2.0),
            (r#"meshdns_request_duration_seconds_count{outcome="cache_hit"}"#, 1.0),
        ]),
    );
    assert_eq!(
        deltas(&before, &after, "meshdns_cache_"),
        expected(&[
            ("meshdns_cache_misses_total", 2.0),
            ("meshdns_cache_hits_total", 1.0),
            ("meshdns_cache_entries", 2.0),
        ]),
    );

    // The state gauges, read from the hub at scrape time.
    for (series, want) in [
        (r#"meshdns_cluster_loaded{cluster="cluster-1"}"#, 1.0),
        (r#"meshdns_cluster_loaded{cluster="cluster-3"}"#, 1.0),
        (r#"meshdns_cluster_services{cluster="cluster-2"}"#, 4.0),
        (r#"meshdns_cluster_stale{cluster="cluster-2"}"#, 0.0),
        (r#"meshdns_cluster_watch_errors_total{cluster="cluster-2"}"#, 0.0),
        ("meshdns_ready", 1.0),
    ] {
        assert_eq!(after.get(series), Some(&want), "{series}");
    }
    assert!(after[r#"meshdns_cluster_update_age_seconds{cluster="cluster-1"}"#] < 60.0);
    assert!(after["meshdns_table_rebuilds_total"] >= 1.0);
    assert!(after["meshdns_table_rebuild_duration_seconds_count"] >= 1.0);
    assert!(after["meshdns_table_names"] >= 5.0, "{}", after["meshdns_table_names"]);

    // Every forwarded query failing: SERVFAIL, counted as an error.
    let dead = Proxy::start(&seed_clusters(), &[closed], "").await;
    let dead_admin = dead.app.admin_addr().unwrap();
    let before = tokio::task::spawn_blocking(move || scrape(dead_admin)).await.unwrap();
    let reply = ask(dead.addr, Proto::Udp, "www.example.test.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    let after = tokio::task::spawn_blocking(move || scrape(dead_admin)).await.unwrap();
    assert_eq!(
        deltas(&before, &after, "meshdns_requests_total"),
        expected(&[(
            r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="error"}"#,
            1.0
        )]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_pages_show_clusters_and_the_table() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let proxy = Proxy::start(&seed_clusters(), &[upstream.addr], "").await;
    let admin = proxy.app.admin_addr().unwrap();
    let pages = tokio::task::spawn_blocking(move || {
        [
            "/healthz",
            "/ready",
            "/debug/clusters",
            "/debug/table",
            "/debug/table?name=HelloWorld.helloworld.svc.cluster.local",
            "/debug/table?name=helloworld.helloworld.sleep.svc.cluster.local.",
            "/nothing",
        ]
        .map(|path| get(admin, path))
    })
    .await
    .unwrap();
    let [healthz, ready, clusters, table, one, shortcut, missing] = pages;
    assert_eq!(healthz.0, 200);
    assert_eq!(ready, (200, "ready\n".to_string()));
    assert_eq!(missing.0, 404);

    let clusters: Value = serde_json::from_str(&clusters.1).expect("clusters JSON");
    let c2 = clusters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cluster-2")
        .expect("cluster-2 listed");
    assert_eq!(c2["loaded"], true);
    assert_eq!(c2["local"], false);
    assert_eq!(c2["services"], 4);
    assert_eq!(c2["gateways"], serde_json::json!(["34.136.67.85"]));
    assert_eq!(c2["lastError"], Value::Null);
    assert!(c2["source"].as_str().unwrap().contains("cluster-2.yaml"), "{c2}");

    let table: Value = serde_json::from_str(&table.1).expect("table JSON");
    assert_eq!(table["allLoaded"], true);
    let row = |name: &str| {
        table["names"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {table}"))
            .clone()
    };
    let hw = row("helloworld.helloworld.svc.cluster.local.");
    assert_eq!(hw["reason"], "local ClusterIP, cluster-1");
    assert_eq!(hw["records"], serde_json::json!(["A 10.96.120.15"]));
    let multi = row("multi.shared.svc.cluster.local.");
    assert_eq!(multi["reason"], "gateways of cluster-2, cluster-3");
    let mut records: Vec<String> = serde_json::from_value(multi["records"].clone()).unwrap();
    records.sort();
    assert_eq!(records, ["A 34.136.67.85", "A 35.1.1.1"]);

    let one: Value = serde_json::from_str(&one.1).unwrap();
    assert_eq!(one["names"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["names"][0]["reason"], "local ClusterIP, cluster-1");
    let shortcut: Value = serde_json::from_str(&shortcut.1).unwrap();
    let reason = shortcut["explanation"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("search shortcut of helloworld.helloworld.svc.cluster.local."),
        "{reason}"
    );
}

fn wait_ready(admin: SocketAddr, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        let (status, body) = get(admin, "/ready");
        if status == 200 {
            return body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(started.elapsed() < limit, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_a_cluster_that_loads_late() {
    let api = FakeApiServer::start().await;
    api.apply_service(service("sample", "late", &["10.112.9.9"]));
    api.stop();
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        Spec {
            name: "cluster-1",
            local: true,
            src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
        },
        Spec {
            name: "cluster-2",
            local: false,
            src: Src::Kubeconfig(api.kubeconfig_yaml("cluster-2")),
        },
    ];
    let config = write_config(dir.path(), &specs, &[closed_port_addr()], "startupWait: 60s\n");
    let config = config.to_str().unwrap().to_string();
    let body = tokio::task::spawn_blocking(move || {
        let meshdns = Meshdns::spawn(&["serve", "--config", &config], "info");
        let admin = meshdns.logged_addr("admin server listening", Duration::from_secs(10));
        let started = Instant::now();
        while !get(admin, "/debug/clusters").1.contains("\"loaded\": true") {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "cluster-1's dump never loaded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (status, body) = get(admin, "/ready");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("cluster-2") && !body.contains("cluster-1"), "{body}");
        assert_eq!(get(admin, "/healthz").0, 200);
        let metrics = scrape(admin);
        assert_eq!(metrics.get("meshdns_ready"), Some(&0.0));
        assert_eq!(
            metrics.get(r#"meshdns_cluster_loaded{cluster="cluster-2"}"#),
            Some(&0.0)
        );
        assert_eq!(
            metrics.get(r#"meshdns_cluster_loaded{cluster="cluster-1"}"#),
            Some(&1.0)
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(get(admin, "/ready").0, 503, "still waiting");

        api.restart();
        let body = wait_ready(admin, RECOVERY_BOUND);
        // Ready means DNS is served.
        let dns = meshdns.logged_addr("listening for DNS", Duration::from_secs(5));
        let metrics = scrape(admin);
        assert_eq!(metrics.get("meshdns_ready"), Some(&1.0));
        assert_eq!(
            metrics.get(r#"meshdns_cluster_loaded{cluster="cluster-2"}"#),
            Some(&1.0)
        );
        (body, dns, meshdns)
    })
    .await
    .unwrap();
    assert_eq!(body.0, "ready\n");
    let reply = ask(body.1, Proto::Udp, "sleep.sleep.svc.cluster.local.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    drop(body.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_the_startup_wait_expires() {
    let api = FakeApiServer::start().await;
    api.stop();
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        Spec {
            name: "cluster-1",
            local: true,
            src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
        },
        Spec {
            name: "cluster-2",
            local: false,
            src: Src::Kubeconfig(api.kubeconfig_yaml("cluster-2")),
        },
    ];
    let config = write_config(dir.path(), &specs, &[closed_port_addr()], "startupWait: 1s\n");
    let config = config.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let meshdns = Meshdns::spawn(&["serve", "--config", &config], "info");
        let admin = meshdns.logged_addr("admin server listening", Duration::from_secs(10));
        let started = Instant::now();
        let body = wait_ready(admin, Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            body.contains("start-up wait expired") && body.contains("cluster-2"),
            "{body}"
        );
        let clusters: Value = serde_json::from_str(&get(admin, "/debug/clusters").1).unwrap();
        let c2 = &clusters[1];
        assert_eq!(c2["name"], "cluster-2");
        assert_eq!(c2["loaded"], false);
        assert!(c2["lastError"].is_string(), "the refused connection is reported: {c2}");
    })
    .await
    .unwrap();
}

/// A remote cluster whose gateway reports loopback and the cloud metadata address gets
/// neither answered to pods: its services are served by the other cluster's good gateway, or
/// not at all, and `/debug/clusters` shows what was refused and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_gateway_addresses_are_not_answered_and_are_shown() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let clusters = [
        ClusterSpec {
            name: "cluster-1",
            local: true,
            dump: Dump::new().service("sleep", "sleep", &["10.96.88.40"]),
        },
        ClusterSpec {
            name: "cluster-2",
            local: false,
            dump: Dump::new()
                .service("shared", "multi", &["10.112.30.3"])
                .gateway(&["34.136.67.85"]),
        },
        ClusterSpec {
            name: "cluster-3",
            local: false,
            dump: Dump::new()
                .service("shared", "multi", &["10.113.0.3"])
                .service("only", "metadata", &["10.113.0.4"])
                .gateway(&["127.0.0.1", "169.254.169.254"]),
        },
    ];
    let proxy = Proxy::start(&clusters, &[upstream.addr], "").await;
    let cases: &[(&str, RecordType, ResponseCode, &[&str])] = &[
        (
            "multi.shared.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NoError,
            &["A 34.136.67.85"],
        ),
        (
            "multi.shared.svc.cluster.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
            &[],
        ),
        // Only cluster-3 has it, and cluster-3 has no gateway that may be answered.
        (
            "metadata.only.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
            &[],
        ),
    ];
    for &(name, qtype, rcode, want) in cases {
        for proto in [Proto::Udp, Proto::Tcp] {
            let reply = ask(proxy.addr, proto, name, qtype).await;
            assert_eq!(reply.metadata.response_code, rcode, "{name} {qtype} {proto:?}");
            assert_eq!(answers(&reply), want, "{name} {qtype} {proto:?}");
        }
    }

    let admin = proxy.app.admin_addr().unwrap();
    let body = tokio::task::spawn_blocking(move || get(admin, "/debug/clusters"))
        .await
        .unwrap()
        .1;
    let clusters: Value = serde_json::from_str(&body).expect("clusters JSON");
    let cluster = |name: &str| {
        clusters
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {clusters}"))
            .clone()
    };
    let c3 = cluster("cluster-3");
    assert_eq!(c3["gateways"], serde_json::json!([]), "{c3}");
    assert_eq!(
        c3["refusedGatewayAddresses"],
        serde_json::json!(["127.0.0.1 (loopback)", "169.254.169.254 (link-local)"]),
        "{c3}"
    );
    let c2 = cluster("cluster-2");
    assert_eq!(c2["gateways"], serde_json::json!(["34.136.67.85"]), "{c2}");
    assert_eq!(c2["refusedGatewayAddresses"], serde_json::json!([]), "{c2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:5300",
            "--admin",
            &addr,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&addr) && stderr.contains("admin"), "{stderr}");
    assert!(!stderr.contains("listening for DNS"), "{stderr}");
    // An empty address turns the admin server off.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &[Spec {
            name: "c1",
            local: true,
            src: Src::Dump(Dump::new()),
        }],
        &[closed_port_addr()],
        "",
    );
    let overrides = meshdns::config::Overrides {
        admin: Some(String::new()),
        ..Default::default()
    };
    let config = meshdns::config::Config::load(&path, &overrides).unwrap();
    assert_eq!(config.admin, None);
    let app = meshdns::app::App::start(&config).await.unwrap();
    assert_eq!(app.admin_addr(), None);
    app.shutdown().await;
}

fn explain_json(config: &Path, name: &str, qtype: &str) -> Value {
    let out = Command::new(BIN)
        .args([
            "explain",
            "--config",
            config.to_str().unwrap(),
            name,
            qtype,
            "--output",
            "json",
        ])
        .output()
        .expect("run meshdns explain");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("explain prints JSON")
}

fn rcode_text(msg: &Message) -> String {
    match msg.metadata.response_code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        other => other.to_string().to_uppercase(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_server() {
    let upstream = FakeUpstream::start(
        vec![("www.example.test", "192.0.2.10".parse().unwrap())],
        Behavior::Normal,
    )
    .await;
    let proxy = Proxy::start(&seed_clusters(), &[upstream.addr], "").await;
    let config = proxy.dir.path().join("meshdns.yaml");
    let table: &[(&str, &str, &str)] = &[
        ("helloworld.helloworld.svc.cluster.local", "A", "local"),
        ("HelloWorld.helloworld.svc.cluster.local", "AAAA", "local_nodata"),
        ("httpbin.sample.svc.cluster.local", "A", "local"),
        ("multi.shared.svc.cluster.local", "A", "local"),
        ("helloworld.helloworld.sleep.svc.cluster.local", "A", "search_shortcut"),
        ("httpbin.sample.svc.svc.cluster.local", "A", "search_shortcut"),
        ("nothere.helloworld.svc.cluster.local", "A", "local_nxdomain"),
        ("nothere.svc.cluster.local", "A", "local_nxdomain"),
        ("sample.svc.cluster.local", "A", "local_nodata"),
        ("www.example.test", "A", "forward"),
        ("helloworld.helloworld.svc.cluster.local.corp.example", "A", "forward"),
    ];
    for (name, qtype, rule) in table {
        let config = config.clone();
        let (name_owned, qtype_owned) = (name.to_string(), qtype.to_string());
        let explained = tokio::task::spawn_blocking(move || explain_json(&config, &name_owned, &qtype_owned))
            .await
            .unwrap();
        assert_eq!(explained["rule"], *rule, "{name} {qtype}: {explained}");
        let rtype = qtype.parse::<RecordType>().unwrap();
        let before = upstream.udp_queries();
        let reply = ask(proxy.addr, Proto::Udp, &format!("{name}."), rtype).await;
        if *rule == "forward" {
            assert_eq!(upstream.udp_queries(), before + 1, "{name} went upstream");
            assert_eq!(explained["action"], "forward");
            let reason = explained["reason"].as_str().unwrap();
            assert!(
                reason.starts_with(&format!("would forward upstream to {}", upstream.addr)),
                "{reason}"
            );
            continue;
        }
        assert_eq!(upstream.udp_queries(), before, "{name} answered locally");
        assert_eq!(explained["rcode"], rcode_text(&reply), "{name} {qtype}");
        let mut served: Vec<String> = reply
            .answers
            .iter()
            .map(|r| format!("{} {}", r.record_type(), r.data))
            .collect();
        let mut said: Vec<String> = explained["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r["type"].as_str().unwrap(), r["data"].as_str().unwrap()))
            .collect();
        served.sort();
        said.sort();
        assert_eq!(said, served, "{name} {qtype}");
        assert_eq!(
            explained["authority"].as_array().unwrap().is_empty(),
            reply.authorities.is_empty(),
            "{name} {qtype}: SOA"
        );
    }

    // The text form, as an operator reads it.
    let out = Command::new(BIN)
        .args([
            "explain",
            "--config",
            config.to_str().unwrap(),
            "nothere.helloworld.svc.cluster.local",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NXDOMAIN: no service nothere in namespace helloworld in any of 3 clusters"),
        "{text}"
    );
    let out = Command::new(BIN)
        .args([
            "explain",
            "--config",
            config.to_str().unwrap(),
            "multi.shared.svc.cluster.local",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gateways of cluster-2, cluster-3"), "{text}");
    assert!(text.contains("34.136.67.85") && text.contains("35.1.1.1"), "{text}");
}

#[test]
fn check_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c1.yaml"), Dump::new().service("a", "b", &["10.0.0.1"]).yaml()).unwrap();
    std::fs::write(d.join("resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
    std::fs::write(
        d.join("broken.yaml"),
        "kind: List\nitems: [{kind: Service, metadata: {name: x}, spec: {clusterIP: not-an-ip}}]\n",
    )
    .unwrap();
    let run = |yaml: &str| {
        let path = d.join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) =
        run("resolvConf: resolv.conf\nclusters: [{name: c1, local: true, objects: c1.yaml}]\n");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ok") && stdout.contains("1 services"), "{stdout}");

    // Several field problems at once.
    let (code, _, stderr) = run("listen: [nope]\nttl: 999999\nadmin: x\nresolvConf: resolv.conf\n\
         clusters: [{name: c1, local: true, objects: c1.yaml}, {name: c1, objects: c1.yaml}]\n");
    assert_eq!(code, Some(2), "{stderr}");
    for field in ["listen[0]", "ttl", "admin", "clusters[1].name"] {
        assert!(
            stderr.contains(&format!(": {field}: ")),
            "{field} missing from {stderr}"
        );
    }
    assert!(stderr.contains("4 problem(s)"), "{stderr}");

    // A valid file naming a broken dump, a missing kubeconfig and a resolv.conf without
    // nameservers.
    std::fs::write(d.join("empty-resolv.conf"), "search svc.cluster.local\n").unwrap();
    let (code, _, stderr) = run("resolvConf: empty-resolv.conf\nclusters:\n\
         - {name: c1, local: true, objects: broken.yaml}\n\
         - {name: c2, kubeconfig: missing.kubeconfig}\n");
    assert_eq!(code, Some(2), "{stderr}");
    for needle in [
        "cluster c1",
        "broken.yaml",
        "cluster c2",
        "missing.kubeconfig",
        "no nameserver",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from {stderr}");
    }
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
}
