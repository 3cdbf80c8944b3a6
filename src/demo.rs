//! The embedded demo: the two clusters of the Istio multicluster walkthrough (`helloworld` v1
//! and `sleep` in cluster-1; `helloworld` v2, an east-west gateway at 34.136.67.85 and the
//! cluster-2-only `httpbin` in cluster-2), served without any cluster or file, as the sidecar of
//! the `sleep` pod would see it.

use std::path::Path;

use crate::config::{ClusterSource, Config, ConfigError, FileCluster, FileConfig, Overrides};

pub const CLUSTER_1: &str = include_str!("demo/cluster-1.yaml");
pub const CLUSTER_2: &str = include_str!("demo/cluster-2.yaml");
/// The search path kubelet writes into the resolv.conf of a pod in namespace `sleep`.
pub const SEARCH: [&str; 3] = ["sleep.svc.cluster.local", "svc.cluster.local", "cluster.local"];

/// The demo's configuration; the command-line overrides apply as they do for `serve`.
/// Upstreams default to the machine's resolv.conf, like a real pod's; the search path is the
/// `sleep` pod's, so short names behave as they would there.
pub fn config(overrides: &Overrides) -> Result<Config, ConfigError> {
    let cluster = |name: &str, local| FileCluster {
        name: name.to_string(),
        local,
        objects: Some(format!("<embedded {name}>").into()),
        ..FileCluster::default()
    };
    let file = FileConfig {
        clusters: vec![cluster("cluster-1", true), cluster("cluster-2", false)],
        search: Some(SEARCH.iter().map(ToString::to_string).collect()),
        ..FileConfig::default()
    };
    let mut config = Config::from_parts(None, Path::new("/"), file, overrides)?;
    for cluster in &mut config.clusters {
        cluster.source = ClusterSource::Embedded(if cluster.local { CLUSTER_1 } else { CLUSTER_2 });
    }
    Ok(config)
}
