//! Assembling a running meshdns from a validated [`Config`]: resolv.conf, cluster sources, the
//! hub that builds tables, the upstream forwarder and the DNS listeners. `main` and the
//! integration tests start meshdns the same way, through [`App::start`].

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{ClusterConfig, ClusterSource as SourceConfig, Config};
use crate::handler::DnsHandler;
use crate::hub::{ClusterMeta, Hub};
use crate::resolv::{ResolvConf, ResolvConfError};
use crate::server::{DnsServer, ServerError};
use crate::source::kubeconfig::{
    KubeconfigError, client_from_kubeconfig, in_cluster_client, parse_kubeconfig, read_kubeconfig,
};
use crate::source::live::KubeSource;
use crate::source::secrets::RemoteSecrets;
use crate::source::{ClusterSource, DumpError, DumpSource, SourceError, StaticSource, parse_dump};
use crate::table::TableSettings;
use crate::upstream::{Forwarder, UpstreamConfig};

#[derive(Debug, Error)]
pub enum AppError {
    #[error(transparent)]
    ResolvConf(#[from] ResolvConfError),
    #[error("no upstream resolvers: {0} lists no nameserver and none is configured (`upstreams` or --upstream)")]
    NoUpstreams(String),
    #[error("upstream {0} is also a listen address: meshdns would forward to itself")]
    UpstreamLoop(SocketAddr),
    #[error("cluster {cluster}: {source}")]
    Source { cluster: String, source: SourceError },
    #[error("cluster {cluster}: embedded dump: {source}")]
    Embedded { cluster: String, source: DumpError },
    #[error("cluster {cluster}: {source}")]
    Kubeconfig { cluster: String, source: KubeconfigError },
    #[error(transparent)]
    Bind(#[from] ServerError),
}

impl AppError {
    /// 2 for configuration and input problems (nothing was started), 1 for run-time failures
    /// such as an address already in use.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Bind(_) => 1,
            _ => 2,
        }
    }
}

/// A running meshdns.
pub struct App {
    server: DnsServer<DnsHandler<Forwarder>>,
    hub: Arc<Hub>,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    pub async fn start(config: &Config) -> Result<Self, AppError> {
        let mut resolv = match ResolvConf::read(&config.resolv_conf) {
            Ok(r) => r,
            // Explicit upstreams make resolv.conf optional: only the search domains are lost.
            Err(error) if config.upstreams.is_some() => {
                warn!(%error, "resolv.conf unreadable; search-domain short forms are off");
                ResolvConf::default()
            }
            Err(error) => return Err(error.into()),
        };
        for warning in &resolv.warnings {
            warn!(path = %config.resolv_conf.display(), %warning, "resolv.conf line skipped");
        }
        if let Some(search) = &config.search {
            resolv.search = search.clone();
        }
        let upstreams = match &config.upstreams {
            Some(list) => list.clone(),
            None if resolv.nameservers.is_empty() => {
                return Err(AppError::NoUpstreams(config.resolv_conf.display().to_string()));
            }
            None => resolv.nameservers.clone(),
        };
        if let Some(up) = upstreams.iter().find(|u| config.listen.contains(u)) {
            return Err(AppError::UpstreamLoop(*up));
        }
        info!(upstreams = ?upstreams, search = ?resolv.search, "upstreams and search domains");

        let mut sources: Vec<(ClusterMeta, Box<dyn ClusterSource>)> = Vec::new();
        for cluster in &config.clusters {
            let source = open_source(cluster).await?;
            info!(cluster = %cluster.name, local = cluster.local, source = %cluster.source, "cluster configured");
            let meta = ClusterMeta {
                name: cluster.name.clone(),
                local: cluster.local,
                gateway_override: cluster.gateway.addresses.clone(),
                source: cluster.source.to_string(),
            };
            sources.push((meta, source));
        }

        let settings = TableSettings {
            cluster_domain: config.cluster_domain.clone(),
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            search: resolv.search.clone(),
        };
        let hub = Hub::new(settings);
        let mut tasks = Vec::new();
        for (meta, source) in sources {
            let handle = hub.add_cluster(meta);
            tasks.push(tokio::spawn(source.run(handle)));
        }
        if let Some(dir) = &config.remote_secrets_dir {
            let reserved = config.clusters.iter().map(|c| c.name.clone()).collect();
            let mut secrets = RemoteSecrets::new(dir, config.local_cluster(), reserved, Arc::clone(&hub));
            info!(dir = %dir.display(), "watching remote secrets");
            secrets.scan().await;
            tasks.push(tokio::spawn(secrets.run()));
        }
        if !hub.wait_loaded(config.startup_wait).await {
            let missing: Vec<String> = hub.status().into_iter().filter(|s| !s.loaded).map(|s| s.name).collect();
            warn!(?missing, wait = ?config.startup_wait, "not every cluster loaded in time; serving what is known and forwarding the rest");
        }
        hub.rebuild();
        tasks.push(tokio::spawn(Arc::clone(&hub).run()));

        let forwarder = Forwarder::from_parts(UpstreamConfig {
            servers: upstreams,
            try_timeout: config.upstream_timeout,
            deadline: config.upstream_deadline,
        });
        let handler = DnsHandler::new(hub.table(), Arc::new(forwarder));
        let server = match DnsServer::bind(&config.listen, handler, config.tcp_idle_timeout).await {
            Ok(server) => server,
            Err(error) => {
                tasks.iter().for_each(JoinHandle::abort);
                return Err(error.into());
            }
        };
        info!(names = hub.table().load().len(), "meshdns ready");
        Ok(Self { server, hub, tasks })
    }

    /// The addresses the DNS server listens on (UDP and TCP share each).
    pub fn dns_addrs(&self) -> &[SocketAddr] {
        self.server.local_addrs()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens a configured cluster's source. Files are read here, so a broken one fails start-up;
/// an API server that cannot be reached is not an error (its watcher retries with backoff).
async fn open_source(cluster: &ClusterConfig) -> Result<Box<dyn ClusterSource>, AppError> {
    let selector = cluster.gateway.selector.clone();
    let kube_err = |source| AppError::Kubeconfig {
        cluster: cluster.name.clone(),
        source,
    };
    Ok(match &cluster.source {
        SourceConfig::Objects(path) => {
            Box::new(DumpSource::new(path, selector).map_err(|source| AppError::Source {
                cluster: cluster.name.clone(),
                source,
            })?)
        }
        SourceConfig::Embedded(text) => {
            let state = parse_dump(text.as_bytes(), &selector).map_err(|source| AppError::Embedded {
                cluster: cluster.name.clone(),
                source,
            })?;
            Box::new(StaticSource::from_parts(state))
        }
        SourceConfig::Kubeconfig(path) => {
            let text = read_kubeconfig(path).map_err(kube_err)?;
            // The operator wrote this file; only remote secrets get the untrusted rules.
            let config = parse_kubeconfig(&text, false).map_err(kube_err)?;
            let client = client_from_kubeconfig(config).await.map_err(kube_err)?;
            Box::new(KubeSource::from_parts(client, selector))
        }
        SourceConfig::InCluster => Box::new(KubeSource::from_parts(in_cluster_client().map_err(kube_err)?, selector)),
    })
}
