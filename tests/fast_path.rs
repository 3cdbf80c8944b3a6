//! The UDP fast path must answer exactly as the full path does. Two servers share one table and
//! one handler setup, one with the fast path and one without; every question below goes to
//! both and the replies must agree byte for byte in everything but name compression and the
//! order of address records (both paths spread load by varying it), and each must pass the
//! strict reply check (`support::strict`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use meshdns::handler::DnsHandler;
use meshdns::hub::SharedTable;
use meshdns::metrics::Metrics;
use meshdns::server::{DnsServer, ServerSettings};
use meshdns::upstream::{Forward, ForwardError, Transport};
use support::compare::{canonical, demo_table, mixed_case};
use support::dns::{Proto, exchange_raw, query_msg};
use support::strict::assert_reply;

/// Forwarding answers SERVFAIL on both paths; this test is about table answers.
struct NoUpstream;

impl Forward for NoUpstream {
    async fn forward(&self, _query: &[u8], _transport: Transport) -> Result<Message, ForwardError> {
        Err(ForwardError::NoUpstreams)
    }
}

async fn server(table: &SharedTable, fast: bool) -> DnsServer {
    let metrics = Arc::new(Metrics::new());
    let handler = DnsHandler::with_metrics(Arc::clone(table), Arc::new(NoUpstream), Arc::clone(&metrics));
    let mut settings = ServerSettings::new(Duration::from_secs(5), metrics);
    settings.fast_path = fast.then(|| Arc::clone(table));
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    DnsServer::bind(&[listen], handler, settings).await.unwrap()
}

#[tokio::test]
async fn fast_and_full_paths_give_the_same_answers() {
    let table = demo_table();
    let fast = server(&table, true).await;
    let full = server(&table, false).await;
    let (fast_addr, full_addr) = (fast.local_addrs()[0], full.local_addrs()[0]);

    let mut names: Vec<String> = table
        .load()
        .iter()
        .filter_map(|(name, _)| name.map(|n| n.to_string()))
        .collect();
    names.sort();
    let extra = [
        "helloworld.sleep.svc.cluster.local.",
        "helloworld.helloworld.sleep.svc.cluster.local.",
        "helloworld.helloworld.svc.cluster.local.cluster.local.",
        "sleep.sleep.sleep.svc.cluster.local.",
        "nothere.nothere.svc.cluster.local.",
        "helloworld.svc.cluster.local.",
        "x.pod.cluster.local.",
        "nothere.helloworld.svc.cluster.local.",
        "svc.cluster.local.",
        "www.example.test.",
    ];
    names.extend(extra.iter().map(ToString::to_string));
    assert!(names.len() > extra.len() + 5, "the demo table has names: {names:?}");

    let mut compared = 0;
    let mut fast_answered = 0;
    for name in &names {
        for spelled in [name.clone(), mixed_case(name)] {
            for qtype in [RecordType::A, RecordType::AAAA, RecordType::ANY, RecordType::SRV] {
                for (edns, dnssec_ok) in [
                    (None, false),
                    (Some(512), false),
                    (Some(1232), true),
                    (Some(100), false),
                    (Some(4096), false),
                ] {
                    let mut msg = query_msg(&spelled, qtype, edns, dnssec_ok);
                    msg.metadata.checking_disabled = dnssec_ok;
                    let bytes = msg.to_vec().unwrap();
                    let wait = Duration::from_secs(3);
                    let a = exchange_raw(fast_addr, Proto::Udp, &bytes, wait).await;
                    let b = exchange_raw(full_addr, Proto::Udp, &bytes, wait).await;
                    let (Some(a), Some(b)) = (a, b) else {
                        panic!("{spelled} {qtype} {edns:?}: no reply from one of the paths");
                    };
                    assert_reply(&bytes, &a, true);
                    assert_reply(&bytes, &b, true);
                    assert_eq!(
                        canonical(&a),
                        canonical(&b),
                        "{spelled} {qtype} EDNS {edns:?}: the fast path differs"
                    );
                    compared += 1;
                    let mut out = [0u8; 4096];
                    if meshdns::fast::answer(&table.load(), &bytes, 0, meshdns::wire::UdpPayload::default(), &mut out)
                        .is_some()
                    {
                        fast_answered += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 100, "compared {compared} replies");
    assert!(fast_answered > 20, "the fast path answered {fast_answered} of them");
    fast.shutdown(Duration::from_millis(100)).await;
    full.shutdown(Duration::from_millis(100)).await;
}
