//! The upstream response cache against a real meshdns and a fake upstream that counts what
//! reaches it: repeated questions stay off the network and are answered under the client's ID
//! and case, TTLs count down, expired answers are asked again, NXDOMAIN is kept with its SOA,
//! SERVFAIL only briefly, alias chases share the cache, `maxEntries: 0` turns it off, and the
//! metrics count it all. TTL caps of 1-2 s keep the waits short.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use meshdns::config::{Config, Overrides};
use support::dns::{BOTH, Proto, answers, exchange, has_soa, query_msg};
use support::proxy::{ClusterSpec, Dump, Proxy, Spec, Src, write_config};
use support::upstream::{Behavior, FakeUpstream};

/// Past the one-second boundary of a served TTL, with room for a slow machine.
const PAST_A_SECOND: Duration = Duration::from_millis(1100);

fn records() -> Vec<(&'static str, IpAddr)> {
    vec![
        ("www.example.test", "192.0.2.10".parse().unwrap()),
        ("other.example.test", "192.0.2.20".parse().unwrap()),
    ]
}

/// One local cluster with an ExternalName service pointing outside.
fn clusters() -> Vec<ClusterSpec> {
    vec![ClusterSpec {
        name: "cluster-1",
        local: true,
        dump: Dump::new()
            .service("default", "kubernetes", &["10.96.0.1"])
            .external_name("ext", "alias", "www.example.test"),
    }]
}

async fn start(upstream: &FakeUpstream, cache_yaml: &str) -> Proxy {
    Proxy::start(&clusters(), &[upstream.addr], cache_yaml).await
}

fn asked(upstream: &FakeUpstream) -> usize {
    upstream.udp_queries() + upstream.tcp_queries()
}

async fn query(proxy: &Proxy, proto: Proto, name: &str, qtype: RecordType, dnssec_ok: bool) -> Message {
    exchange(proxy.addr, proto, &query_msg(name, qtype, Some(1232), dnssec_ok)).await
}

async fn ask(proxy: &Proxy, proto: Proto, name: &str) -> Message {
    query(proxy, proto, name, RecordType::A, false).await
}

/// Every sample of the proxy's metrics, by `name{labels}` as written.
fn samples(proxy: &Proxy) -> BTreeMap<String, f64> {
    let text = proxy.app.metrics().render(Vec::new(), true);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

fn ttls(msg: &Message) -> Vec<u32> {
    msg.answers.iter().chain(&msg.authorities).map(|r| r.ttl).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_question_is_answered_from_the_cache() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "").await;
    let before = samples(&proxy);

    let first = ask(&proxy, Proto::Udp, "www.example.test.").await;
    assert_eq!(answers(&first), ["A 192.0.2.10"]);
    assert_eq!(asked(&upstream), 1);
    // Another ID (the helper checks it is echoed), 0x20 case, and the other transport.
    for (proto, qname) in [
        (Proto::Udp, "wWw.ExAmPlE.tEsT."),
        (Proto::Tcp, "WWW.example.TEST."),
        (Proto::Tcp, "www.EXAMPLE.test."),
    ] {
        let hit = ask(&proxy, proto, qname).await;
        assert_eq!(asked(&upstream), 1, "{proto:?} {qname}: answered without the upstream");
        assert_eq!(hit.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answers(&hit), ["A 192.0.2.10"], "{proto:?} {qname}");
        let asked_name = Name::from_ascii(qname).unwrap();
        assert!(
            hit.queries[0].name().eq_case(&asked_name),
            "question case: {}",
            hit.queries[0].name()
        );
        assert!(
            hit.answers[0].name.eq_case(&asked_name),
            "owner case: {}",
            hit.answers[0].name
        );
        assert!(hit.metadata.recursion_available && hit.metadata.recursion_desired);
        assert!(hit.edns.is_some(), "{proto:?}: OPT for an EDNS query");
    }

    let after = samples(&proxy);
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta("meshdns_cache_misses_total"), 1.0);
    assert_eq!(delta("meshdns_cache_hits_total"), 3.0);
    assert_eq!(sample(&after, "meshdns_cache_entries"), 1.0);
    assert_eq!(delta("meshdns_cache_evictions_total"), 0.0);
    for (series, want) in [
        (
            r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="forwarded"}"#,
            1.0,
        ),
        (
            r#"meshdns_requests_total{protocol="udp",qtype="A",outcome="cache_hit"}"#,
            1.0,
        ),
        (
            r#"meshdns_requests_total{protocol="tcp",qtype="A",outcome="cache_hit"}"#,
            2.0,
        ),
    ] {
        assert_eq!(delta(series), want, "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_count_down_and_expired_answers_are_asked_again() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "cache:\n  maxTtl: 2s\n").await;
    // Both transports at once, each with its own name, so the test waits only once.
    let names = [(Proto::Udp, "www.example.test."), (Proto::Tcp, "other.example.test.")];
    for (proto, name) in names {
        // The upstream's own TTL (60) is relayed; the cache keeps the answer for at most 2 s.
        assert_eq!(ttls(&ask(&proxy, proto, name).await), [60], "{proto:?}");
        assert_eq!(ttls(&ask(&proxy, proto, name).await), [2], "{proto:?}: capped");
    }
    tokio::time::sleep(PAST_A_SECOND).await;
    for (proto, name) in names {
        assert_eq!(ttls(&ask(&proxy, proto, name).await), [1], "{proto:?}: a second spent");
    }
    assert_eq!(asked(&upstream), 2);
    tokio::time::sleep(PAST_A_SECOND).await;
    for (proto, name) in names {
        assert_eq!(ttls(&ask(&proxy, proto, name).await), [60], "{proto:?}: asked again");
    }
    assert_eq!(asked(&upstream), 4, "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_is_cached_with_its_soa() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "cache:\n  negativeMaxTtl: 1s\n").await;
    let first = ask(&proxy, Proto::Udp, "gone.example.test.").await;
    assert_eq!(first.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&first));
    for proto in BOTH {
        let hit = ask(&proxy, proto, "Gone.Example.Test.").await;
        assert_eq!(asked(&upstream), 1, "{proto:?}: from the cache");
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain, "{proto:?}");
        assert!(hit.answers.is_empty());
        assert!(has_soa(&hit), "{proto:?}: SOA kept for the client's negative caching");
        // The SOA's TTL (300) and minimum (300), capped at negativeMaxTtl.
        assert_eq!(ttls(&hit), [1], "{proto:?}");
    }
    tokio::time::sleep(PAST_A_SECOND).await;
    let again = ask(&proxy, Proto::Udp, "gone.example.test.").await;
    assert_eq!(again.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(asked(&upstream), 2, "asked again after negativeMaxTtl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_is_kept_only_for_servfail_ttl() {
    let upstream = FakeUpstream::start(records(), Behavior::ServFail).await;
    let proxy = start(&upstream, "cache:\n  servfailTtl: 500ms\n").await;
    for _ in 0..3 {
        let reply = ask(&proxy, Proto::Udp, "www.example.test.").await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }
    assert_eq!(asked(&upstream), 1, "SERVFAIL repeated from the cache");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = ask(&proxy, Proto::Udp, "www.example.test.").await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(asked(&upstream), 2, "asked again after servfailTtl");

    let uncached = start(&upstream, "cache:\n  servfailTtl: 0s\n").await;
    for i in 1..=2 {
        ask(&uncached, Proto::Udp, "www.example.test.").await;
        assert_eq!(asked(&upstream), 2 + i, "servfailTtl 0s: every SERVFAIL asked upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dnssec_ok_bit_gets_its_own_entry() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "").await;
    for (dnssec_ok, want_asked) in [(false, 1), (true, 2), (false, 2), (true, 2)] {
        let reply = query(&proxy, Proto::Udp, "www.example.test.", RecordType::A, dnssec_ok).await;
        assert_eq!(asked(&upstream), want_asked, "DO={dnssec_ok}");
        let edns = reply.edns.expect("OPT");
        assert_eq!(edns.flags().dnssec_ok, dnssec_ok, "DO echoed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_chases_share_the_cache() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "").await;
    let want = ["A 192.0.2.10", "CNAME www.example.test."];
    for proto in BOTH {
        let reply = ask(&proxy, proto, "alias.ext.svc.cluster.local.").await;
        assert_eq!(answers(&reply), want, "{proto:?}");
        // The target's address came from upstream: meshdns is not authoritative for it.
        assert!(!reply.metadata.authoritative, "{proto:?}: no AA on fetched data");
    }
    assert_eq!(asked(&upstream), 1, "the target was fetched once");
    // The chase's entry answers a client's own question about the target too.
    ask(&proxy, Proto::Udp, "www.example.test.").await;
    assert_eq!(asked(&upstream), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_max_entries_disables_the_cache() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "cache:\n  maxEntries: 0\n").await;
    let before = samples(&proxy);
    for (i, proto) in [Proto::Udp, Proto::Udp, Proto::Tcp].into_iter().enumerate() {
        let reply = ask(&proxy, proto, "www.example.test.").await;
        assert_eq!(answers(&reply), ["A 192.0.2.10"]);
        assert_eq!(asked(&upstream), i + 1, "{proto:?}: every query went upstream");
    }
    let after = samples(&proxy);
    for series in ["meshdns_cache_hits_total", "meshdns_cache_misses_total"] {
        assert_eq!(sample(&after, series), sample(&before, series), "{series}");
    }
    assert_eq!(sample(&after, "meshdns_cache_entries"), 0.0);
    assert!(proxy.app.cache().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_evicts_and_counts_it() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let proxy = start(&upstream, "cache:\n  maxEntries: 1\n").await;
    ask(&proxy, Proto::Udp, "www.example.test.").await;
    ask(&proxy, Proto::Udp, "other.example.test.").await;
    ask(&proxy, Proto::Udp, "www.example.test.").await;
    assert_eq!(asked(&upstream), 3, "each name pushed the other out");
    let after = samples(&proxy);
    assert_eq!(sample(&after, "meshdns_cache_evictions_total"), 2.0);
    assert_eq!(sample(&after, "meshdns_cache_entries"), 1.0);
    assert_eq!(sample(&after, "meshdns_cache_misses_total"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_empties_the_cache_and_applies_new_settings() {
    let upstream = FakeUpstream::start(records(), Behavior::Normal).await;
    let mut proxy = start(&upstream, "").await;
    ask(&proxy, Proto::Udp, "www.example.test.").await;
    ask(&proxy, Proto::Udp, "www.example.test.").await;
    assert_eq!(asked(&upstream), 1);
    assert_eq!(proxy.app.cache().len(), 1);

    // The same file with the cache turned off, read again as SIGHUP does.
    let specs: Vec<Spec> = clusters()
        .into_iter()
        .map(|c| Spec {
            name: c.name,
            local: c.local,
            src: Src::Dump(c.dump),
        })
        .collect();
    let path = write_config(proxy.dir.path(), &specs, &[upstream.addr], "cache:\n  maxEntries: 0\n");
    let config = Config::load(&path, &Overrides::default()).expect("config loads");
    proxy.app.reload(&config).await.expect("reload");
    assert!(proxy.app.cache().is_empty(), "emptied");
    assert_eq!(sample(&samples(&proxy), "meshdns_cache_entries"), 0.0);
    for i in 1..=2 {
        ask(&proxy, Proto::Udp, "www.example.test.").await;
        assert_eq!(asked(&upstream), 1 + i, "cache off after the reload");
    }
}
