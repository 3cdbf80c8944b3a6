//! API-server faults that must be survived (issue #8), one fault per test so that a failure
//! names its fault: meshdns runs in-process against `support::apiserver` fakes, and each test
//! checks the answers during the fault and that updates flow again after it.
//!
//! Covered elsewhere: an API server that refuses connections at start and comes up later
//! (`tests/live.rs`, `an_unreachable_cluster_does_not_hold_start_up_forever`), and all of these
//! faults at once under continuous queries (`api_server_faults_never_lose_answers`).

mod support;

use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use support::apiserver::{FakeApiServer, gateway_service, service};
use support::dns::{BOTH, Proto, answers, ask};
use support::proxy::{Proxy, Spec, Src};
use support::upstream::{Behavior, FakeUpstream};

const GW: &[(&str, &str)] = &[("istio", "eastwestgateway"), ("app", "istio-eastwestgateway")];
/// kube's default watcher backoff starts near 0.8 s and doubles, with jitter: a change made
/// right after a fault clears may wait out one more backoff step.
const RESUME_BOUND: Duration = Duration::from_secs(10);
/// How long a fault is held while requests are counted.
const FAULT_WINDOW: Duration = Duration::from_secs(3);
/// Requests a backed-off client may make in [`FAULT_WINDOW`]: two watchers (Services and
/// EndpointSlices), each retrying at most every 0.8 s or so. A hot loop makes thousands.
const MAX_REQUESTS_IN_WINDOW: usize = 20;

/// A local cluster and one remote cluster per entry of `remotes`, each remote with a gateway
/// and one service, `svc-<i>.sample`.
async fn clusters(remotes: usize) -> (FakeApiServer, Vec<FakeApiServer>) {
    let local = FakeApiServer::start().await;
    local.apply_service(service("sleep", "sleep", &["10.96.88.40"]));
    let mut out = Vec::new();
    for i in 0..remotes {
        let remote = FakeApiServer::start().await;
        remote.apply_service(service("sample", &format!("svc-{i}"), &["10.112.30.2"]));
        remote.apply_service(gateway_service(
            "istio-system",
            "istio-eastwestgateway",
            GW,
            &[&gateway_ip(i)],
        ));
        out.push(remote);
    }
    (local, out)
}

fn gateway_ip(i: usize) -> String {
    format!("34.136.67.{}", 80 + i)
}

const NAMES: [&str; 5] = ["cluster-1", "cluster-2", "cluster-3", "cluster-4", "cluster-5"];

async fn start(local: &FakeApiServer, remotes: &[FakeApiServer], upstream: &FakeUpstream) -> Proxy {
    let mut specs = vec![Spec {
        name: NAMES[0],
        local: true,
        src: Src::Kubeconfig(local.kubeconfig_yaml(NAMES[0])),
    }];
    for (i, remote) in remotes.iter().enumerate() {
        specs.push(Spec {
            name: NAMES[i + 1],
            local: false,
            src: Src::Kubeconfig(remote.kubeconfig_yaml(NAMES[i + 1])),
        });
    }
    Proxy::start_specs(&specs, &[upstream.addr], "startupWait: 5s\n").await
}

/// Asserts `name` answers exactly `want` (NOERROR) over UDP and TCP.
async fn assert_answers(proxy: &Proxy, name: &str, want: &[&str], during: &str) {
    for proto in BOTH {
        let reply = ask(proxy.addr, proto, name, RecordType::A).await;
        assert_eq!(
            (reply.metadata.response_code, answers(&reply)),
            (ResponseCode::NoError, want.iter().map(ToString::to_string).collect()),
            "{name} over {proto:?} {during}"
        );
    }
}

/// Polls (bounded) until `name` answers `want`; returns how long that took.
async fn eventually(proxy: &Proxy, name: &str, want: &[&str], bound: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let reply = ask(proxy.addr, Proto::Udp, name, RecordType::A).await;
        if reply.metadata.response_code == ResponseCode::NoError && answers(&reply) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "{name}: still {} {:?} after {bound:?}",
            reply.metadata.response_code,
            answers(&reply)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Failures the hub has counted for `cluster`.
fn errors(proxy: &Proxy, cluster: &str) -> u64 {
    proxy
        .app
        .hub()
        .status()
        .into_iter()
        .find(|s| s.name == cluster)
        .map_or(0, |s| s.errors)
}

/// Waits (bounded) until `api` has seen a watch request made after `since`: proof that the
/// client noticed the fault and came back, so the checks after it are not vacuous. (A watch cut
/// mid-stream is not an error to kube: it ends the stream and the watcher re-watches.)
async fn came_back(api: &FakeApiServer, since: Instant) {
    let started = Instant::now();
    while !api.requests().iter().any(|r| r.at > since && r.is_watch()) {
        assert!(
            started.elapsed() < RESUME_BOUND,
            "no watch request after the fault: {:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_keeps_answers_and_updates_resume() {
    let started = Instant::now();
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (local, remotes) = clusters(1).await;
    let proxy = start(&local, &remotes, &upstream).await;
    let gw = format!("A {}", gateway_ip(0));
    assert_answers(&proxy, "svc-0.sample.svc.cluster.local.", &[&gw], "before the fault").await;

    let dropped = Instant::now();
    remotes[0].drop_watches();
    came_back(&remotes[0], dropped).await;
    assert_answers(&proxy, "svc-0.sample.svc.cluster.local.", &[&gw], "after the drop").await;
    assert_answers(
        &proxy,
        "sleep.sleep.svc.cluster.local.",
        &["A 10.96.88.40"],
        "after the drop",
    )
    .await;

    // A change made after the drop arrives through the re-established watch.
    remotes[0].apply_service(service("sample", "after-drop", &["10.112.30.9"]));
    let took = eventually(&proxy, "after-drop.sample.svc.cluster.local.", &[&gw], RESUME_BOUND).await;
    assert_answers(&proxy, "svc-0.sample.svc.cluster.local.", &[&gw], "after resuming").await;
    eprintln!(
        "dropped watch: change visible {took:?} after it was made; test took {:?}",
        started.elapsed()
    );
}

/// 500 on one remote, 429 (with Retry-After) on another, at the same time: both are retried
/// with backoff, the last known answers stay, and once the errors stop, changes flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_throttling_back_off_and_recover() {
    let started = Instant::now();
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (local, remotes) = clusters(2).await;
    let proxy = start(&local, &remotes, &upstream).await;
    let statuses = [500u16, 429];
    let errors_before = errors(&proxy, "cluster-2");
    let failing = Instant::now();
    for (remote, status) in remotes.iter().zip(statuses) {
        remote.set_failure(Some(status));
        // Open watches are left alone by set_failure: end them so the client must come back.
        remote.drop_watches();
    }
    for remote in &remotes {
        came_back(remote, failing).await;
    }
    for remote in &remotes {
        remote.clear_requests();
    }
    tokio::time::sleep(FAULT_WINDOW).await;
    for (i, (remote, status)) in remotes.iter().zip(statuses).enumerate() {
        let seen = remote.requests().len();
        assert!(
            seen <= MAX_REQUESTS_IN_WINDOW,
            "{status}: {seen} requests in {FAULT_WINDOW:?}: a hot loop"
        );
        assert!(seen >= 1, "{status}: not retried at all in {FAULT_WINDOW:?}");
        eprintln!("{status}: {seen} requests in {FAULT_WINDOW:?}");
        let gw = format!("A {}", gateway_ip(i));
        let name = format!("svc-{i}.sample.svc.cluster.local.");
        assert_answers(&proxy, &name, &[&gw], &format!("during the {status}s")).await;
    }

    // The 500s reach the hub as errors (the cluster is marked stale); 429s are first retried
    // inside kube's client, honouring Retry-After, so they need not surface within the window.
    assert!(errors(&proxy, "cluster-2") > errors_before, "the 500s were reported");
    for (i, remote) in remotes.iter().enumerate() {
        remote.set_failure(None);
        remote.apply_service(service("sample", &format!("after-{i}"), &["10.112.30.9"]));
    }
    for (i, status) in statuses.iter().enumerate() {
        let gw = format!("A {}", gateway_ip(i));
        let name = format!("after-{i}.sample.svc.cluster.local.");
        let took = eventually(&proxy, &name, &[&gw], RESUME_BOUND).await;
        eprintln!("{}: change visible {took:?} after the errors stopped", status);
    }
    eprintln!("errors and throttling: test took {:?}", started.elapsed());
}

/// A line on the watch stream that is not a watch event: the answers stay as they were (no
/// wipe, no relist gap), and later good events still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_watch_event_changes_nothing_and_later_events_apply() {
    let started = Instant::now();
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let (local, remotes) = clusters(1).await;
    let proxy = start(&local, &remotes, &upstream).await;
    let gw = format!("A {}", gateway_ip(0));

    // The proxy is ready once its lists are in; its watches open just after. The bad line goes
    // only to streams open when it is injected, so wait for both (Services, EndpointSlices).
    let started_wait = Instant::now();
    while remotes[0].open_watches() < 2 {
        assert!(started_wait.elapsed() < RESUME_BOUND, "the watches never opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = errors(&proxy, "cluster-2");
    remotes[0].inject_malformed_event();
    // The bad line is a decode error for kube: it is reported, the watch carries on.
    let started_wait = Instant::now();
    while errors(&proxy, "cluster-2") <= before {
        assert!(
            started_wait.elapsed() < RESUME_BOUND,
            "the bad event was never reported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_answers(&proxy, "svc-0.sample.svc.cluster.local.", &[&gw], "after the bad event").await;
    let reply = ask(
        proxy.addr,
        Proto::Udp,
        "after-bad.sample.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain, "not there yet");

    remotes[0].apply_service(service("sample", "after-bad", &["10.112.30.9"]));
    let took = eventually(&proxy, "after-bad.sample.svc.cluster.local.", &[&gw], RESUME_BOUND).await;
    // A deletion after it applies too: the watch really is live again.
    remotes[0].delete_service("sample", "svc-0");
    let started_delete = Instant::now();
    loop {
        let reply = ask(proxy.addr, Proto::Udp, "svc-0.sample.svc.cluster.local.", RecordType::A).await;
        if reply.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(started_delete.elapsed() < RESUME_BOUND, "the deletion never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "malformed event: next change visible after {took:?}; test took {:?}",
        started.elapsed()
    );
}
