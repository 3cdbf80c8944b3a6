//! The built binary, driven the way an operator drives it: exit codes and messages for bad
//! configs, and `dig` against `meshdns demo`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::process::{BIN, Meshdns};
use support::upstream::{Behavior, FakeUpstream};

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().expect("run meshdns");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_exit_2_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("c1.yaml");
    std::fs::write(&dump, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown key",
            "clusters: [{name: c1, local: true, objects: c1.yaml}]\nlistne: []\n",
            "listne",
        ),
        (
            "no local cluster",
            "clusters: [{name: c1, objects: c1.yaml}]\n",
            "local: true",
        ),
        (
            "two local clusters",
            "clusters: [{name: c1, local: true, objects: c1.yaml}, {name: c2, local: true, objects: c1.yaml}]\n",
            "local: true",
        ),
        (
            "missing dump",
            "clusters: [{name: c1, local: true, objects: missing.yaml}]\n",
            "missing.yaml",
        ),
        (
            "broken dump",
            "clusters: [{name: c1, local: true, objects: broken.yaml}]\n",
            "broken.yaml",
        ),
    ];
    std::fs::write(
        dir.path().join("broken.yaml"),
        "kind: List\nitems: [{kind: Service, metadata: {name: x}, spec: {clusterIP: not-an-ip}}]\n",
    )
    .unwrap();
    for (name, yaml, want) in cases {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        // Port 1 on loopback would need root to bind; the error must come before any bind.
        let (code, stderr) = run(&[
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--upstream",
            "127.0.0.1:5300",
        ]);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr:?} lacks {want:?}");
        assert!(!stderr.contains("listening"), "{name}: bound before failing: {stderr}");
    }
    let (code, stderr) = run(&["serve", "--config", "/nonexistent/meshdns.yaml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/meshdns.yaml"), "{stderr}");
}

#[test]
fn a_taken_port_exits_1() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run(&[
        "demo",
        "--listen",
        &addr,
        "--upstream",
        "127.0.0.1:5300",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
}

fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_against_the_demo() {
    if !Path::new("/usr/bin/dig").exists() {
        // CI installs bind9-dnsutils; a developer machine without dig should say so, loudly.
        panic!("dig is not installed: apt-get install bind9-dnsutils (the CI script does)");
    }
    let upstream = FakeUpstream::start(
        vec![("www.example.test", "192.0.2.10".parse().unwrap())],
        Behavior::Normal,
    )
    .await;
    let demo = Meshdns::start(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream.addr.to_string(),
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = demo.dns_addr();
    let started = Instant::now();

    let cases: &[(&[&str], &str)] = &[
        (&["+short", "helloworld.helloworld.svc.cluster.local"], "10.96.120.15\n"),
        (
            &["+short", "+tcp", "helloworld.helloworld.svc.cluster.local"],
            "10.96.120.15\n",
        ),
        (&["+short", "httpbin.sample.svc.cluster.local"], "34.136.67.85\n"),
        (&["+short", "www.example.test"], "192.0.2.10\n"),
        (&["+short", "AAAA", "helloworld.helloworld.svc.cluster.local"], ""),
        (
            &["+short", "SRV", "_http._tcp.helloworld.helloworld.svc.cluster.local"],
            "0 100 5000 helloworld.helloworld.svc.cluster.local.\n",
        ),
        (
            &["+short", "-x", "10.96.120.15"],
            "helloworld.helloworld.svc.cluster.local.\n",
        ),
        (&["+short", "TXT", "dns-version.cluster.local"], "\"1.1.0\"\n"),
    ];
    for (args, want) in cases {
        let got = tokio::task::block_in_place(|| dig(addr, args));
        assert_eq!(&got, want, "dig {args:?}");
    }
    let full = tokio::task::block_in_place(|| dig(addr, &["nothere.helloworld.svc.cluster.local"]));
    assert!(full.contains("status: NXDOMAIN"), "{full}");
    assert!(full.contains("flags: qr aa rd ra"), "{full}");
    assert!(full.contains("SOA"), "{full}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Runs `script` (with `$BIN` set) in a network namespace of its own, as root; `None` where
/// that cannot be done (not root, no `unshare`).
fn in_own_netns(script: &str, wait_for: &str, limit: Duration) -> Option<(Vec<String>, bool)> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        eprintln!("skipping: network namespaces need root");
        return None;
    }
    let mut child = Command::new("unshare")
        .args(["--net", "sh", "-c", script])
        .env("BIN", BIN)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let stderr = child.stderr.take()?;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    let started = Instant::now();
    let mut exited = false;
    while started.elapsed() < limit {
        if lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(wait_for))
        {
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let lines = lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Some((lines, exited))
}

#[test]
fn a_node_without_ipv6_still_serves_on_its_ipv4_listen_address() {
    // IPv6 off on the namespace's loopback: `[::1]` is not there, as on a node booted with
    // ipv6.disable or net.ipv6.conf.all.disable_ipv6=1.
    let script = r#"ip link set lo up && { echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 || true; } &&
        ulimit -S -n 512 &&
        exec "$BIN" demo --listen 127.0.0.1:0 --listen '[::1]:0' --upstream 127.0.0.1:9 --admin ''"#;
    let Some((lines, exited)) = in_own_netns(script, "listening for DNS", Duration::from_secs(20)) else {
        return;
    };
    let log = lines.join("\n");
    assert!(!exited, "meshdns exited: {log}");
    assert!(log.contains("IPv6 is not available here"), "{log}");
    assert!(log.contains("listening for DNS") && log.contains("127.0.0.1"), "{log}");
    // The soft open-file limit is raised to the hard one at start, and said so.
    assert!(
        log.contains("raised the open-file limit") && log.contains("from=512"),
        "{log}"
    );

    // Any other bind failure still ends start-up: an address this namespace does not have.
    let script = r#"ip link set lo up && exec "$BIN" demo --listen 127.0.0.1:0 --listen 192.0.2.1:0 --upstream 127.0.0.1:9 --admin ''"#;
    let Some((lines, exited)) = in_own_netns(script, "listening for DNS", Duration::from_secs(20)) else {
        return;
    };
    let log = lines.join("\n");
    assert!(exited, "a listen address that is not there must end start-up: {log}");
    assert!(log.contains("192.0.2.1"), "{log}");
}

#[test]
fn an_absurd_duration_is_a_config_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c1.yaml"), "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let config = dir.path().join("meshdns.yaml");
    std::fs::write(
        &config,
        "tcpIdleTimeout: 18446744073709551615s\nclusters: [{name: c1, local: true, objects: c1.yaml}]\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for command in ["check", "serve"] {
        let (code, stderr) = run(&[command, "--config", config]);
        assert_eq!(code, 2, "{command}: {stderr}");
        assert!(
            stderr.contains("tcpIdleTimeout") && stderr.contains("outside"),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
    }
}
