//! Replays every checked-in fuzz corpus file (`fuzz/corpus/<target>/`) through the checks of its
//! target (`meshdns::fuzzing`), so the seeds and every input that once made a target fail stay
//! covered by `cargo test`, without cargo-fuzz or libFuzzer.
//!
//! The seeds are generated here too: `cargo test --test fuzz_corpus -- --ignored` rewrites them
//! (real query packets built with hickory-proto, TCP streams, the dumps the other tests use,
//! kubeconfigs, resolv.conf files). Files the fuzzer found are kept as they are.

use std::fs;
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A as ARecord;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus")
}

/// Runs every file of one target's corpus; fails naming each file whose check failed.
fn replay(target: &str) {
    let (_, check) = meshdns::fuzzing::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus files", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let bytes = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&bytes))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: failing corpus files:\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_target_has_a_corpus() {
    for (name, _) in meshdns::fuzzing::TARGETS {
        assert!(corpus_root().join(name).is_dir(), "fuzz/corpus/{name} is missing");
    }
}

#[test]
fn handler_datagram_corpus() {
    replay("handler_datagram");
}

#[test]
fn tcp_framing_corpus() {
    replay("tcp_framing");
}

#[test]
fn dump_parser_corpus() {
    replay("dump_parser");
}

#[test]
fn kubeconfig_corpus() {
    replay("kubeconfig");
}

#[test]
fn resolv_conf_corpus() {
    replay("resolv_conf");
}

#[test]
fn watch_events_corpus() {
    replay("watch_events");
}

#[test]
fn relay_reply_corpus() {
    replay("relay_reply");
}

// ---------------------------------------------------------------------------------------------
// Seed generation

#[test]
#[ignore = "rewrites the seed files under fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    let root = corpus_root();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("create corpus directory");
        fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    };
    for (name, bytes) in queries() {
        write("handler_datagram", &name, &bytes);
    }
    for (name, bytes) in tcp_streams() {
        write("tcp_framing", &name, &bytes);
    }
    for (name, text) in dumps() {
        write("dump_parser", name, text.as_bytes());
    }
    for (name, text) in kubeconfigs() {
        write("kubeconfig", &name, text.as_bytes());
    }
    for (name, text) in RESOLV_CONFS {
        write("resolv_conf", name, text);
    }
    for (name, bytes) in WATCH_EVENTS {
        write("watch_events", name, bytes);
    }
    for (name, bytes) in relay_exchanges() {
        write("relay_reply", &name, &bytes);
    }
}

/// Query and upstream reply pairs as the relay sees them: the query's length, the query, the
/// reply (ID and question as the upstream echoes them).
fn relay_exchanges() -> Vec<(String, Vec<u8>)> {
    let exchange = |query: &Message, edit: &dyn Fn(&mut Message)| {
        let mut reply = Message::new(0x7e57, MessageType::Response, OpCode::Query);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_queries(query.queries.clone());
        edit(&mut reply);
        let q = bytes(query);
        let mut out = u16::try_from(q.len()).expect("small").to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        out.extend_from_slice(&bytes(&reply));
        out
    };
    let www = "WwW.Example.COM.";
    let a = |ip: [u8; 4]| Record::from_rdata(name(www), 300, RData::A(ARecord::new(ip[0], ip[1], ip[2], ip[3])));
    let soa = || {
        Record::from_rdata(
            name("example.com."),
            900,
            RData::SOA(hickory_proto::rr::rdata::SOA::new(
                name("ns.example.com."),
                name("hostmaster.example.com."),
                1,
                7200,
                900,
                86400,
                60,
            )),
        )
    };
    let opt = |reply: &mut Message| {
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        reply.set_edns(edns);
    };
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| out.push((name.to_string(), bytes));
    add(
        "a-edns",
        exchange(&dig(0x1111, www, RecordType::A), &|r| {
            r.add_answer(a([192, 0, 2, 1]));
            r.add_answer(a([192, 0, 2, 2]));
            opt(r);
        }),
    );
    add(
        "a-plain-opt-in-reply",
        exchange(&query(0x2222, www, RecordType::A), &|r| {
            r.add_answer(a([192, 0, 2, 1]));
            opt(r);
        }),
    );
    add(
        "a-edns-no-opt-in-reply",
        exchange(&dig(0x3333, www, RecordType::A), &|r| {
            r.add_answer(a([192, 0, 2, 1]));
        }),
    );
    add(
        "nxdomain-soa",
        exchange(&query(0x4444, "nothere.example.com.", RecordType::A), &|r| {
            r.metadata.response_code = hickory_proto::op::ResponseCode::NXDomain;
            r.add_authority(soa());
        }),
    );
    add(
        "big-plain",
        exchange(&query(0x5555, www, RecordType::A), &|r| {
            for i in 0..60 {
                r.add_answer(a([10, 0, 0, i]));
            }
        }),
    );
    add(
        "cname-chain",
        exchange(&query(0x6666, www, RecordType::A), &|r| {
            let edge = name("edge.cdn.example.net.");
            r.add_answer(Record::from_rdata(
                name(www),
                60,
                RData::CNAME(hickory_proto::rr::rdata::CNAME(edge.clone())),
            ));
            r.add_answer(Record::from_rdata(edge, 20, RData::A(ARecord::new(198, 51, 100, 7))));
        }),
    );
    add(
        "servfail",
        exchange(&dig(0x7777, www, RecordType::AAAA), &|r| {
            r.metadata.response_code = hickory_proto::op::ResponseCode::ServFail;
        }),
    );
    let mut trailing = exchange(&query(0x8888, www, RecordType::A), &|r| {
        r.add_answer(a([192, 0, 2, 9]));
    });
    trailing.extend_from_slice(b"trailing");
    add("trailing-bytes", trailing);
    out
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("seed name")
}

/// A query as stub resolvers send it: one question, RD.
fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), qtype));
    msg
}

/// `dig` 9.18: RD and AD set, EDNS with a 1232-byte payload and a client COOKIE.
fn dig(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut msg = query(id, qname, qtype);
    msg.metadata.authentic_data = true;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.options_mut().insert(EdnsOption::Unknown(
        10,
        vec![0x5a, 0x1f, 0x3c, 0x88, 0x09, 0xd2, 0x71, 0x44],
    ));
    msg.set_edns(edns);
    msg
}

fn bytes(msg: &Message) -> Vec<u8> {
    msg.to_vec().expect("seed encodes")
}

/// The first name `<prefix><n>.example.test.` the fake upstream of `meshdns::fuzzing` answers
/// with behaviour `which` (it picks by the sum of the name's lowercase bytes, mod 4).
fn upstream_name(prefix: &str, which: usize) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}.example.test."))
        .find(|candidate| {
            let sum: usize = name(candidate)
                .to_lowercase()
                .iter()
                .flatten()
                .map(|&b| usize::from(b))
                .sum();
            sum % 4 == which
        })
        .expect("some name matches")
}

fn queries() -> Vec<(String, Vec<u8>)> {
    use RecordType::*;
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, msg: Message| out.push((name.to_string(), bytes(&msg)));

    const HELLO: &str = "helloworld.helloworld.svc.cluster.local.";
    add("dig-a-edns-cookie", dig(0x1d2c, HELLO, A));
    let mut dnssec = dig(0x1d2d, "web.dual.svc.cluster.local.", AAAA);
    if let Some(edns) = &mut dnssec.edns {
        edns.set_dnssec_ok(true);
    }
    add("dig-aaaa-do", dnssec);
    // glibc with ndots:5 walks the search path first; A and AAAA go out as two packets.
    add(
        "glibc-a-search",
        query(0x8a01, "helloworld.helloworld.sleep.svc.cluster.local.", A),
    );
    add(
        "glibc-aaaa-search",
        query(0x8a02, "helloworld.helloworld.sleep.svc.cluster.local.", AAAA),
    );
    add("glibc-a", query(0x8a03, HELLO, A));
    // musl sends every search step in parallel, without EDNS.
    add("musl-a", query(0x3c01, "httpbin.sample.svc.cluster.local.", A));
    add("musl-aaaa", query(0x3c02, "httpbin.sample.svc.cluster.local.", AAAA));
    add("musl-a-corp", query(0x3c03, "httpbin.sample.corp.example.", A));
    add("0x20-case", dig(0x2020, "HelloWorld.HELLOWORLD.svc.Cluster.LOCAL.", A));
    add("headless-a", dig(1, "cassandra.data.svc.cluster.local.", A));
    add(
        "headless-pod",
        query(2, "cassandra-0.cassandra.data.svc.cluster.local.", A),
    );
    add(
        "headless-dashed",
        query(3, "10-76-5-7.nohost.data.svc.cluster.local.", A),
    );
    add(
        "srv-headless",
        dig(4, "_cql._tcp.cassandra.data.svc.cluster.local.", SRV),
    );
    add("srv-clusterip", dig(5, "_dns._udp.mixed.ports.svc.cluster.local.", SRV));
    add("srv-proto-level", query(6, "_tcp.mixed.ports.svc.cluster.local.", SRV));
    add("ptr-clusterip", query(7, "5.50.96.10.in-addr.arpa.", PTR));
    add("ptr-pod", query(8, "10.4.76.10.in-addr.arpa.", PTR));
    add(
        "ptr-ipv6",
        query(
            9,
            "5.0.0.0.0.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.",
            PTR,
        ),
    );
    add("ptr-unknown", query(10, "1.2.3.4.in-addr.arpa.", PTR));
    add("externalname-upstream", dig(11, "known.ext.svc.cluster.local.", A));
    add(
        "externalname-missing",
        query(12, "unknown.ext.svc.cluster.local.", AAAA),
    );
    add("externalname-internal", query(13, "internal.ext.svc.cluster.local.", A));
    add("remote-ip-gateway", query(14, "api.remote.svc.cluster.local.", A));
    add("remote-hostname-gateway", dig(15, "sleep.sleep.svc.cluster.local.", A));
    add("dns-version", query(16, "dns-version.cluster.local.", TXT));
    add("any", dig(17, HELLO, ANY));
    add("mx-nodata", query(18, HELLO, MX));
    add("nxdomain", dig(19, "nothere.helloworld.svc.cluster.local.", A));
    add("empty-non-terminal", query(20, "data.svc.cluster.local.", A));
    add("zone-apex", query(21, "cluster.local.", SOA));
    add("root-ns", query(22, ".", NS));
    add("outside-zone", dig(23, "www.example.com.", A));
    for (which, what) in ["fail", "nxdomain", "many", "txt"].iter().enumerate() {
        add(&format!("upstream-{what}"), query(24, &upstream_name("u", which), A));
        add(
            &format!("upstream-{what}-edns"),
            dig(25, &upstream_name("e", which), AAAA),
        );
    }
    let mut small = dig(26, &upstream_name("s", 2), A);
    if let Some(edns) = &mut small.edns {
        edns.set_max_payload(100);
    }
    add("edns-small-payload", small);
    let mut large = dig(27, &upstream_name("l", 2), A);
    if let Some(edns) = &mut large.edns {
        edns.set_max_payload(65_535);
    }
    add("edns-large-payload", large);
    let mut subnet = dig(28, HELLO, A);
    if let Some(edns) = &mut subnet.edns {
        let ecs = ClientSubnet::new(IpAddr::from([192, 0, 2, 0]), 24, 0);
        edns.options_mut().insert(EdnsOption::Subnet(ecs));
    }
    add("edns-client-subnet", subnet);
    let mut version = dig(29, HELLO, A);
    if let Some(edns) = &mut version.edns {
        edns.set_version(1);
    }
    add("edns-version-1", version);
    let mut chaos = query(30, "version.bind.", TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    add("class-chaos", chaos);
    let long = format!(
        "{}.svc.cluster.local.",
        ["a".repeat(63), "b".repeat(63), "c".repeat(60)].join(".")
    );
    add("long-name", query(31, &long, A));

    // Two questions: the second name is compressed against the first.
    let mut two = query(32, HELLO, A);
    two.add_query(Query::query(name("sleep.helloworld.svc.cluster.local."), AAAA));
    add("two-questions", two);
    let mut none = Message::query();
    none.metadata.id = 33;
    add("no-question", none);
    // A record in the additional section whose owner is a pointer to the question.
    let mut extra = query(34, HELLO, A);
    extra.add_additional(Record::from_rdata(name(HELLO), 5, RData::A(ARecord::new(10, 0, 0, 1))));
    add("additional-compressed", extra);
    for (op, label) in [
        (OpCode::Notify, "notify"),
        (OpCode::Update, "update"),
        (OpCode::Status, "status"),
    ] {
        let mut msg = query(35, HELLO, SOA);
        msg.metadata.op_code = op;
        add(&format!("opcode-{label}"), msg);
    }
    let mut response = query(36, HELLO, A);
    response.metadata.message_type = MessageType::Response;
    add("response-bit", response);

    // Broken on purpose: truncated packets, IQUERY, compression loops and pointers past the end.
    let dig_bytes = bytes(&dig(0x7777, HELLO, A));
    for len in [0, 5, 12, 20, 40, dig_bytes.len() - 5, dig_bytes.len() - 1] {
        out.push((format!("truncated-{len}"), dig_bytes[..len].to_vec()));
    }
    let mut iquery = bytes(&query(37, HELLO, A));
    iquery[2] |= 1 << 3; // opcode 1
    out.push(("opcode-iquery".into(), iquery));
    let header = [0x00, 0x26, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
    let mut looped = header.to_vec();
    looped.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    out.push(("pointer-loop".into(), looped));
    let mut forward = header.to_vec();
    forward.extend_from_slice(&[0x01, b'a', 0xc0, 0x40, 0x00, 0x01, 0x00, 0x01]);
    out.push(("pointer-past-end".into(), forward));
    let mut to_header = header.to_vec();
    to_header.extend_from_slice(&[0x03, b'w', b'e', b'b', 0xc0, 0x02, 0x00, 0x01, 0x00, 0x01]);
    out.push(("pointer-into-header".into(), to_header));
    let mut counts = bytes(&query(38, HELLO, A));
    counts[7] = 9; // claims nine answers it does not have
    out.push(("answer-count-lies".into(), counts));
    let mut two_opt = bytes(&dig(39, HELLO, A));
    let opt_start = two_opt.len() - 23; // root name, type, class, TTL, rdlength 12, COOKIE option
    let opt = two_opt[opt_start..].to_vec();
    two_opt.extend_from_slice(&opt);
    two_opt[11] = 2;
    out.push(("two-opt-records".into(), two_opt));
    out
}

/// `n`, `n % 16` chunk sizes, then the stream (see `meshdns::fuzzing::tcp_framing`).
fn tcp_streams() -> Vec<(String, Vec<u8>)> {
    let framed = |msgs: &[Vec<u8>]| {
        let mut out = Vec::new();
        for msg in msgs {
            out.extend_from_slice(&u16::try_from(msg.len()).expect("small").to_be_bytes());
            out.extend_from_slice(msg);
        }
        out
    };
    let q1 = bytes(&dig(0x5151, "sleep.sleep.svc.cluster.local.", RecordType::A));
    let q2 = bytes(&query(
        0x5152,
        "helloworld.helloworld.svc.cluster.local.",
        RecordType::AAAA,
    ));
    let q3 = bytes(&query(0x5153, "www.example.com.", RecordType::A));
    let with_sizes = |sizes: &[u8], stream: Vec<u8>| {
        let mut out = vec![u8::try_from(sizes.len()).expect("few sizes")];
        out.extend_from_slice(sizes);
        out.extend(stream);
        out
    };
    let mut partial = framed(&[q1.clone(), q2.clone()]);
    partial.truncate(partial.len() - 7);
    let mut huge = vec![0xff, 0xff];
    huge.extend_from_slice(&q3);
    vec![
        (
            "dig-tcp-whole".into(),
            with_sizes(&[], framed(std::slice::from_ref(&q1))),
        ),
        (
            "pipelined-byte-by-byte".into(),
            with_sizes(&[1], framed(&[q1.clone(), q2.clone()])),
        ),
        (
            "three-odd-chunks".into(),
            with_sizes(&[2, 3, 0, 7, 200], framed(&[q1.clone(), q2.clone(), q3.clone()])),
        ),
        ("partial-trailing-frame".into(), with_sizes(&[13], partial)),
        (
            "zero-length-frame".into(),
            with_sizes(&[1, 2], framed(&[Vec::new(), q3.clone(), Vec::new()])),
        ),
        ("max-length-prefix".into(), with_sizes(&[255], huge)),
        ("prefix-split".into(), with_sizes(&[1, 1, 1], framed(&[q2, q3]))),
    ]
}

fn dumps() -> Vec<(&'static str, String)> {
    vec![
        ("demo-cluster-1.yaml", meshdns::demo::CLUSTER_1.to_string()),
        ("demo-cluster-2.yaml", meshdns::demo::CLUSTER_2.to_string()),
        (
            "k8s-dns-cluster-1.yaml",
            include_str!("fixtures/k8s-dns-cluster-1.yaml").to_string(),
        ),
        (
            "k8s-dns-cluster-2.yaml",
            include_str!("fixtures/k8s-dns-cluster-2.yaml").to_string(),
        ),
        ("json-list.json", JSON_DUMP.to_string()),
        ("multi-document.yaml", MULTI_DOC_DUMP.to_string()),
        ("single-object.yaml", SINGLE_OBJECT_DUMP.to_string()),
        ("empty-list.yaml", "apiVersion: v1\nkind: List\nitems: []\n".to_string()),
    ]
}

const JSON_DUMP: &str = r#"{
    "apiVersion": "v1",
    "items": [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "clusterIP": "10.96.1.1",
                "clusterIPs": ["10.96.1.1", "fd00::1:1"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                "type": "ClusterIP"
            }
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"name": "pg", "port": 5432}]}
        },
        {
            "addressType": "IPv4",
            "apiVersion": "discovery.k8s.io/v1",
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "hostname": "db-0"},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": false}, "hostname": "db-1"}
            ],
            "kind": "EndpointSlice",
            "metadata": {
                "labels": {"kubernetes.io/service-name": "db", "service.kubernetes.io/headless": ""},
                "name": "db-abcde",
                "namespace": "shop"
            },
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "gw", "namespace": "istio-system", "labels": {"istio": "eastwestgateway"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.9.9", "ports": [{"name": "tls", "port": 15443}]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "gw.elb.example.test"}]}}
        }
    ],
    "kind": "List",
    "metadata": {"resourceVersion": ""}
}
"#;

const MULTI_DOC_DUMP: &str = "---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: one}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: one}
spec: {type: ExternalName, externalName: Example.COM.}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored, namespace: one}
data: {key: value}
---
apiVersion: v1
kind: ServiceList
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: two}
  spec: {clusterIP: 10.0.0.2}
";

const SINGLE_OBJECT_DUMP: &str = "apiVersion: v1
kind: Service
metadata:
  name: istio-eastwestgateway
  namespace: istio-system
  labels: {istio: eastwestgateway}
spec:
  type: LoadBalancer
  clusterIP: 10.112.9.7
  ports: [{name: tls, port: 15443}]
status:
  loadBalancer:
    ingress:
    - {ip: 34.136.67.85, ipMode: VIP}
";

const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: cluster-2
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: Zm9v
contexts:
- name: cluster-2
  context: {cluster: cluster-2, user: cluster-2}
current-context: cluster-2
users:
- name: cluster-2
  user:
    token: abc
";

fn kubeconfigs() -> Vec<(String, String)> {
    let mut out = vec![("remote-secret-inline".to_string(), KUBECONFIG.to_string())];
    let variants = [
        (
            "exec",
            "token: abc",
            "exec:\n      command: /bin/sh\n      apiVersion: client.authentication.k8s.io/v1",
        ),
        ("auth-provider", "token: abc", "auth-provider:\n      name: gcp"),
        ("token-file", "token: abc", "tokenFile: /var/run/secrets/token"),
        (
            "client-cert-files",
            "token: abc",
            "client-certificate: /etc/cert.pem\n    client-key: /etc/key.pem",
        ),
        (
            "client-cert-data",
            "token: abc",
            "client-certificate-data: Zm9v\n    client-key-data: YmFy",
        ),
        (
            "ca-file",
            "certificate-authority-data: Zm9v",
            "certificate-authority: /etc/ca.pem",
        ),
        (
            "insecure",
            "certificate-authority-data: Zm9v",
            "insecure-skip-tls-verify: true",
        ),
        (
            "no-server",
            "server: https://10.0.0.1:6443",
            "proxy-url: http://proxy:3128",
        ),
    ];
    for (name, from, to) in variants {
        out.push((name.to_string(), KUBECONFIG.replace(from, to)));
    }
    out.push((
        "two-documents".to_string(),
        format!("{KUBECONFIG}---\n{}", KUBECONFIG.replace("token: abc", "tokenFile: /t")),
    ));
    out.push((
        "json".to_string(),
        r#"{"apiVersion":"v1","kind":"Config","clusters":[{"name":"c","cluster":{"server":"https://[fd00::1]:6443"}}],"users":[{"name":"u","user":{"username":"a","password":"b"}}],"contexts":[{"name":"c","context":{"cluster":"c","user":"u","namespace":"x"}}],"current-context":"c"}"#.to_string(),
    ));
    out
}

const RESOLV_CONFS: &[(&str, &[u8])] = &[
    (
        "kubelet",
        b"search sleep.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
    ),
    (
        "kubelet-host-search",
        b"search sleep.svc.cluster.local svc.cluster.local cluster.local us-central1-a.c.proj.internal. Corp.Example.\n\
          nameserver 10.96.0.10\noptions ndots:5 timeout:2 attempts:3 rotate edns0 trust-ad\n",
    ),
    ("domain-only", b"domain Example.Org\nnameserver 192.0.2.53\n"),
    (
        "many-nameservers",
        b"nameserver 10.0.0.1\nnameserver 10.0.0.2\nnameserver ::1\nnameserver 10.0.0.4\nnameserver 10.0.0.5\n",
    ),
    ("ipv6-scoped", b"nameserver fe80::1%eth0\nnameserver 2001:db8::53\nsearch example.com\n"),
    (
        "comments-crlf",
        b"# generated by NetworkManager\r\n; old style comment\r\nnameserver 8.8.8.8 # trailing\r\nsearch a.example b.example\r\n",
    ),
    (
        "garbage",
        b"nameserver not-an-ip\nbogus line\nsortlist 130.155.160.0/255.255.240.0\noptions ndots:x\n\xff\xfe\n",
    ),
    ("empty", b""),
    ("search-then-domain", b"search a.example\ndomain b.example\nsearch C.Example.\n"),
    ("dot-search", b"search .\nnameserver 127.0.0.53\noptions edns0\n"),
];

/// Hand-made event sequences (see `Unstructured` in `meshdns::fuzzing`: an even first byte is a
/// Service event, odd an EndpointSlice event; the next byte mod 5 is Apply, Delete, Init,
/// InitApply, InitDone; then the object's choices).
const WATCH_EVENTS: &[(&str, &[u8])] = &[
    (
        "initial-lists",
        &[0, 2, 0, 3, 0, 0, 1, 1, 0, 0, 1, 0, 2, 0, 4, 1, 2, 1, 4],
    ),
    (
        "apply-delete",
        &[
            0, 0, 0, 0, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 0, 1, 3, 2, 0, 0, 1, 0, 1, 0, 1, 2, 0, 0,
        ],
    ),
    (
        "gateway-and-headless",
        &[
            0, 0, 1, 2, 2, 2, 0, 1, 3, 1, 1, 0, 0, 1, 1, 0, 0, 2, 1, 0, 1, 0, 2, 3, 1, 0, 1, 2, 1, 1, 1, 1, 0, 0, 0, 0,
            1, 0, 1, 0, 0, 3, 2, 0, 1, 1, 0, 2, 1,
        ],
    ),
    (
        "relist-sweeps",
        &[
            0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 2, 0, 3, 0, 1, 1, 1, 1, 0, 0, 0, 0, 4, 1, 2, 1, 4,
        ],
    ),
];

// ---------------------------------------------------------------------------------------------
// What the fuzzers found, as deterministic tests (the corpus files above replay them too, but
// an order-dependent bug shows there only when two hash maps happen to iterate differently).

/// `watch_events`: two Services sharing a ClusterIP (and a pod reusing it) gave the reverse
/// name to whichever the state's hash map yielded last, so PTR answers changed between
/// rebuilds and between pods.
#[test]
fn shared_address_has_one_stable_reverse_name() {
    use meshdns::cluster::{ClusterState, DEFAULT_GATEWAY_SELECTOR, LabelSelector};
    use meshdns::lookup::{Resolution, resolve};
    use meshdns::table::{ClusterInput, Table, TableSettings};

    let dump = "apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: web, namespace: a}, spec: {clusterIP: 10.0.0.1}}
- {apiVersion: v1, kind: Service, metadata: {name: db, namespace: b}, spec: {clusterIP: 10.0.0.1}}
- {apiVersion: v1, kind: Service, metadata: {name: zz, namespace: c}, spec: {clusterIP: 10.0.0.1}}
- apiVersion: v1
  kind: Service
  metadata: {name: hl, namespace: a}
  spec: {clusterIP: None}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: hl-1, namespace: a, labels: {kubernetes.io/service-name: hl}}
  addressType: IPv4
  endpoints: [{addresses: [10.0.0.1]}]
";
    let selector = LabelSelector::parse(DEFAULT_GATEWAY_SELECTOR).expect("selector");
    let settings = TableSettings {
        cluster_domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        search: Vec::new(),
    };
    let ptr = name("1.0.0.10.in-addr.arpa.");
    let answers: std::collections::BTreeSet<String> = (0..32)
        .map(|_| {
            // A fresh parse: fresh hash maps, each with its own iteration order.
            let state: ClusterState = meshdns::source::parse_dump(dump.as_bytes(), &selector).expect("dump");
            let input = ClusterInput {
                name: "c1",
                local: true,
                state: &state,
                loaded: true,
                gateway_override: None,
            };
            let (table, _) = Table::build(&settings, &[input], 1);
            match resolve(&table, &ptr, RecordType::PTR) {
                Resolution::Local(answer) => answer.answers.iter().map(|r| r.data.to_string()).collect(),
                Resolution::Forward => "forward".to_string(),
            }
        })
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers.first().map(String::as_str), Some("db.b.svc.cluster.local."));
}
