//! Criterion micro-benchmarks of the table: a full build for 10,000 services in each of three
//! clusters (the rebuild every watch event triggers), and lookups that hit, take the search
//! shortcut, and miss. A regression here shows without a DNS load generator.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hickory_proto::rr::RecordType;
use meshdns::cluster::{ClusterState, Ingress, ObjectKey, PortProtocol, Service, ServiceKind, ServicePort};
use meshdns::lookup::resolve;
use meshdns::table::{ClusterInput, Table, TableSettings, fqdn};

const SERVICES: usize = 10_000;
const NAMESPACES: usize = 100;

fn state(cluster: usize) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 0..SERVICES {
        let name = if cluster == 0 || i % 2 == 0 {
            format!("svc-{i}")
        } else {
            format!("c{cluster}-svc-{i}")
        };
        let ip = format!("10.{}.{}.{}", 96 + cluster, (i / 250) % 250, i % 250 + 1);
        s.services.insert(
            ObjectKey::new(&format!("ns-{}", i % NAMESPACES), &name),
            Service {
                kind: ServiceKind::ClusterIp(vec![ip.parse().expect("ip")]),
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: PortProtocol::Tcp,
                }]
                .into(),
                publish_not_ready: false,
            },
        );
    }
    let gw = format!("34.0.0.{}", cluster + 1).parse().expect("ip");
    s.gateways
        .insert(ObjectKey::new("istio-system", "gw"), vec![Ingress::Ip(gw)]);
    s
}

fn settings() -> TableSettings {
    TableSettings {
        cluster_domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        search: vec![
            "ns-1.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    }
}

fn benches(c: &mut Criterion) {
    let states: Vec<ClusterState> = (0..3).map(state).collect();
    let names = ["cluster-1", "cluster-2", "cluster-3"];
    let inputs: Vec<ClusterInput<'_>> = states
        .iter()
        .enumerate()
        .map(|(i, s)| ClusterInput {
            name: names[i],
            local: i == 0,
            state: s,
            loaded: true,
            gateway_override: None,
        })
        .collect();
    let settings = settings();
    c.bench_function("table build 3x10k services", |b| {
        b.iter(|| Table::build(&settings, black_box(&inputs), 1))
    });

    let (table, _) = Table::build(&settings, &inputs, 1);
    let hit = fqdn("svc-4242.ns-42.svc.cluster.local").expect("name");
    let remote = fqdn("c1-svc-4243.ns-43.svc.cluster.local").expect("name");
    let short = fqdn("svc-4242.ns-42.ns-1.svc.cluster.local").expect("name");
    let miss = fqdn("nothere.ns-42.svc.cluster.local").expect("name");
    let outside = fqdn("www.example.com").expect("name");
    c.bench_function("lookup hit (local)", |b| {
        b.iter(|| resolve(&table, black_box(&hit), RecordType::A))
    });
    c.bench_function("lookup hit (remote)", |b| {
        b.iter(|| resolve(&table, black_box(&remote), RecordType::A))
    });
    c.bench_function("lookup search shortcut", |b| {
        b.iter(|| resolve(&table, black_box(&short), RecordType::A))
    });
    c.bench_function("lookup miss (NXDOMAIN)", |b| {
        b.iter(|| resolve(&table, black_box(&miss), RecordType::A))
    });
    c.bench_function("lookup outside (forward)", |b| {
        b.iter(|| resolve(&table, black_box(&outside), RecordType::A))
    });
}

criterion_group!(table, benches);
criterion_main!(table);
