//! Object dumps change on disk: meshdns reloads them, swaps the table, and keeps serving the
//! last good state when a new file is broken.

mod support;

use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use support::dns::{BOTH, answers, ask};
use support::proxy::{ClusterSpec, Dump, Proxy};
use support::upstream::{Behavior, FakeUpstream};

/// Generous bound for a reload to show: notify fires at once, the poll fallback within 5 s.
const RELOAD_WAIT: Duration = Duration::from_secs(8);

async fn wait_for(proxy: &Proxy, name: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let reply = ask(proxy.addr, support::dns::Proto::Udp, name, RecordType::A).await;
        if answers(&reply) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < RELOAD_WAIT,
            "{name} never became {want:?}: last {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dump_changes_are_picked_up_and_broken_files_keep_the_last_good_state() {
    let upstream = FakeUpstream::start(vec![], Behavior::Normal).await;
    let remote = Dump::new()
        .service("sample", "httpbin", &["10.112.30.2"])
        .gateway(&["34.136.67.85"]);
    let clusters = vec![
        ClusterSpec {
            name: "cluster-1",
            local: true,
            dump: Dump::new().service("sleep", "sleep", &["10.96.88.40"]),
        },
        ClusterSpec {
            name: "cluster-2",
            local: false,
            dump: remote.clone(),
        },
    ];
    let proxy = Proxy::start(&clusters, &[upstream.addr], "").await;
    let late = "late.sample.svc.cluster.local.";
    let reply = ask(proxy.addr, support::dns::Proto::Udp, late, RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);

    // A service appears in cluster-2.
    let grown = remote.clone().service("sample", "late", &["10.112.30.9"]);
    std::fs::write(proxy.dump_path("cluster-2"), grown.yaml()).unwrap();
    let took = wait_for(&proxy, late, &["A 34.136.67.85"]).await;
    eprintln!("reload visible after {took:?}");

    // A broken file (truncated YAML, then binary junk) changes nothing.
    for junk in [
        &b"apiVersion: v1\nkind: List\nitems:\n- kind: Service\n  metadata: {name: [\n"[..],
        &[0xff, 0xfe, 0x00, 0x9f],
    ] {
        std::fs::write(proxy.dump_path("cluster-2"), junk).unwrap();
        let started = Instant::now();
        while proxy.app.hub().status()[1].last_error.is_none() {
            assert!(started.elapsed() < RELOAD_WAIT, "the broken file was never noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for proto in BOTH {
            let reply = ask(proxy.addr, proto, late, RecordType::A).await;
            assert_eq!(answers(&reply), ["A 34.136.67.85"], "old state kept over {proto:?}");
        }
        let status = &proxy.app.hub().status()[1];
        assert!(
            status.last_error.as_deref().unwrap_or("").contains("cluster-2.yaml"),
            "{status:?}"
        );
        // Let the next write be a distinct change.
        std::fs::write(proxy.dump_path("cluster-2"), grown.yaml()).unwrap();
        wait_for(&proxy, late, &["A 34.136.67.85"]).await;
        let started = Instant::now();
        while proxy.app.hub().status()[1].last_error.is_some() {
            assert!(started.elapsed() < RELOAD_WAIT, "a good file clears the error");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The service is deleted again: the name is denied once more.
    std::fs::write(proxy.dump_path("cluster-2"), remote.yaml()).unwrap();
    let started = Instant::now();
    loop {
        let reply = ask(proxy.addr, support::dns::Proto::Tcp, late, RecordType::A).await;
        if reply.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(started.elapsed() < RELOAD_WAIT, "deletion never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
