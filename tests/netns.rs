//! The sidecar deployment end to end, with a network namespace standing in for a pod: a veth
//! link inside it holds the "kube-dns" address, where a test upstream that knows only
//! `example.test` answers on port 53; `meshdns iptables` installs the capture as the init
//! container would; `meshdns serve` runs as UID 1337 on the seed's two clusters; and the
//! app's tools, as another UID, resolve through the redirect: `dig` (UDP, TCP, IPv4, IPv6),
//! `nslookup`, and glibc's `getent` with kubelet's search path and ndots.
//!
//! It needs root (CI runs as root) and skips with a message elsewhere. Every address it uses
//! exists only inside the namespace it creates; the namespace, its /etc/netns directory and
//! every process started in it are removed when the test ends, also when it fails.
//!
//! The test upstream is this test binary itself, started inside the namespace with
//! [`HELPER_ENV`] set so that its `upstream_helper` test serves DNS instead of returning.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshdns::config::{ClusterSource, Config, Overrides};

const BIN: &str = env!("CARGO_BIN_EXE_meshdns");
/// Set to a comma-separated list of socket addresses, makes `upstream_helper` serve DNS there.
const HELPER_ENV: &str = "MESHDNS_NETNS_UPSTREAM";
const KUBE_DNS: &str = "10.96.0.10";
const KUBE_DNS_V6: &str = "fd00:10:96::a";
const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;
/// The only name the test upstream knows, and its address (documentation range: it is only
/// ever data in an answer, never contacted).
const UPSTREAM_NAME: &str = "www.example.test.";
const UPSTREAM_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
/// From the seed's dumps: `helloworld` in cluster-1, `httpbin` only in cluster-2 behind its
/// east-west gateway.
const HELLOWORLD_IP: &str = "10.96.120.15";
const GATEWAY_IP: &str = "34.136.67.85";
const DUAL_V4: &str = "10.96.77.7";
const DUAL_V6: &str = "fd00:96::77:7";
const DUAL_STACK_SERVICE: &str = concat!(
    "---\napiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: sleep}\nspec:\n",
    "  clusterIP: 10.96.77.7\n  clusterIPs: [10.96.77.7, \"fd00:96::77:7\"]\n",
    "  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n",
    "  ports: [{name: http, port: 80, protocol: TCP}]\n",
);
/// How long the helper upstream lives at most, should the test die without killing it.
const HELPER_LIFETIME: Duration = Duration::from_secs(180);
const START_WAIT: Duration = Duration::from_secs(20);
/// Longest a client tool may run: glibc's worst case here is a few 5 s timeouts.
const CLIENT_WAIT: Duration = Duration::from_secs(30);

/// Serves the test upstream when started by [`pod_in_a_network_namespace`]; otherwise a no-op.
#[test]
fn upstream_helper() {
    let Ok(addrs) = std::env::var(HELPER_ENV) else {
        return;
    };
    let addrs: Vec<SocketAddr> = addrs.split(',').map(|a| a.parse().expect("helper address")).collect();
    for addr in addrs {
        let udp = UdpSocket::bind(addr).expect("bind helper udp");
        let tcp = TcpListener::bind(addr).expect("bind helper tcp");
        std::thread::spawn(move || serve_udp(&udp));
        std::thread::spawn(move || serve_tcp(&tcp));
    }
    println!("upstream ready");
    std::thread::sleep(HELPER_LIFETIME);
}

fn serve_udp(socket: &UdpSocket) {
    let mut buf = [0u8; 4096];
    while let Ok((len, peer)) = socket.recv_from(&mut buf) {
        if let Some(reply) = upstream_reply(&buf[..len], peer, "udp") {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

fn serve_tcp(listener: &TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        std::thread::spawn(move || {
            let mut len = [0u8; 2];
            while stream.read_exact(&mut len).is_ok() {
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut query).is_err() {
                    return;
                }
                let Some(reply) = upstream_reply(&query, peer, "tcp") else {
                    return;
                };
                let mut framed = u16::try_from(reply.len()).unwrap_or(0).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        });
    }
}

/// Answers `UPSTREAM_NAME` A, NODATA for its other types, NXDOMAIN for everything else, and
/// prints each query so the test can see what reached the upstream.
fn upstream_reply(query: &[u8], peer: SocketAddr, via: &str) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?;
    let name = question.name().to_ascii().to_ascii_lowercase();
    let qtype = question.query_type();
    println!("upstream query {name} {qtype} from {peer} via {via}");
    let _ = std::io::stdout().flush();
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.queries = request.queries.clone();
    let zone = Name::from_ascii("example.test.").ok()?;
    let soa = SOA::new(
        Name::from_ascii("ns.example.test.").ok()?,
        Name::from_ascii("hostmaster.example.test.").ok()?,
        1,
        3600,
        600,
        86400,
        30,
    );
    if name == UPSTREAM_NAME && qtype == RecordType::A {
        reply.add_answer(Record::from_rdata(
            question.name().clone(),
            60,
            RData::A(A(UPSTREAM_ADDR)),
        ));
    } else {
        if name != UPSTREAM_NAME {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply.add_authority(Record::from_rdata(zone, 30, RData::SOA(soa)));
    }
    reply.to_vec().ok()
}

/// Why the end-to-end test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Some("not running as root (network namespaces and iptables need it)".into());
    }
    None
}

/// Lines a child prints, collected by a reader thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn follow(&self, stream: impl Read + Send + 'static) -> JoinHandle<()> {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        })
    }

    fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn wait_for(&self, what: &str, child: &mut Child, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.snapshot().iter().any(|l| l.contains(what)) {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("exited ({status}) before {what:?}:\n{}", self.snapshot().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no {what:?} within {limit:?}:\n{}", self.snapshot().join("\n"));
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Runs a command to completion, killing it if it outlives `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let (out, err) = (Lines::default(), Lines::default());
    let readers = [
        out.follow(child.stdout.take().expect("piped stdout")),
        err.follow(child.stderr.take().expect("piped stderr")),
    ];
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The pipes close when the tool exits, unless something it started still holds them:
    // wait for the readers a little, not forever.
    let drained = Instant::now();
    while readers.iter().any(|r| !r.is_finished()) && drained.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    Output {
        status,
        stdout: out.snapshot().join("\n"),
        stderr: err.snapshot().join("\n"),
    }
}

fn checked(cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = run_bounded(cmd, CLIENT_WAIT);
    assert!(
        out.status.success(),
        "{shown}: {}\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// The namespace standing in for a pod; dropping it removes everything the test made.
struct Pod {
    name: String,
    etc: PathBuf,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Pod {
    /// Creates the namespace, or says why it cannot.
    fn create() -> Result<Self, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("meshdns-test-{}-{nanos}", std::process::id());
        let out = run_bounded(cmd("ip", &["netns", "add", &name]), CLIENT_WAIT);
        if !out.status.success() {
            return Err(format!("`ip netns add` failed: {}", out.stderr.trim()));
        }
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let pod = Self {
            etc: Path::new("/etc/netns").join(&name),
            name,
            dir,
            children: Vec::new(),
        };
        // Processes as UID 1337 read the config and run the binary from here.
        std::fs::set_permissions(pod.dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod tempdir: {e}"))?;
        Ok(pod)
    }

    /// A command run inside the namespace as root.
    fn exec(&self, program: &str, args: &[&str]) -> Command {
        let mut c = cmd("ip", &["netns", "exec", &self.name, program]);
        c.args(args).current_dir(self.dir.path()).env("HOME", self.dir.path());
        c
    }

    /// A command run inside the namespace as `uid` (same GID, no supplementary groups).
    fn exec_as(&self, uid: u32, program: &str, args: &[&str]) -> Command {
        let reuid = format!("--reuid={uid}");
        let regid = format!("--regid={uid}");
        let mut c = self.exec("setpriv", &[&reuid, &regid, "--clear-groups", program]);
        c.args(args);
        c
    }

    fn spawn(&mut self, mut cmd: Command) -> (usize, Lines, Lines) {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        let (out, err) = (Lines::default(), Lines::default());
        out.follow(child.stdout.take().expect("piped stdout"));
        err.follow(child.stderr.take().expect("piped stderr"));
        self.children.push(child);
        (self.children.len() - 1, out, err)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything else still in the namespace was started by this test (the namespace is
        // its own), e.g. a client a failed assertion left behind.
        if let Ok(out) = cmd("ip", &["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = cmd("kill", &["-9", pid]).status();
            }
        }
        let _ = cmd("ip", &["netns", "del", &self.name]).status();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn dig_short(pod: &Pod, server: &str, args: &[&str]) -> String {
    let at = format!("@{server}");
    let mut all = vec![at.as_str(), "+short", "+time=3", "+tries=1"];
    all.extend_from_slice(args);
    checked(pod.exec_as(APP_UID, "dig", &all)).stdout
}

fn count_rules(save: &str, prefix: &str) -> usize {
    save.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Packets counted by the first rule of `iptables-save -c` output that contains `rule`.
fn packets(save: &str, rule: &str) -> u64 {
    save.lines()
        .find(|l| l.contains(rule))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counted rule {rule:?} in:\n{save}"))
}

#[test]
fn pod_in_a_network_namespace() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED pod_in_a_network_namespace: {reason}");
        return;
    }
    let started = Instant::now();
    let mut pod = match Pod::create() {
        Ok(pod) => pod,
        Err(reason) => {
            eprintln!("SKIPPED pod_in_a_network_namespace: {reason}");
            return;
        }
    };

    // A veth pair with both ends inside: this kernel has no dummy links.
    let ns = pod.name.clone();
    for args in [
        vec!["-n", &ns, "link", "set", "lo", "up"],
        vec![
            "-n",
            &ns,
            "link",
            "add",
            "name",
            "veth-pod",
            "type",
            "veth",
            "peer",
            "name",
            "veth-peer",
        ],
        vec!["-n", &ns, "addr", "add", "10.96.0.10/24", "dev", "veth-pod"],
        vec![
            "-n",
            &ns,
            "-6",
            "addr",
            "add",
            "fd00:10:96::a/64",
            "dev",
            "veth-pod",
            "nodad",
        ],
        vec!["-n", &ns, "link", "set", "veth-pod", "up"],
        vec!["-n", &ns, "link", "set", "veth-peer", "up"],
    ] {
        checked(cmd("ip", &args));
    }
    std::fs::create_dir_all(&pod.etc).expect("mkdir /etc/netns/<name>");
    // What kubelet writes for a pod in namespace `sleep` with ClusterFirst DNS.
    std::fs::write(
        pod.etc.join("resolv.conf"),
        format!(
            "search sleep.svc.cluster.local svc.cluster.local cluster.local\nnameserver {KUBE_DNS}\noptions ndots:5\n"
        ),
    )
    .expect("write resolv.conf");

    // The binary is copied so UID 1337 can run it wherever the build tree lives.
    let dir = pod.dir.path().to_path_buf();
    let bin = dir.join("meshdns");
    std::fs::copy(BIN, &bin).expect("copy meshdns");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod meshdns");
    let bin = bin.to_str().expect("utf-8 temp path").to_string();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/demo");
    for dump in ["cluster-1.yaml", "cluster-2.yaml"] {
        std::fs::copy(demo.join(dump), dir.join(dump)).expect("copy dump");
    }
    // A dual-stack service in the pod's own namespace, as a second document of the stream.
    let mut local = std::fs::read_to_string(dir.join("cluster-1.yaml")).expect("read dump");
    local.push_str(DUAL_STACK_SERVICE);
    std::fs::write(dir.join("cluster-1.yaml"), local).expect("write dump");
    std::fs::write(
        dir.join("config.yaml"),
        "listen: [\"127.0.0.1:15053\", \"[::1]:15053\"]\n\
         clusters:\n  - name: cluster-1\n    local: true\n    objects: cluster-1.yaml\n\
         \x20 - name: cluster-2\n    objects: cluster-2.yaml\n",
    )
    .expect("write config");
    for file in ["config.yaml", "cluster-1.yaml", "cluster-2.yaml"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    // Without the capability, or without the iptables programs: exit 1 naming what is missing.
    let denied = run_bounded(pod.exec_as(APP_UID, &bin, &["iptables"]), CLIENT_WAIT);
    assert_eq!(denied.code(), 1, "{}", denied.stderr);
    assert!(denied.stderr.contains("CAP_NET_ADMIN"), "{}", denied.stderr);
    let no_path = run_bounded(pod.exec("env", &["PATH=/nonexistent", &bin, "iptables"]), CLIENT_WAIT);
    assert_eq!(no_path.code(), 1, "{}", no_path.stderr);
    assert!(no_path.stderr.contains("iptables-restore"), "{}", no_path.stderr);

    // The init container's job, twice: the second run must leave one copy of everything.
    checked(pod.exec(&bin, &["iptables"]));
    checked(pod.exec(&bin, &["iptables"]));
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = checked(pod.exec(save, &[])).stdout;
        assert_eq!(
            count_rules(&rules, "-A OUTPUT -j MESHDNS_OUTPUT"),
            1,
            "{save}:\n{rules}"
        );
        assert_eq!(
            count_rules(&rules, "-A OUTPUT -j MESHDNS_RAW_OUTPUT"),
            1,
            "{save}:\n{rules}"
        );
        assert_eq!(
            count_rules(&rules, "-A PREROUTING -j MESHDNS_RAW_PREROUTING"),
            1,
            "{save}:\n{rules}"
        );
        assert_eq!(count_rules(&rules, "-A MESHDNS_OUTPUT "), 4, "{save}:\n{rules}");
        assert_eq!(count_rules(&rules, "-A MESHDNS_RAW_OUTPUT "), 7, "{save}:\n{rules}");
    }

    let exe = std::env::current_exe().expect("test binary path");
    let exe = exe.to_str().expect("utf-8 test binary path").to_string();
    let mut helper = pod.exec(&exe, &["--exact", "upstream_helper", "--nocapture", "--test-threads=1"]);
    helper.env(HELPER_ENV, format!("{KUBE_DNS}:53,[{KUBE_DNS_V6}]:53"));
    let (helper_idx, upstream_log, helper_err) = pod.spawn(helper);
    upstream_log.wait_for("upstream ready", &mut pod.children[helper_idx], START_WAIT);

    let mut serve = pod.exec_as(PROXY_UID, &bin, &["serve", "--config", "config.yaml"]);
    serve.env("RUST_LOG", "meshdns=debug").env("NO_COLOR", "1");
    let (serve_idx, _, meshdns_log) = pod.spawn(serve);
    meshdns_log.wait_for("meshdns ready", &mut pod.children[serve_idx], START_WAIT);

    // dig straight at the kube-dns address, over UDP and TCP, IPv4 and IPv6: the redirect
    // takes each query to meshdns.
    let helloworld = "helloworld.helloworld.svc.cluster.local";
    let httpbin = "httpbin.sample.svc.cluster.local";
    for server in [KUBE_DNS, KUBE_DNS_V6] {
        for transport in ["+notcp", "+tcp"] {
            let ctx = format!("{server} {transport}");
            assert_eq!(
                dig_short(&pod, server, &[transport, helloworld]),
                HELLOWORLD_IP,
                "{ctx}"
            );
            assert_eq!(dig_short(&pod, server, &[transport, httpbin]), GATEWAY_IP, "{ctx}");
            assert_eq!(
                dig_short(&pod, server, &[transport, "www.example.test"]),
                UPSTREAM_ADDR.to_string(),
                "{ctx}"
            );
            let nx = checked(pod.exec_as(
                APP_UID,
                "dig",
                &[
                    &format!("@{server}"),
                    "+time=3",
                    "+tries=1",
                    transport,
                    "nothere.helloworld.svc.cluster.local",
                ],
            ));
            assert!(nx.stdout.contains("status: NXDOMAIN"), "{ctx}: {}", nx.stdout);
        }
    }
    // dig with the pod's search list: the first step is answered with a CNAME and the address.
    let searched = dig_short(&pod, KUBE_DNS, &["+search", "helloworld.helloworld"]);
    assert_eq!(searched.lines().last(), Some(HELLOWORLD_IP), "{searched}");

    // nslookup uses resolv.conf's nameserver and search list.
    let ns_lookup = |name: &str| {
        run_bounded(
            pod.exec_as(APP_UID, "nslookup", &["-timeout=3", "-retry=1", name]),
            CLIENT_WAIT,
        )
    };
    for (name, want) in [
        ("helloworld.helloworld", HELLOWORLD_IP),
        ("httpbin.sample", GATEWAY_IP),
        ("www.example.test", "192.0.2.80"),
    ] {
        let out = ns_lookup(name);
        assert!(
            out.status.success() && out.stdout.contains(&format!("Address: {want}")),
            "nslookup {name}: {}\n{}",
            out.stdout,
            out.stderr
        );
    }
    let out = ns_lookup("nothere.helloworld");
    assert!(
        !out.status.success() && out.stdout.contains("NXDOMAIN"),
        "nslookup nothere: {}",
        out.stdout
    );

    // glibc, with the search path and ndots:5 applied as in any pod.
    for (what, name, want) in [
        ("hosts", "helloworld.helloworld", HELLOWORLD_IP),
        ("ahosts", "helloworld.helloworld", HELLOWORLD_IP),
        ("hosts", "httpbin.sample", GATEWAY_IP),
        ("ahosts", "httpbin.sample", GATEWAY_IP),
        ("hosts", "www.example.test", "192.0.2.80"),
        ("ahosts", "www.example.test", "192.0.2.80"),
    ] {
        let out = checked(pod.exec_as(APP_UID, "getent", &[what, name]));
        assert!(
            out.stdout.lines().next().is_some_and(|l| l.starts_with(want)),
            "getent {what} {name}: {}",
            out.stdout
        );
    }
    // A dual-stack service: glibc asks A and AAAA and lists both families.
    let out = checked(pod.exec_as(APP_UID, "getent", &["ahosts", "dual"]));
    assert!(
        out.stdout.contains(DUAL_V4) && out.stdout.contains(DUAL_V6),
        "getent ahosts dual: {}",
        out.stdout
    );
    for what in ["hosts", "ahosts"] {
        let out = run_bounded(
            pod.exec_as(APP_UID, "getent", &[what, "nothere.helloworld"]),
            CLIENT_WAIT,
        );
        assert_eq!(out.code(), 2, "getent {what} nothere.helloworld: {}", out.stdout);
    }

    // The answers came through meshdns: it logged each name, and the upstream, which knows
    // nothing of cluster.local, never saw the table's names.
    let log = meshdns_log.snapshot();
    let logged = |name: &str, outcome: &str| {
        log.iter()
            .filter(|l| l.contains(&format!("name={name}")) && l.contains(outcome))
            .count()
    };
    assert!(logged(helloworld, "qtype=A") >= 4, "{}", log.join("\n"));
    assert!(logged(httpbin, "qtype=A") >= 4, "{}", log.join("\n"));
    // Relayed from the upstream, or repeated from the response cache.
    assert!(
        logged("www.example.test", "outcome=\"forwarded\"") + logged("www.example.test", "outcome=\"cache_hit\"") >= 4,
        "{}",
        log.join("\n")
    );
    assert!(
        logged("nothere.helloworld.svc.cluster.local", "qtype=A") >= 4,
        "{}",
        log.join("\n")
    );
    let seen = upstream_log.snapshot();
    let reached = |name: &str| {
        let prefix = format!("upstream query {name} ");
        upstream_log
            .snapshot()
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .count()
    };
    assert_eq!(
        reached("helloworld.helloworld.svc.cluster.local."),
        0,
        "{}",
        seen.join("\n")
    );
    assert_eq!(reached("httpbin.sample.svc.cluster.local."), 0, "{}", seen.join("\n"));

    // No loop: the proxy's forwarded queries reached the upstream (a looped query would come
    // back to meshdns, never reach it, and end in SERVFAIL), passing the UID exclusion and
    // the zone rules on the way; the app's went through the redirect.
    // (Once: the repeats are answered from meshdns's cache.)
    assert!(reached(UPSTREAM_NAME) >= 1, "{}", seen.join("\n"));
    let counted = checked(pod.exec("iptables-save", &["-c"])).stdout;
    assert!(
        packets(&counted, "-A MESHDNS_OUTPUT -m owner --uid-owner 1337 -j RETURN") > 0,
        "{counted}"
    );
    assert!(
        packets(&counted, "-A MESHDNS_OUTPUT -p udp -m udp --dport 53 -j REDIRECT") > 0,
        "{counted}"
    );
    assert!(
        packets(&counted, "-A MESHDNS_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT") > 0,
        "{counted}"
    );
    assert!(
        packets(&counted, "--dport 53 -m owner --uid-owner 1337 -j CT --zone 1") > 0,
        "{counted}"
    );
    assert!(
        packets(&counted, "--sport 15053 -m owner --uid-owner 1337 -j CT --zone 2") > 0,
        "{counted}"
    );
    assert!(
        packets(
            &counted,
            "-A MESHDNS_RAW_OUTPUT -p udp -m udp --dport 53 -j CT --zone 2"
        ) > 0,
        "{counted}"
    );
    // The proxy's UID is not captured: as 1337, the same query goes to the upstream itself.
    let direct = checked(pod.exec_as(
        PROXY_UID,
        "dig",
        &[&format!("@{KUBE_DNS}"), "+time=3", "+tries=1", helloworld],
    ));
    assert!(direct.stdout.contains("status: NXDOMAIN"), "{}", direct.stdout);
    assert_eq!(
        reached("helloworld.helloworld.svc.cluster.local."),
        1,
        "{}",
        upstream_log.snapshot().join("\n")
    );

    // --cleanup removes the capture: the app's queries now reach the upstream unchanged.
    checked(pod.exec(&bin, &["iptables", "--cleanup"]));
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = checked(pod.exec(save, &[])).stdout;
        assert!(!rules.contains("MESHDNS"), "{save} after cleanup:\n{rules}");
    }
    let after = checked(pod.exec_as(
        APP_UID,
        "dig",
        &[&format!("@{KUBE_DNS}"), "+time=3", "+tries=1", helloworld],
    ));
    assert!(after.stdout.contains("status: NXDOMAIN"), "{}", after.stdout);

    assert!(
        helper_err.snapshot().iter().all(|l| !l.contains("panicked")),
        "{}",
        helper_err.snapshot().join("\n")
    );
    eprintln!("pod_in_a_network_namespace took {:?}", started.elapsed());
}

/// `--dry-run` prints the rules for both families and needs no privilege, so it runs anywhere.
#[test]
fn dry_run_prints_rules_without_privilege() {
    let dir = tempfile::tempdir().expect("tempdir");
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {KUBE_DNS}\nnameserver {KUBE_DNS_V6}\n")).expect("write");
    let out = Command::new(BIN)
        .args([
            "iptables",
            "--dry-run",
            "--capture",
            "nameservers",
            "--proxy-port",
            "5300",
        ])
        .arg("--resolv-conf")
        .arg(&resolv)
        .output()
        .expect("run meshdns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "-A MESHDNS_OUTPUT -d {KUBE_DNS}/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 5300"
        )),
        "{stdout}"
    );
    if Path::new("/proc/net/if_inet6").exists() {
        assert!(
            stdout.contains(&format!("-d {KUBE_DNS_V6}/128 -p tcp -m tcp --dport 53 -j REDIRECT")),
            "{stdout}"
        );
    }

    let out = Command::new(BIN)
        .args([
            "iptables",
            "--dry-run",
            "--capture",
            "nameservers",
            "--resolv-conf",
            "/nonexistent/resolv.conf",
        ])
        .output()
        .expect("run meshdns");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/resolv.conf"));
}

/// The meshdns configs that manifests/ ships load in this build: the local cluster is watched
/// through the pod's ServiceAccount and remotes come from the mounted remote secret.
#[test]
fn manifest_configs_load() {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    for (file, local) in [
        ("base/config.yaml", "my-cluster"),
        ("examples/two-clusters/cluster-1/sleep/config.yaml", "cluster-1"),
    ] {
        // The sidecar's arguments, as kubelet expands them.
        let overrides = Overrides {
            listen: vec![
                "127.0.0.1:15053".into(),
                "[::1]:15053".into(),
                "10.244.1.7:15053".into(),
            ],
            ..Overrides::default()
        };
        let config = Config::load(&manifests.join(file), &overrides).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(config.local_cluster(), local, "{file}");
        assert_eq!(config.clusters.len(), 1, "{file}");
        assert_eq!(config.clusters[0].source, ClusterSource::InCluster, "{file}");
        assert_eq!(
            config.remote_secrets_dir.as_deref(),
            Some(Path::new("/var/run/secrets/meshdns/remotes")),
            "{file}"
        );
    }
}
