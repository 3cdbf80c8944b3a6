//! Live clusters end to end: meshdns watches in-process fake API servers (one per cluster,
//! speaking the real list/watch protocol) and its DNS answers follow the clusters' changes,
//! survive API-server faults, and track the remote-secrets directory.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use support::apiserver::{FakeApiServer, gateway_service, service};
use support::dns::{BOTH, Proto, answers, ask};
use support::proxy::{ClusterSpec, Dump, Proxy, Spec, Src};
use support::upstream::{Behavior, FakeUpstream};

/// The bound for a change in a cluster to show in DNS answers.
const UPDATE_BOUND: Duration = Duration::from_secs(1);
/// Bound for recoveries that wait on the watcher's backoff (kube's default starts at ~1 s).
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
const GW: &[(&str, &str)] = &[("istio", "eastwestgateway"), ("app", "istio-eastwestgateway")];

/// The clusters of the seed scenario, plus a service in two remotes.
async fn seeded() -> (FakeApiServer, FakeApiServer, FakeApiServer) {
    let (c1, c2, c3) = (
        FakeApiServer::start().await,
        FakeApiServer::start().await,
        FakeApiServer::start().await,
    );
    c1.apply_service(service("helloworld", "helloworld", &["10.96.120.15"]));
    c1.apply_service(service("sleep", "sleep", &["10.96.88.40"]));
    c1.apply_service(service("dual", "dual", &["10.96.5.5", "fd00::5"]));
    c2.apply_service(service("helloworld", "helloworld", &["10.112.4.20"]));
    c2.apply_service(service("sample", "httpbin", &["10.112.30.2"]));
    c2.apply_service(service("shared", "multi", &["10.112.30.3"]));
    c2.apply_service(gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        GW,
        &["34.136.67.85"],
    ));
    c3.apply_service(service("shared", "multi", &["10.113.0.3"]));
    c3.apply_service(gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        GW,
        &["35.1.1.1"],
    ));
    (c1, c2, c3)
}

fn live_specs(c1: &FakeApiServer, c2: &FakeApiServer, c3: &FakeApiServer) -> Vec<Spec> {
    vec![
        Spec {
            name: "cluster-1",
            local: true,
            src: Src::Kubeconfig(c1.kubeconfig_yaml("cluster-1")),
        },
        Spec {
            name: "cluster-2",
            local: false,
            src: Src::Kubeconfig(c2.kubeconfig_yaml("cluster-2")),
        },
        Spec {
            name: "cluster-3",
            local: false,
            src: Src::Kubeconfig(c3.kubeconfig_yaml("cluster-3")),
        },
    ]
}

const PROBES: &[(&str, RecordType)] = &[
    ("helloworld.helloworld.svc.cluster.local.", RecordType::A),
    ("helloworld.helloworld.svc.cluster.local.", RecordType::AAAA),
    ("sleep.sleep.svc.cluster.local.", RecordType::A),
    ("dual.dual.svc.cluster.local.", RecordType::AAAA),
    ("httpbin.sample.svc.cluster.local.", RecordType::A),
    ("multi.shared.svc.cluster.local.", RecordType::A),
    ("helloworld.helloworld.sleep.svc.cluster.local.", RecordType::A),
    ("nothere.sample.svc.cluster.local.", RecordType::A),
    ("sample.svc.cluster.local.", RecordType::A),
];

async fn snapshot(proxy: &Proxy, proto: Proto) -> BTreeMap<String, (ResponseCode, Vec<String>)> {
    let mut out = BTreeMap::new();
    for (name, qtype) in PROBES {
        let reply = ask(proxy.addr, proto, name, *qtype).await;
        out.insert(
            format!("{name} {qtype}"),
            (reply.metadata.response_code, answers(&reply)),
        );
    }
    out
}

/// Polls until `name` answers `want` (rcode and sorted answers); returns how long it took.
async fn eventually(
    proxy: &Proxy,
    name: &str,
    qtype: RecordType,
    rcode: ResponseCode,
    want: &[&str],
    bound: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let reply = ask(proxy.addr, Proto::Udp, name, qtype).await;
        if reply.metadata.response_code == rcode && answers(&reply) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "{name} {qtype}: still {:?} {:?} after {bound:?}",
            reply.metadata.response_code,
            answers(&reply)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_answers_like_the_equivalent_dumps() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (c1, c2, c3) = seeded().await;
    let live = Proxy::start_specs(&live_specs(&c1, &c2, &c3), &[upstream.addr], "").await;
    let dumps = vec![
        ClusterSpec {
            name: "cluster-1",
            local: true,
            dump: Dump::new()
                .service("helloworld", "helloworld", &["10.96.120.15"])
                .service("sleep", "sleep", &["10.96.88.40"])
                .service("dual", "dual", &["10.96.5.5", "fd00::5"]),
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
    ];
    let offline = Proxy::start(&dumps, &[upstream.addr], "").await;
    for proto in BOTH {
        let want = snapshot(&offline, proto).await;
        assert_eq!(snapshot(&live, proto).await, want, "{proto:?}");
        assert_eq!(
            want["nothere.sample.svc.cluster.local. A"].0,
            ResponseCode::NXDomain,
            "all loaded: denial is local"
        );
    }
    assert!(live.app.hub().status().iter().all(|s| s.loaded && !s.stale));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_clusters_show_within_a_second() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (c1, c2, c3) = seeded().await;
    let proxy = Proxy::start_specs(&live_specs(&c1, &c2, &c3), &[upstream.addr], "").await;
    let name = "late.sample.svc.cluster.local.";
    use RecordType::{A, AAAA};
    use ResponseCode::{NXDomain, NoError};
    let mut took = Vec::new();

    // A remote service is added, gains a family, and is deleted.
    c2.apply_service(service("sample", "late", &["10.112.30.9"]));
    took.push(eventually(&proxy, name, A, NoError, &["A 34.136.67.85"], UPDATE_BOUND).await);
    c2.apply_service(service("sample", "late", &["10.112.30.9", "fd00:112::9"]));
    took.push(eventually(&proxy, name, A, NoError, &["A 34.136.67.85"], UPDATE_BOUND).await);
    c2.delete_service("sample", "late");
    took.push(eventually(&proxy, name, A, NXDomain, &[], UPDATE_BOUND).await);

    // A local service gains its IPv6 family: AAAA goes from NODATA to the address.
    let hw = "helloworld.helloworld.svc.cluster.local.";
    c1.apply_service(service("helloworld", "helloworld", &["10.96.120.15", "fd00::15"]));
    took.push(eventually(&proxy, hw, AAAA, NoError, &["AAAA fd00::15"], UPDATE_BOUND).await);

    // The local copy appearing switches the answer from the gateways to the ClusterIP, and back.
    let multi = "multi.shared.svc.cluster.local.";
    c1.apply_service(service("shared", "multi", &["10.96.7.7"]));
    took.push(eventually(&proxy, multi, A, NoError, &["A 10.96.7.7"], UPDATE_BOUND).await);
    c1.delete_service("shared", "multi");
    took.push(
        eventually(
            &proxy,
            multi,
            A,
            NoError,
            &["A 34.136.67.85", "A 35.1.1.1"],
            UPDATE_BOUND,
        )
        .await,
    );

    // The east-west gateway's load-balancer address changes.
    c3.apply_service(gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        GW,
        &["35.9.9.9"],
    ));
    took.push(
        eventually(
            &proxy,
            multi,
            A,
            NoError,
            &["A 34.136.67.85", "A 35.9.9.9"],
            UPDATE_BOUND,
        )
        .await,
    );
    // A cluster whose gateway had no address yet gains one.
    c3.apply_service(service("solo", "only3", &["10.113.0.9"]));
    c3.apply_service(gateway_service("istio-system", "istio-eastwestgateway", GW, &[]));
    eventually(&proxy, "only3.solo.svc.cluster.local.", A, NXDomain, &[], UPDATE_BOUND).await;
    c3.apply_service(gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        GW,
        &["35.2.2.2"],
    ));
    took.push(
        eventually(
            &proxy,
            "only3.solo.svc.cluster.local.",
            A,
            NoError,
            &["A 35.2.2.2"],
            UPDATE_BOUND,
        )
        .await,
    );
    eprintln!("update-to-answer times: {took:?}");
}

/// Queries known names continuously (bounded) while faults hit the API servers; no answer may
/// go missing or change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_faults_never_lose_answers() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (c1, c2, c3) = seeded().await;
    let proxy = Proxy::start_specs(&live_specs(&c1, &c2, &c3), &[upstream.addr], "").await;
    let want = snapshot(&proxy, Proto::Udp).await;
    let addr = proxy.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let want = want.clone();
        tokio::spawn(async move {
            let mut rounds = 0u32;
            // Bounded: at most 2000 rounds of the probe list, and it stops when told.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && rounds < 2000 {
                for (name, qtype) in PROBES {
                    let reply = ask(addr, Proto::Udp, name, *qtype).await;
                    let got = (reply.metadata.response_code, answers(&reply));
                    assert_eq!(
                        got,
                        want[&format!("{name} {qtype}")],
                        "{name} {qtype} changed during a fault"
                    );
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            rounds
        })
    };

    c2.drop_watches();
    c3.inject_malformed_event();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c2.expire();
    c1.expire();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c2.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stale = proxy
        .app
        .hub()
        .status()
        .into_iter()
        .find(|s| s.name == "cluster-2")
        .unwrap();
    assert!(stale.stale, "an unreachable cluster is marked stale: {stale:?}");
    c2.restart();
    c3.set_failure(Some(500));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c3.set_failure(None);

    // Recovery: a change made after the faults is seen through every cluster's new watch.
    c2.apply_service(service("sample", "after", &["10.112.30.10"]));
    eventually(
        &proxy,
        "after.sample.svc.cluster.local.",
        RecordType::A,
        ResponseCode::NoError,
        &["A 34.136.67.85"],
        RECOVERY_BOUND,
    )
    .await;
    c3.apply_service(service("sample", "after3", &["10.113.30.10"]));
    eventually(
        &proxy,
        "after3.sample.svc.cluster.local.",
        RecordType::A,
        ResponseCode::NoError,
        &["A 35.1.1.1"],
        RECOVERY_BOUND,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = prober.await.expect("no answer went missing");
    assert!(rounds > 10, "the prober ran ({rounds} rounds)");
    let started = Instant::now();
    while proxy.app.hub().status().iter().any(|s| s.stale) {
        assert!(
            started.elapsed() < RECOVERY_BOUND,
            "stale flags clear: {:?}",
            proxy.app.hub().status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_api_server_is_retried_with_backoff_not_a_hot_loop() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (c1, c2, c3) = seeded().await;
    let proxy = Proxy::start_specs(&live_specs(&c1, &c2, &c3), &[upstream.addr], "").await;
    for status in [500u16, 429] {
        c2.set_failure(Some(status));
        c2.drop_watches();
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.clear_requests();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let n = c2.requests().len();
        // kube's default backoff starts near 1 s and grows; a hot loop would be thousands.
        assert!(n <= 12, "{status}: {n} requests in 3 s");
        let reply = ask(
            proxy.addr,
            Proto::Udp,
            "httpbin.sample.svc.cluster.local.",
            RecordType::A,
        )
        .await;
        assert_eq!(answers(&reply), ["A 34.136.67.85"], "{status}: answers stay");
        c2.set_failure(None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_does_not_hold_start_up_forever() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (c1, c2, c3) = seeded().await;
    let mut specs = live_specs(&c1, &c2, &c3);
    c3.stop();
    specs[2].src = Src::Kubeconfig(c3.kubeconfig_yaml("cluster-3"));
    let started = Instant::now();
    let proxy = Proxy::start_specs(&specs, &[upstream.addr], "startupWait: 1s\n").await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    let reply = ask(
        proxy.addr,
        Proto::Udp,
        "httpbin.sample.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(answers(&reply), ["A 34.136.67.85"], "known clusters answer");
    // Unknown names are forwarded, not denied, while a cluster is missing.
    let before = upstream.udp_queries();
    let reply = ask(
        proxy.addr,
        Proto::Udp,
        "nothere.sample.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert!(!reply.metadata.authoritative);
    assert_eq!(upstream.udp_queries(), before + 1, "forwarded upstream");
    // It comes up later: its names appear and denial becomes local.
    c3.restart();
    eventually(
        &proxy,
        "multi.shared.svc.cluster.local.",
        RecordType::A,
        ResponseCode::NoError,
        &["A 34.136.67.85", "A 35.1.1.1"],
        RECOVERY_BOUND,
    )
    .await;
    let reply = ask(
        proxy.addr,
        Proto::Udp,
        "nothere.sample.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.metadata.authoritative);
}

/// Lays out `files` the way kubelet mounts a Secret: the data in a timestamped hidden
/// directory, a `..data` symlink swapped atomically to it, and one visible symlink per key.
fn kubelet_publish(dir: &std::path::Path, version: u32, files: &[(&str, String)]) {
    use std::os::unix::fs::symlink;
    let data = format!("..2026_11_25_00_00_{version:02}.000000001");
    std::fs::create_dir_all(dir.join(&data)).unwrap();
    for (key, content) in files {
        std::fs::write(dir.join(&data).join(key), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    // Visible keys: add the new ones, drop the ones no longer in the secret.
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !files.iter().any(|(k, _)| *k == name) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    for (key, _) in files {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{key}"), &link).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_secrets_directory_adds_restarts_and_removes_clusters() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (c1, c2, c3) = seeded().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("remote-secrets");
    std::fs::create_dir(&secrets).unwrap();
    // Istio's shared secret carries a key for every cluster, the local one included.
    kubelet_publish(
        &secrets,
        1,
        &[
            ("cluster-1", c1.kubeconfig_yaml("cluster-1")),
            ("cluster-2", c2.kubeconfig_yaml("cluster-2")),
        ],
    );
    let specs = [Spec {
        name: "cluster-1",
        local: true,
        src: Src::Kubeconfig(c1.kubeconfig_yaml("cluster-1")),
    }];
    let config = support::proxy::write_config(
        dir.path(),
        &specs,
        &[upstream.addr],
        "remoteSecretsDir: remote-secrets\nstartupWait: 5s\n",
    );
    let proc = tokio::task::block_in_place(|| {
        support::process::Meshdns::start(&["serve", "--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"])
    });
    let proxy_addr = proc.dns_addr();
    let check = |name: &'static str, want: &'static [&'static str], rcode: ResponseCode| async move {
        let started = Instant::now();
        loop {
            let reply = ask(proxy_addr, Proto::Udp, name, RecordType::A).await;
            if reply.metadata.response_code == rcode && answers(&reply) == want {
                return;
            }
            assert!(
                started.elapsed() < RECOVERY_BOUND,
                "{name}: {:?} {:?}",
                reply.metadata.response_code,
                answers(&reply)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    check(
        "httpbin.sample.svc.cluster.local.",
        &["A 34.136.67.85"],
        ResponseCode::NoError,
    )
    .await;
    check(
        "multi.shared.svc.cluster.local.",
        &["A 34.136.67.85"],
        ResponseCode::NoError,
    )
    .await;

    // A key added by swapping `..data`: cluster-3 joins.
    kubelet_publish(
        &secrets,
        2,
        &[
            ("cluster-1", c1.kubeconfig_yaml("cluster-1")),
            ("cluster-2", c2.kubeconfig_yaml("cluster-2")),
            ("cluster-3", c3.kubeconfig_yaml("cluster-3")),
        ],
    );
    check(
        "multi.shared.svc.cluster.local.",
        &["A 34.136.67.85", "A 35.1.1.1"],
        ResponseCode::NoError,
    )
    .await;

    // A key removed: cluster-2 leaves, and with it the names only it had.
    kubelet_publish(
        &secrets,
        3,
        &[
            ("cluster-1", c1.kubeconfig_yaml("cluster-1")),
            ("cluster-3", c3.kubeconfig_yaml("cluster-3")),
        ],
    );
    check("httpbin.sample.svc.cluster.local.", &[], ResponseCode::NXDomain).await;
    check(
        "multi.shared.svc.cluster.local.",
        &["A 35.1.1.1"],
        ResponseCode::NoError,
    )
    .await;

    // A key changed (cluster-3 now points at cluster-2's API server): the cluster restarts.
    kubelet_publish(
        &secrets,
        4,
        &[
            ("cluster-1", c1.kubeconfig_yaml("cluster-1")),
            ("cluster-3", c2.kubeconfig_yaml("cluster-3")),
        ],
    );
    check(
        "httpbin.sample.svc.cluster.local.",
        &["A 34.136.67.85"],
        ResponseCode::NoError,
    )
    .await;

    // An exec kubeconfig is refused, naming the cluster; the others keep answering.
    let evil = c3.kubeconfig_yaml("evil").replace(
        "    token:",
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n    token:",
    );
    kubelet_publish(
        &secrets,
        5,
        &[
            ("cluster-1", c1.kubeconfig_yaml("cluster-1")),
            ("cluster-3", c2.kubeconfig_yaml("cluster-3")),
            ("evil", evil),
        ],
    );
    let line = tokio::task::block_in_place(|| proc.wait_log(&["evil", "exec", "refused"], RECOVERY_BOUND));
    eprintln!("refusal: {line}");
    check(
        "httpbin.sample.svc.cluster.local.",
        &["A 34.136.67.85"],
        ResponseCode::NoError,
    )
    .await;
    check(
        "helloworld.helloworld.svc.cluster.local.",
        &["A 10.96.120.15"],
        ResponseCode::NoError,
    )
    .await;
    assert!(
        proc.log().iter().all(|l| !l.contains("cluster=cluster-1 local=false")),
        "the local key is not a remote"
    );
}
