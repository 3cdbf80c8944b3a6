//! Live-cluster footprint and latency benchmark (not a test): three fake API servers with
//! 10,000 Services each feed a release-built `meshdns serve`; reports the proxy's RSS after
//! sync, the time from start to a loaded table, and the time from one watch event to the
//! changed DNS answer. Targets (issue 3): RSS under 48 MiB, update-to-answer under 100 ms.
//!
//! Run: `cargo bench --bench live_sync` (add `-- --services N` to change the size).
//! All traffic stays on 127.0.0.1.

#[path = "../tests/support/apiserver.rs"]
#[allow(dead_code)]
mod apiserver;
#[path = "../tests/support/dns.rs"]
#[allow(dead_code)]
mod dns;
#[path = "../tests/support/strict.rs"]
#[allow(dead_code)]
mod strict;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apiserver::{FakeApiServer, gateway_service, service};
use hickory_proto::rr::RecordType;

const DEFAULT_SERVICES: usize = 10_000;
const NAMESPACES: usize = 100;
const UPDATES: usize = 30;
/// Bound on any single wait, so the benchmark always ends.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cluster_ip(cluster: usize, i: usize) -> String {
    format!("10.{}.{}.{}", 96 + cluster, (i / 250) % 250, i % 250 + 1)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let services = std::env::args()
        .skip_while(|a| a != "--services")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_SERVICES);
    let servers = [
        FakeApiServer::start().await,
        FakeApiServer::start().await,
        FakeApiServer::start().await,
    ];
    let fill = Instant::now();
    for (c, server) in servers.iter().enumerate() {
        for i in 0..services {
            // Half of each remote's services also exist locally, half only there.
            let name = if c == 0 || i % 2 == 0 {
                format!("svc-{i}")
            } else {
                format!("c{c}-svc-{i}")
            };
            server.apply_service(service(&format!("ns-{}", i % NAMESPACES), &name, &[&cluster_ip(c, i)]));
        }
        let gw = [("istio", "eastwestgateway")];
        server.apply_service(gateway_service(
            "istio-system",
            "istio-eastwestgateway",
            &gw,
            &[&format!("34.0.0.{}", c + 1)],
        ));
    }
    eprintln!(
        "filled 3 fake API servers with {services} services each in {:?}",
        fill.elapsed()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = String::from(
        "listen: [\"127.0.0.1:0\"]\nadmin: \"\"\nupstreams: [\"127.0.0.1:9\"]\nstartupWait: 60s\nclusters:\n",
    );
    for (c, server) in servers.iter().enumerate() {
        let name = format!("cluster-{}", c + 1);
        server
            .write_kubeconfig(dir.path().join(&name), &name)
            .expect("kubeconfig");
        let _ = writeln!(
            config,
            "  - name: {name}\n    local: {}\n    kubeconfig: {name}",
            c == 0
        );
    }
    std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
    let _ = writeln!(config, "resolvConf: resolv.conf");
    std::fs::write(dir.path().join("meshdns.yaml"), config).expect("config");

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshdns"))
        .args(["serve", "--config"])
        .arg(dir.path().join("meshdns.yaml"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshdns");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    let echo = std::env::var_os("BENCH_RUST_LOG").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("{line}");
            }
            if !line.contains("listening for DNS") {
                continue;
            }
            let addr = line.split("addr=").nth(1).and_then(|r| r.split_whitespace().next());
            if let Some(Ok(addr)) = addr.map(str::parse::<SocketAddr>) {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx.recv_timeout(WAIT_LIMIT).expect("meshdns listening");
    let sync = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_sync = rss_kib(pid);

    let mut latencies = Vec::new();
    for u in 0..UPDATES {
        let name = format!("bench-{u}");
        let qname = format!("{name}.ns-0.svc.cluster.local.");
        let t = Instant::now();
        servers[1].apply_service(service("ns-0", &name, &["10.200.0.1"]));
        loop {
            let reply = dns::ask(addr, dns::Proto::Udp, &qname, RecordType::A).await;
            if !reply.answers.is_empty() {
                break;
            }
            assert!(t.elapsed() < WAIT_LIMIT, "update never answered");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let rss_after = rss_kib(pid);
    let _ = child.kill();
    let _ = child.wait();

    println!("live_sync: {services} services x 3 clusters");
    println!("  start to loaded table and listening: {sync:?}");
    println!(
        "  RSS after sync:    {:.1} MiB (target < 48 MiB)",
        rss_sync as f64 / 1024.0
    );
    println!("  RSS after updates: {:.1} MiB", rss_after as f64 / 1024.0);
    println!(
        "  watch event to changed answer: median {:?}, max {:?} over {UPDATES} updates (target < 100 ms)",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}
