//! Broken input files that must be survived (issue #8): object dumps rewritten with something
//! that is not a dump, and kubeconfigs (remote-secret entries and configured ones) that are
//! not usable or not trusted. Each must give an error that names the file or cluster and the
//! problem, keep what was served before, and leave every other cluster answering.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use support::apiserver::{FakeApiServer, gateway_service, service};
use support::dns::{BOTH, Proto, answers, ask};
use support::process::{BIN, Meshdns};
use support::proxy::{Dump, Proxy, Spec, Src, write_config};
use support::upstream::closed_port_addr;

/// Notify fires within the 100 ms debounce; the 5 s stat poll is the fallback.
const RELOAD_WAIT: Duration = Duration::from_secs(8);
/// Larger than both caps (32 MiB for dumps, 1 MiB for kubeconfigs); written sparse.
const HUGE: u64 = 50 * 1024 * 1024;
const GW: &[(&str, &str)] = &[("istio", "eastwestgateway"), ("app", "istio-eastwestgateway")];

/// What goes into a file: text, raw bytes, or a sparse file of this many zero bytes.
enum Content {
    Text(String),
    Bytes(Vec<u8>),
    Sparse(u64),
}

impl Content {
    fn write(&self, path: &Path) {
        match self {
            Content::Text(text) => std::fs::write(path, text).expect("write file"),
            Content::Bytes(bytes) => std::fs::write(path, bytes).expect("write file"),
            Content::Sparse(len) => {
                let file = std::fs::File::create(path).expect("create file");
                // A hole, not 50 MB of writes: the test must not need the disk space.
                file.set_len(*len).expect("extend file");
            }
        }
    }
}

/// Deterministic bytes that are not UTF-8 (xorshift, with 0xff sprinkled in).
fn binary_garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 7 == 0 { 0xff } else { x.to_le_bytes()[0] }
        })
        .collect()
}

/// Valid UTF-8 that is still binary: control characters and NULs.
fn control_characters() -> Vec<u8> {
    (0u8..32).cycle().take(300).collect()
}

// ---------------------------------------------------------------------------------------
// Object dumps
// ---------------------------------------------------------------------------------------

/// cluster-2's dump the way `kubectl get services -A -o yaml` writes it: keys sorted, so the
/// List's `kind` comes after its `items`.
fn kubectl_dump() -> String {
    let mut out = String::from("apiVersion: v1\nitems:\n");
    for (name, ip) in [
        ("httpbin", "10.112.30.2"),
        ("late", "10.112.30.9"),
        ("web", "10.112.30.3"),
    ] {
        out.push_str(&format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {name}\n    namespace: sample\n    resourceVersion: \"1001\"\n  spec:\n    clusterIP: {ip}\n    clusterIPs:\n    - {ip}\n    ports:\n    - name: http\n      port: 8000\n      protocol: TCP\n    type: ClusterIP\n  status:\n    loadBalancer: {{}}\n"
        ));
    }
    out.push_str(
        "- apiVersion: v1\n  kind: Service\n  metadata:\n    labels:\n      istio: eastwestgateway\n    name: istio-eastwestgateway\n    namespace: istio-system\n  spec:\n    clusterIP: 10.112.9.7\n    ports:\n    - name: tls\n      port: 15443\n    type: LoadBalancer\n  status:\n    loadBalancer:\n      ingress:\n      - ip: 34.136.67.85\n",
    );
    out.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    out
}

struct DumpCase {
    name: &'static str,
    content: Content,
    /// The error names the file and contains one of these.
    want_error: &'static [&'static str],
}

fn dump_cases() -> Vec<DumpCase> {
    let good = kubectl_dump();
    let half = good.len() / 2;
    let line_end = good[..half].rfind('\n').expect("a line before the middle") + 1;
    let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"httpbin","namespace":"sample"},"spec":{"clusterIP":"10.112.30.2"}}]}"#;
    vec![
        DumpCase {
            name: "truncated at a line break",
            content: Content::Text(good[..line_end].to_string()),
            // kubectl writes the List's kind last: a dump cut anywhere in its items lacks it.
            want_error: &["document 1: kind: missing"],
        },
        DumpCase {
            name: "truncated mid-line",
            content: Content::Text(good[..half].to_string()),
            want_error: &["document 1: kind: missing", "not valid YAML"],
        },
        DumpCase {
            name: "truncated to nothing (a shell `>` before its writer ran)",
            content: Content::Text(String::new()),
            want_error: &["empty"],
        },
        DumpCase {
            name: "JSON cut short",
            content: Content::Text(json[..json.len() - 20].to_string()),
            want_error: &["not valid JSON"],
        },
        DumpCase {
            name: "a ConfigMap list",
            content: Content::Text(
                "apiVersion: v1\nitems:\n- apiVersion: v1\n  data:\n    config.yaml: |\n      listen: []\n  kind: ConfigMap\n  metadata:\n    name: meshdns\n    namespace: sleep\nkind: List\nmetadata:\n  resourceVersion: \"\"\n"
                    .into(),
            ),
            want_error: &["no Service or EndpointSlice", "ConfigMap"],
        },
        DumpCase {
            name: "a Deployment",
            content: Content::Text(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: sleep\n  namespace: sleep\nspec:\n  replicas: 1\n  template:\n    spec:\n      containers:\n      - image: curl\n        name: sleep\n"
                    .into(),
            ),
            want_error: &["no Service or EndpointSlice", "Deployment"],
        },
        DumpCase {
            name: "50 MB",
            content: Content::Sparse(HUGE),
            want_error: &["larger than 33554432 bytes"],
        },
        DumpCase {
            name: "binary garbage",
            content: Content::Bytes(binary_garbage(4096)),
            want_error: &["not UTF-8"],
        },
        DumpCase {
            name: "control characters",
            content: Content::Bytes(control_characters()),
            want_error: &["not valid YAML"],
        },
        DumpCase {
            name: "Latin-1 text",
            content: Content::Bytes(
                good.replace("name: web", "name: caf\u{e9}")
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).expect("Latin-1"))
                    .collect(),
            ),
            want_error: &["not UTF-8 text: invalid byte at offset"],
        },
    ]
}

fn has_any(text: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| text.contains(n))
}

/// The local cluster and cluster-2 from a kubectl-style dump; nothing is forwarded.
async fn dump_proxy() -> Proxy {
    let specs = [
        Spec {
            name: "cluster-1",
            local: true,
            src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
        },
        Spec {
            name: "cluster-2",
            local: false,
            src: Src::Dump(Dump::raw(&kubectl_dump())),
        },
    ];
    Proxy::start_specs(&specs, &[closed_port_addr()], "").await
}

fn cluster_status(proxy: &Proxy, name: &str) -> meshdns::hub::ClusterStatus {
    proxy
        .app
        .hub()
        .status()
        .into_iter()
        .find(|s| s.name == name)
        .expect("cluster is known")
}

async fn assert_served(proxy: &Proxy, during: &str) {
    for proto in BOTH {
        for (name, want) in [
            ("httpbin.sample.svc.cluster.local.", "A 34.136.67.85"),
            ("late.sample.svc.cluster.local.", "A 34.136.67.85"),
            ("sleep.sleep.svc.cluster.local.", "A 10.96.88.40"),
        ] {
            let reply = ask(proxy.addr, proto, name, RecordType::A).await;
            assert_eq!(
                (reply.metadata.response_code, answers(&reply)),
                (ResponseCode::NoError, vec![want.to_string()]),
                "{name} over {proto:?} {during}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_dump_is_refused_and_the_last_good_state_kept() {
    let started = Instant::now();
    let proxy = dump_proxy().await;
    let path = proxy.dump_path("cluster-2");
    assert_served(&proxy, "at start").await;
    let mut failures = Vec::new();
    for case in dump_cases() {
        let case_started = Instant::now();
        let errors_before = cluster_status(&proxy, "cluster-2").errors;
        case.content.write(&path);
        let waited = Instant::now();
        let status = loop {
            let status = cluster_status(&proxy, "cluster-2");
            if status.errors > errors_before || waited.elapsed() > RELOAD_WAIT {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let error = status.last_error.clone().unwrap_or_default();
        if status.errors == errors_before {
            failures.push(format!(
                "{}: no error reported, the file was taken: {status:?}",
                case.name
            ));
        } else if !error.contains("cluster-2.yaml") || !has_any(&error, case.want_error) {
            failures.push(format!(
                "{}: error {error:?} lacks the file or {:?}",
                case.name, case.want_error
            ));
        }
        if !status.stale {
            failures.push(format!("{}: not marked stale", case.name));
        }
        assert_served(&proxy, &format!("after {}", case.name)).await;

        // Back to the good file, so the next case is a change of its own.
        std::fs::write(&path, kubectl_dump()).expect("restore the dump");
        let waited = Instant::now();
        while cluster_status(&proxy, "cluster-2").last_error.is_some() {
            assert!(
                waited.elapsed() < RELOAD_WAIT,
                "{}: the good file never cleared the error",
                case.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("{}: {:?} ({error})", case.name, case_started.elapsed());
    }
    assert_served(&proxy, "at the end").await;
    eprintln!("broken dumps: {:?}", started.elapsed());
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

/// A dump rewritten in place the way `kubectl get ... > dump.yaml` and `std::fs::write` do it:
/// truncated, left empty for a while, then written in two parts with a pause between. meshdns
/// must read it once, complete: no error reported, no false "empty" or "does not parse", and
/// the new service answered. (Read half-written, the last good state stood, but a false error
/// was logged and counted, and `a_broken_dump_is_refused_and_the_last_good_state_kept` failed
/// now and then with the wrong error.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_written_in_place_is_read_once_it_is_complete() {
    use std::io::Write as _;
    let proxy = dump_proxy().await;
    let path = proxy.dump_path("cluster-2");
    assert_served(&proxy, "at start").await;
    let errors_before = cluster_status(&proxy, "cluster-2").errors;
    let text = kubectl_dump().replace("name: late", "name: later");
    assert_ne!(text, kubectl_dump(), "the rewrite renames a service");
    let (first, second) = text.split_at(text.len() / 2);
    {
        let mut file = std::fs::File::create(&path).expect("truncate the dump");
        // kubectl has truncated the file and is still waiting for the API server.
        tokio::time::sleep(Duration::from_millis(400)).await;
        file.write_all(first.as_bytes()).expect("write the first half");
        file.flush().expect("flush");
        tokio::time::sleep(Duration::from_millis(120)).await;
        file.write_all(second.as_bytes()).expect("write the second half");
    }
    let waited = Instant::now();
    loop {
        let reply = ask(proxy.addr, Proto::Udp, "later.sample.svc.cluster.local.", RecordType::A).await;
        if reply.metadata.response_code == ResponseCode::NoError && !reply.answers.is_empty() {
            break;
        }
        assert!(waited.elapsed() < RELOAD_WAIT, "the rewritten dump was never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = cluster_status(&proxy, "cluster-2");
    assert_eq!(
        status.errors, errors_before,
        "a dump being written was read before it was complete: {:?}",
        status.last_error
    );
    assert!(status.last_error.is_none() && !status.stale, "{status:?}");
}

/// `meshdns check` exits 2 for each broken dump, naming the cluster, the file and the problem;
/// `serve` refuses to start on one the same way.
#[test]
fn check_and_serve_refuse_a_broken_dump() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = [
        Spec {
            name: "cluster-1",
            local: true,
            src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
        },
        Spec {
            name: "cluster-2",
            local: false,
            src: Src::Dump(Dump::raw(&kubectl_dump())),
        },
    ];
    let config = write_config(dir.path(), &specs, &[closed_port_addr()], "");
    let config = config.to_str().expect("UTF-8 path");
    let dump = dir.path().join("cluster-2.yaml");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run meshdns");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_eq!(run(&["check", "--config", config]).0, Some(0), "the good dumps pass");
    let mut failures = Vec::new();
    for case in dump_cases() {
        case.content.write(&dump);
        let (code, stderr) = run(&["check", "--config", config]);
        if code != Some(2) || !stderr.contains("cluster-2") || !stderr.contains("cluster-2.yaml") {
            failures.push(format!("check, {}: exit {code:?}, stderr {stderr:?}", case.name));
        } else if !has_any(&stderr, case.want_error) {
            failures.push(format!("check, {}: {stderr:?} lacks {:?}", case.name, case.want_error));
        }
    }
    // Start-up with a broken dump: exit 2 before binding anything. Bounded: were the dump
    // taken, meshdns would serve until killed.
    for case in dump_cases()
        .iter()
        .filter(|c| c.name == "a ConfigMap list" || c.name == "50 MB")
    {
        case.content.write(&dump);
        let mut serve = Meshdns::spawn(&["serve", "--config", config, "--listen", "127.0.0.1:0"], "info");
        let status = serve.wait_exit(Duration::from_secs(10));
        let log = serve.log().join("\n");
        if status.code() != Some(2) || !log.contains("cluster-2.yaml") || !has_any(&log, case.want_error) {
            failures.push(format!("serve, {}: {status}, log {log:?}", case.name));
        }
    }
    std::fs::remove_file(&dump).expect("remove the dump");
    eprintln!("check and serve on broken dumps: {:?}", started.elapsed());
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Kubeconfigs
// ---------------------------------------------------------------------------------------

struct KubeconfigCase {
    /// The remote-secret key: the cluster's name.
    name: &'static str,
    content: Content,
    /// The refusal names the cluster and contains one of these.
    want_error: &'static [&'static str],
    /// Also refused when the operator configures it (`clusters[].kubeconfig`); the untrusted
    /// rules (exec, auth providers, file paths, TLS verification off, proxies, link-local or
    /// unspecified servers) apply to remote secrets only.
    bad_when_trusted: bool,
}

/// Broken and untrusted variants of a kubeconfig for `api`, each under its own cluster name:
/// were one accepted, `api`'s services would appear in the answers.
fn kubeconfig_cases(api: &FakeApiServer) -> Vec<KubeconfigCase> {
    let good = |name: &str| api.kubeconfig_yaml(name);
    let with_user = |name: &str, field: &str| good(name).replace("    token:", &format!("    {field}\n    token:"));
    let truncated = {
        let text = good("truncated");
        text[..text.find("contexts:").expect("contexts")].to_string()
    };
    let latin1: Vec<u8> = good("not-utf8")
        .replace("-user", "-us\u{e9}r")
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("Latin-1"))
        .collect();
    let case = |name, content, want_error, bad_when_trusted| KubeconfigCase {
        name,
        content,
        want_error,
        bad_when_trusted,
    };
    vec![
        case(
            "truncated",
            Content::Text(truncated),
            &["cannot build a client", "not a valid kubeconfig"][..],
            true,
        ),
        case("binary", Content::Bytes(binary_garbage(2048)), &["UTF-8"], true),
        case("control-chars", Content::Bytes(control_characters()), &["not a valid kubeconfig"], true),
        case("not-utf8", Content::Bytes(latin1), &["UTF-8"], true),
        case(
            "configmap-list",
            Content::Text(
                "apiVersion: v1\nitems:\n- apiVersion: v1\n  data:\n    server: http://127.0.0.1:1\n  kind: ConfigMap\n  metadata:\n    name: c\nkind: List\n".into(),
            ),
            &["no cluster with a server address"],
            true,
        ),
        case(
            "deployment",
            Content::Text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: sleep\nspec:\n  replicas: 1\n".into()),
            &["no cluster with a server address"],
            true,
        ),
        case("huge", Content::Sparse(HUGE), &["larger than 1048576 bytes"], true),
        case(
            "exec",
            Content::Text(with_user(
                "exec",
                "exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh",
            )),
            &["user.exec is not allowed"],
            false,
        ),
        case(
            "auth-provider",
            Content::Text(with_user("auth-provider", "auth-provider:\n      name: gcp")),
            &["user.auth-provider is not allowed"],
            false,
        ),
        case(
            "token-file",
            Content::Text(with_user("token-file", "tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token")),
            &["user.tokenFile is not allowed"],
            false,
        ),
        case(
            "client-cert",
            Content::Text(with_user("client-cert", "client-certificate: /etc/ssl/certs/client.pem")),
            &["user.client-certificate is not allowed"],
            false,
        ),
        case(
            "client-key",
            Content::Text(with_user("client-key", "client-key: /etc/ssl/private/client.key")),
            &["user.client-key is not allowed"],
            false,
        ),
        case(
            "ca-file",
            Content::Text(good("ca-file").replace(
                "    server:",
                "    certificate-authority: /etc/ssl/certs/ca.pem\n    server:",
            )),
            &["cluster.certificate-authority is not allowed"],
            false,
        ),
        case(
            "insecure-tls",
            Content::Text(good("insecure-tls").replace(
                "    server:",
                "    insecure-skip-tls-verify: true\n    server:",
            )),
            &["cluster.insecure-skip-tls-verify is not allowed"],
            false,
        ),
        case(
            "proxy-url",
            Content::Text(good("proxy-url").replace("    server:", "    proxy-url: http://127.0.0.1:3128\n    server:")),
            &["cluster.proxy-url is not allowed"],
            false,
        ),
        // The cloud metadata address, and the same address as the system resolver reads it.
        case(
            "metadata-server",
            Content::Text(good("metadata-server").replace(&api.url(), "http://169.254.169.254")),
            &["cluster.server is not allowed"],
            false,
        ),
        case(
            "metadata-decimal",
            Content::Text(good("metadata-decimal").replace(&api.url(), "https://2852039166:443")),
            &["cluster.server is not allowed"],
            false,
        ),
        case(
            "unspecified-server",
            Content::Text(good("unspecified-server").replace(&api.url(), "https://[::]:6443")),
            &["cluster.server is not allowed"],
            false,
        ),
    ]
}

/// Whether a log line is about cluster `name` (its `cluster=` field, wherever it is).
fn about(line: &str, name: &str) -> bool {
    let field = format!("cluster={name}");
    line.split_whitespace().any(|word| word == field)
}

fn warns(line: &str) -> bool {
    line.contains(" WARN ") || line.contains(" ERROR ")
}

/// Waits (bounded) until a warning or error names cluster `name` and one of `needles`.
fn refusal(proc: &Meshdns, name: &str, needles: &[&str]) -> Option<String> {
    let started = Instant::now();
    loop {
        if let Some(line) = proc
            .log()
            .into_iter()
            .find(|l| about(l, name) && warns(l) && has_any(l, needles))
        {
            return Some(line);
        }
        if started.elapsed() > RELOAD_WAIT {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn answer(addr: std::net::SocketAddr, name: &str) -> (ResponseCode, Vec<String>) {
    let reply = ask(addr, Proto::Udp, name, RecordType::A).await;
    (reply.metadata.response_code, answers(&reply))
}

/// Polls (bounded) until `name` answers `want`.
async fn wait_answer(addr: std::net::SocketAddr, name: &str, want: (ResponseCode, Vec<String>)) {
    let started = Instant::now();
    loop {
        let got = answer(addr, name).await;
        if got == want {
            return;
        }
        assert!(started.elapsed() < RELOAD_WAIT, "{name}: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every broken or untrusted remote-secret entry is refused with an error naming its cluster,
/// while the good entry's cluster and the local one keep answering; an entry that turns bad
/// takes its cluster out (and only it), and comes back when fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_untrusted_remote_secrets_are_refused() {
    let started = Instant::now();
    let good_api = FakeApiServer::start().await;
    good_api.apply_service(service("sample", "httpbin", &["10.112.30.2"]));
    good_api.apply_service(gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        GW,
        &["34.136.67.85"],
    ));
    // What every bad entry points at: its names must never show up.
    let bad_api = FakeApiServer::start().await;
    bad_api.apply_service(service("sample", "leak", &["10.113.0.1"]));
    bad_api.apply_service(gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        GW,
        &["35.1.1.1"],
    ));

    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("remote-secrets");
    std::fs::create_dir(&secrets).expect("secrets dir");
    std::fs::write(secrets.join("cluster-2"), good_api.kubeconfig_yaml("cluster-2")).expect("write");
    let cases = kubeconfig_cases(&bad_api);
    for case in &cases {
        case.content.write(&secrets.join(case.name));
    }
    let specs = [Spec {
        name: "cluster-1",
        local: true,
        src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
    }];
    let config = write_config(
        dir.path(),
        &specs,
        &[closed_port_addr()],
        "remoteSecretsDir: remote-secrets\nstartupWait: 5s\n",
    );
    let proc = tokio::task::block_in_place(|| {
        Meshdns::start(&[
            "serve",
            "--config",
            config.to_str().expect("path"),
            "--listen",
            "127.0.0.1:0",
        ])
    });
    let addr = proc.dns_addr();

    let mut failures = Vec::new();
    for case in &cases {
        match tokio::task::block_in_place(|| refusal(&proc, case.name, case.want_error)) {
            Some(line) => eprintln!("{}: {line}", case.name),
            None => failures.push(format!("{}: no refusal naming it and {:?}", case.name, case.want_error)),
        }
    }
    let gw = (ResponseCode::NoError, vec!["A 34.136.67.85".to_string()]);
    let local = (ResponseCode::NoError, vec!["A 10.96.88.40".to_string()]);
    let nx = (ResponseCode::NXDomain, vec![]);
    wait_answer(addr, "httpbin.sample.svc.cluster.local.", gw.clone()).await;
    assert_eq!(answer(addr, "sleep.sleep.svc.cluster.local.").await, local);
    assert_eq!(
        answer(addr, "leak.sample.svc.cluster.local.").await,
        nx,
        "no refused entry was loaded"
    );
    assert!(
        proc.log()
            .iter()
            .all(|l| !l.contains("remote cluster added") || about(l, "cluster-2")),
        "only cluster-2 was added"
    );

    // cluster-2's entry turns bad (cut short, then not UTF-8): it is refused and goes out; the
    // local cluster keeps answering; the good entry brings it back.
    let turned_bad = [
        ("cut short", {
            let text = good_api.kubeconfig_yaml("cluster-2");
            Content::Text(text[..text.find("contexts:").expect("contexts")].to_string())
        }),
        ("not UTF-8", Content::Bytes(binary_garbage(512))),
    ];
    for (what, content) in turned_bad {
        let lines_before = proc.log().len();
        content.write(&secrets.join("cluster-2"));
        let seen = tokio::task::block_in_place(|| {
            let started = Instant::now();
            loop {
                let log = proc.log();
                if let Some(line) = log[lines_before..].iter().find(|l| about(l, "cluster-2") && warns(l)) {
                    return Some(line.clone());
                }
                if started.elapsed() > RELOAD_WAIT {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        match seen {
            Some(line) => eprintln!("cluster-2 {what}: {line}"),
            None => failures.push(format!("cluster-2 {what}: no warning or error naming cluster-2")),
        }
        wait_answer(addr, "httpbin.sample.svc.cluster.local.", nx.clone()).await;
        assert_eq!(answer(addr, "sleep.sleep.svc.cluster.local.").await, local, "{what}");
        std::fs::write(secrets.join("cluster-2"), good_api.kubeconfig_yaml("cluster-2")).expect("write");
        wait_answer(addr, "httpbin.sample.svc.cluster.local.", gw.clone()).await;
    }
    // Each refusal is logged once, not on every rescan (each write above made one).
    for case in &cases {
        let n = proc.log().iter().filter(|l| about(l, case.name)).count();
        if n != 1 {
            failures.push(format!("{}: {n} log lines, want exactly one", case.name));
        }
    }
    std::fs::remove_file(secrets.join("huge")).expect("remove the huge entry");
    eprintln!("remote secrets: {:?}", started.elapsed());
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

/// `meshdns check` on the same variants: every bad remote-secret entry is a problem naming
/// its cluster (exit 2); as a configured kubeconfig, which the operator wrote, only the broken
/// ones are, while exec plugins, auth providers and file paths are the operator's to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_bad_kubeconfig() {
    let started = Instant::now();
    let api = FakeApiServer::start().await;
    let cases = kubeconfig_cases(&api);
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("remote-secrets");
    std::fs::create_dir(&secrets).expect("secrets dir");
    for case in &cases {
        case.content.write(&secrets.join(case.name));
    }
    let local = [Spec {
        name: "cluster-1",
        local: true,
        src: Src::Dump(Dump::new().service("sleep", "sleep", &["10.96.88.40"])),
    }];
    let config = write_config(
        dir.path(),
        &local,
        &[closed_port_addr()],
        "remoteSecretsDir: remote-secrets\n",
    );
    let run = |config: &Path| {
        let out = Command::new(BIN)
            .args(["check", "--config", config.to_str().expect("path")])
            .output()
            .expect("run meshdns check");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let mut failures = Vec::new();
    let (code, stderr) = run(&config);
    if code != Some(2) {
        failures.push(format!("remote secrets: exit {code:?}"));
    }
    for case in &cases {
        let named = format!("remote cluster {} (", case.name);
        if !stderr
            .lines()
            .any(|l| l.contains(&named) && has_any(l, case.want_error))
        {
            failures.push(format!(
                "remote secret {}: no problem naming it and {:?}",
                case.name, case.want_error
            ));
        }
    }

    // As configured kubeconfigs, one config per variant.
    for case in &cases {
        let sub = dir.path().join(format!("trusted-{}", case.name));
        std::fs::create_dir(&sub).expect("dir");
        let specs = [
            Spec {
                name: "cluster-1",
                local: true,
                src: Src::Dump(Dump::new()),
            },
            Spec {
                name: "cluster-2",
                local: false,
                src: Src::Kubeconfig(String::new()),
            },
        ];
        let config = write_config(&sub, &specs, &[closed_port_addr()], "");
        case.content.write(&sub.join("cluster-2.kubeconfig"));
        let (code, stderr) = run(&config);
        let refused = code == Some(2) && stderr.contains("cluster cluster-2: ") && has_any(&stderr, case.want_error);
        if case.bad_when_trusted && !refused {
            failures.push(format!("configured {}: exit {code:?}, stderr {stderr:?}", case.name));
        }
        if !case.bad_when_trusted && code != Some(0) {
            failures.push(format!(
                "configured {} is the operator's choice: exit {code:?}, {stderr:?}",
                case.name
            ));
        }
        let _ = std::fs::remove_dir_all(&sub);
    }
    std::fs::remove_file(secrets.join("huge")).expect("remove the huge entry");
    eprintln!("check on kubeconfigs: {:?}", started.elapsed());
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}
