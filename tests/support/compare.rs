//! What the tests that compare two ways of answering share: the demo table and a canonical
//! form of a reply.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use meshdns::cluster::{DEFAULT_GATEWAY_SELECTOR, LabelSelector};
use meshdns::hub::SharedTable;
use meshdns::source::parse_dump;
use meshdns::table::{ClusterInput, Table, TableSettings};

/// The embedded demo's two clusters, both loaded, as the `sleep` pod sees them.
pub fn demo_table() -> SharedTable {
    let selector = LabelSelector::parse(DEFAULT_GATEWAY_SELECTOR).unwrap();
    let one = parse_dump(meshdns::demo::CLUSTER_1.as_bytes(), &selector).unwrap();
    let two = parse_dump(meshdns::demo::CLUSTER_2.as_bytes(), &selector).unwrap();
    let settings = TableSettings {
        cluster_domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        search: meshdns::demo::SEARCH.iter().map(ToString::to_string).collect(),
    };
    let input = |name, local, state| ClusterInput {
        name,
        local,
        state,
        loaded: true,
        gateway_override: None,
    };
    let inputs = [input("cluster-1", true, &one), input("cluster-2", false, &two)];
    Arc::new(ArcSwap::from_pointee(Table::build(&settings, &inputs, 1).0))
}

/// A strictly read reply in byte form with the order of records inside each section made
/// canonical and names expanded ([`super::strict::wire_form`]); hickory's decoding is also
/// required to succeed, as the clients of the two paths decode with it.
pub fn canonical(bytes: &[u8]) -> String {
    Message::from_vec(bytes).expect("reply parses");
    super::strict::wire_form(bytes)
}

/// Spells `name` in mixed case, as 0x20-randomising resolvers do.
pub fn mixed_case(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c })
        .collect()
}
