//! The Kubernetes DNS specification (schema 1.1.0) end to end: headless services and per-pod
//! names, ExternalName, SRV, PTR, dual-stack, `dns-version`, from dumps that look like real
//! `kubectl get services,endpointslices -A -o yaml` output, over UDP and TCP.

mod support;

use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use support::dns::{BOTH, answers, ask, has_soa};
use support::proxy::{ClusterSpec, Dump, Proxy};
use support::upstream::{Behavior, FakeUpstream};

const CLUSTER_1: &str = include_str!("fixtures/k8s-dns-cluster-1.yaml");
const CLUSTER_2: &str = include_str!("fixtures/k8s-dns-cluster-2.yaml");

struct Case {
    name: &'static str,
    qname: &'static str,
    qtype: RecordType,
    want_rcode: ResponseCode,
    want_answers: &'static [&'static str],
    want_additionals: &'static [&'static str],
    /// Answered by meshdns itself (AA) rather than relayed.
    want_local: bool,
}

fn cases() -> Vec<Case> {
    use RecordType::*;
    use ResponseCode::*;
    let c = |name, qname, qtype, want_rcode, want_answers, want_additionals, want_local| Case {
        name,
        qname,
        qtype,
        want_rcode,
        want_answers,
        want_additionals,
        want_local,
    };
    const SVC: &str = ".svc.cluster.local.";
    let _ = SVC;
    vec![
        c(
            "headless: ready endpoints only",
            "cassandra.data.svc.cluster.local.",
            A,
            NoError,
            &["A 10.76.4.10", "A 10.76.4.11"],
            &[],
            true,
        ),
        c(
            "headless: v4-only is NODATA for AAAA",
            "cassandra.data.svc.cluster.local.",
            AAAA,
            NoError,
            &[],
            &[],
            true,
        ),
        c(
            "pod hostname",
            "cassandra-0.cassandra.data.svc.cluster.local.",
            A,
            NoError,
            &["A 10.76.4.10"],
            &[],
            true,
        ),
        c(
            "not-ready pod has no name",
            "cassandra-2.cassandra.data.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "dashed-IP pod name",
            "10-76-5-7.nohost.data.svc.cluster.local.",
            A,
            NoError,
            &["A 10.76.5.7"],
            &[],
            true,
        ),
        c(
            "missing ready condition counts as ready",
            "nohost.data.svc.cluster.local.",
            A,
            NoError,
            &["A 10.76.5.7"],
            &[],
            true,
        ),
        c(
            "no ready endpoint, no remote copy: NXDOMAIN",
            "asleep.data.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "no ready endpoint, no remote copy: NXDOMAIN for AAAA too",
            "asleep.data.svc.cluster.local.",
            AAAA,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "nothing below a dead headless name",
            "asleep-0.asleep.data.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "no ready endpoint, remote copy: gateway failover",
            "failover.data.svc.cluster.local.",
            A,
            NoError,
            &["A 34.136.67.85"],
            &[],
            true,
        ),
        c(
            "publishNotReadyAddresses",
            "warmup.data.svc.cluster.local.",
            A,
            NoError,
            &["A 10.76.6.1"],
            &[],
            true,
        ),
        c(
            "publishNotReadyAddresses pod name",
            "warmup-0.warmup.data.svc.cluster.local.",
            A,
            NoError,
            &["A 10.76.6.1"],
            &[],
            true,
        ),
        c(
            "remote-only headless: gateway",
            "remotehl.data.svc.cluster.local.",
            A,
            NoError,
            &["A 34.136.67.85"],
            &[],
            true,
        ),
        c(
            "remote pod names are not answered",
            "remotehl-0.remotehl.data.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "dual-stack A",
            "web.dual.svc.cluster.local.",
            A,
            NoError,
            &["A 10.96.50.5"],
            &[],
            true,
        ),
        c(
            "dual-stack AAAA",
            "web.dual.svc.cluster.local.",
            AAAA,
            NoError,
            &["AAAA fd00:96::50:5"],
            &[],
            true,
        ),
        c(
            "ANY gives both families",
            "web.dual.svc.cluster.local.",
            ANY,
            NoError,
            &["A 10.96.50.5", "AAAA fd00:96::50:5"],
            &[],
            true,
        ),
        c(
            "MX of a service: NODATA",
            "web.dual.svc.cluster.local.",
            MX,
            NoError,
            &[],
            &[],
            true,
        ),
        c(
            "TXT of a service: NODATA",
            "web.dual.svc.cluster.local.",
            TXT,
            NoError,
            &[],
            &[],
            true,
        ),
        c(
            "ExternalName: CNAME chased upstream",
            "known.ext.svc.cluster.local.",
            A,
            NoError,
            &["A 192.0.2.10", "CNAME www.example.test."],
            &[],
            false, // the target's records are fetched: not authoritative
        ),
        c(
            "ExternalName to a name that does not resolve: upstream's rcode",
            "unknown.ext.svc.cluster.local.",
            A,
            NXDomain,
            &["CNAME nowhere.example.test."],
            &[],
            false, // the target's records are fetched: not authoritative
        ),
        c(
            "ExternalName into the cluster: chased in the table",
            "internal.ext.svc.cluster.local.",
            AAAA,
            NoError,
            &["AAAA fd00:96::50:5", "CNAME web.dual.svc.cluster.local."],
            &[],
            true,
        ),
        c(
            "ExternalName asked for CNAME",
            "known.ext.svc.cluster.local.",
            CNAME,
            NoError,
            &["CNAME www.example.test."],
            &[],
            true,
        ),
        c(
            "SRV of a ClusterIP service",
            "_http._tcp.mixed.ports.svc.cluster.local.",
            SRV,
            NoError,
            &["SRV 0 100 80 mixed.ports.svc.cluster.local."],
            &["A 10.96.60.6"],
            true,
        ),
        c(
            "SRV on UDP",
            "_dns._udp.mixed.ports.svc.cluster.local.",
            SRV,
            NoError,
            &["SRV 0 100 53 mixed.ports.svc.cluster.local."],
            &["A 10.96.60.6"],
            true,
        ),
        c(
            "SRV of a port name with a dash",
            "_dns-tcp._tcp.mixed.ports.svc.cluster.local.",
            SRV,
            NoError,
            &["SRV 0 100 53 mixed.ports.svc.cluster.local."],
            &["A 10.96.60.6"],
            true,
        ),
        c(
            "SRV: port name on the wrong protocol",
            "_dns._tcp.mixed.ports.svc.cluster.local.",
            SRV,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "SRV: unknown port name",
            "_nope._tcp.mixed.ports.svc.cluster.local.",
            SRV,
            NXDomain,
            &[],
            &[],
            true,
        ),
        c(
            "SRV: protocol level is an empty non-terminal",
            "_tcp.mixed.ports.svc.cluster.local.",
            SRV,
            NoError,
            &[],
            &[],
            true,
        ),
        c(
            "SRV name asked for A: NODATA",
            "_http._tcp.mixed.ports.svc.cluster.local.",
            A,
            NoError,
            &[],
            &[],
            true,
        ),
        c(
            "SRV of a headless service: one per ready pod, endpoint port",
            "_cql._tcp.cassandra.data.svc.cluster.local.",
            SRV,
            NoError,
            &[
                "SRV 0 50 9042 cassandra-0.cassandra.data.svc.cluster.local.",
                "SRV 0 50 9042 cassandra-1.cassandra.data.svc.cluster.local.",
            ],
            &["A 10.76.4.10", "A 10.76.4.11"],
            true,
        ),
        c(
            "SRV of a headless service uses the endpoint's target port",
            "_http._tcp.nohost.data.svc.cluster.local.",
            SRV,
            NoError,
            &["SRV 0 100 8080 10-76-5-7.nohost.data.svc.cluster.local."],
            &["A 10.76.5.7"],
            true,
        ),
        c(
            "SRV of a remote service points at its name, gateway in additional",
            "_grpc._tcp.api.remote.svc.cluster.local.",
            SRV,
            NoError,
            &["SRV 0 100 9090 api.remote.svc.cluster.local."],
            &["A 34.136.67.85"],
            true,
        ),
        c(
            "PTR of a ClusterIP",
            "6.60.96.10.in-addr.arpa.",
            PTR,
            NoError,
            &["PTR mixed.ports.svc.cluster.local."],
            &[],
            true,
        ),
        c(
            "PTR of an IPv6 ClusterIP",
            "5.0.0.0.0.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.",
            PTR,
            NoError,
            &["PTR web.dual.svc.cluster.local."],
            &[],
            true,
        ),
        c(
            "PTR of a headless pod",
            "10.4.76.10.in-addr.arpa.",
            PTR,
            NoError,
            &["PTR cassandra-0.cassandra.data.svc.cluster.local."],
            &[],
            true,
        ),
        c(
            "PTR of a dashed pod",
            "7.5.76.10.in-addr.arpa.",
            PTR,
            NoError,
            &["PTR 10-76-5-7.nohost.data.svc.cluster.local."],
            &[],
            true,
        ),
        c(
            "PTR of a gateway: forwarded",
            "85.67.136.34.in-addr.arpa.",
            PTR,
            NXDomain,
            &[],
            &[],
            false,
        ),
        c(
            "other reverse names: forwarded",
            "1.2.0.192.in-addr.arpa.",
            PTR,
            NXDomain,
            &[],
            &[],
            false,
        ),
        c(
            "dns-version",
            "dns-version.cluster.local.",
            TXT,
            NoError,
            &["TXT 1.1.0"],
            &[],
            true,
        ),
        c(
            "dns-version A: NODATA",
            "dns-version.cluster.local.",
            A,
            NoError,
            &[],
            &[],
            true,
        ),
    ]
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn kubernetes_dns_specification() {
    let records: Vec<(&str, IpAddr)> = vec![("www.example.test", "192.0.2.10".parse().unwrap())];
    let upstream = FakeUpstream::start(records, Behavior::Normal).await;
    let clusters = vec![
        ClusterSpec {
            name: "cluster-1",
            local: true,
            dump: Dump::raw(CLUSTER_1),
        },
        ClusterSpec {
            name: "cluster-2",
            local: false,
            dump: Dump::raw(CLUSTER_2),
        },
    ];
    let proxy = Proxy::start(&clusters, &[upstream.addr], "").await;
    for proto in BOTH {
        for case in cases() {
            let reply = ask(proxy.addr, proto, case.qname, case.qtype).await;
            let label = format!("{} ({proto:?} {} {})", case.name, case.qname, case.qtype);
            assert_eq!(reply.metadata.response_code, case.want_rcode, "{label}: rcode");
            let got: Vec<String> = answers(&reply).into_iter().map(|a| a.replace('"', "")).collect();
            assert_eq!(got, case.want_answers, "{label}: answers");
            let additional = sorted(reply.additionals.iter().map(support::dns::show).collect());
            assert_eq!(additional, case.want_additionals, "{label}: additional");
            assert_eq!(reply.metadata.authoritative, case.want_local, "{label}: AA");
            let negative = case.want_answers.is_empty() || case.want_answers.iter().all(|a| a.starts_with("CNAME"));
            if case.want_local && negative && case.qtype != RecordType::CNAME {
                assert!(has_soa(&reply), "{label}: negative answers carry the SOA");
            }
        }
    }
}
