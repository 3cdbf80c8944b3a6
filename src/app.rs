//! Assembling a running meshdns from a validated [`Config`]: resolv.conf, cluster sources, the
//! hub that builds tables, the upstream forwarder and its response cache, the admin server and
//! the DNS listeners.
//! `main` and the integration tests start meshdns the same way, through [`App::start`];
//! `meshdns explain` loads the same sources through [`Sources::open`] without binding anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::admin::{AdminError, AdminServer, AdminState, Readiness};
use crate::cache::Cache;
use crate::config::{ClusterConfig, ClusterSource as SourceConfig, Config};
use crate::handler::DnsHandler;
use crate::hub::{ClusterMeta, Hub};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::resolv::{ResolvConf, ResolvConfError};
use crate::server::{DnsServer, ServerError, ServerSettings};
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
    Embedded { cluster: String, source: Box<DumpError> },
    #[error("cluster {cluster}: {source}")]
    Kubeconfig { cluster: String, source: KubeconfigError },
    #[error(transparent)]
    Bind(#[from] ServerError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

impl AppError {
    /// 2 for configuration and input problems (nothing was started), 1 for run-time failures
    /// such as an address already in use.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Bind(_) | Self::Admin(_) => 1,
            _ => 2,
        }
    }
}

/// What the pod's resolv.conf and the config make of upstreams and search domains.
#[derive(Clone, Debug)]
pub struct ResolvSettings {
    pub upstreams: Vec<SocketAddr>,
    pub settings: TableSettings,
}

impl ResolvSettings {
    /// Reads resolv.conf (optional when upstreams are configured) and applies the config.
    pub fn read(config: &Config) -> Result<Self, AppError> {
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
        Ok(Self {
            upstreams,
            settings: TableSettings {
                cluster_domain: config.cluster_domain.clone(),
                ttl: config.ttl,
                negative_ttl: config.negative_ttl,
                search: resolv.search,
            },
        })
    }

    fn upstream_config(&self, config: &Config) -> UpstreamConfig {
        UpstreamConfig {
            servers: self.upstreams.clone(),
            try_timeout: config.upstream_timeout,
            deadline: config.upstream_deadline,
        }
    }
}

/// The configured clusters' sources, running and publishing into a hub.
pub struct Sources {
    pub hub: Arc<Hub>,
    pub resolution: ResolvSettings,
    /// One task per cluster of the config file, by name.
    clusters: BTreeMap<String, JoinHandle<()>>,
    /// The remote-secrets watcher.
    others: Vec<JoinHandle<()>>,
}

impl Sources {
    /// Reads resolv.conf, opens every configured source (files are read here, so a broken one
    /// fails now) and starts them publishing into a new hub. Nothing is bound.
    pub async fn open(config: &Config, metrics: Arc<Metrics>) -> Result<Self, AppError> {
        let resolution = ResolvSettings::read(config)?;
        info!(upstreams = ?resolution.upstreams, search = ?resolution.settings.search, "upstreams and search domains");
        let mut opened = Vec::with_capacity(config.clusters.len());
        for cluster in &config.clusters {
            let source = open_source(cluster).await?;
            info!(cluster = %cluster.name, local = cluster.local, source = %cluster.source, "cluster configured");
            opened.push((cluster, source));
        }
        let hub = Hub::with_metrics(resolution.settings.clone(), metrics);
        let mut clusters = BTreeMap::new();
        for (cluster, source) in opened {
            let handle = hub.add_cluster(meta(cluster));
            clusters.insert(cluster.name.clone(), tokio::spawn(source.run(handle)));
        }
        let mut others = Vec::new();
        if let Some(dir) = &config.remote_secrets_dir {
            let reserved = config.clusters.iter().map(|c| c.name.clone()).collect();
            let mut secrets = RemoteSecrets::new(dir, config.local_cluster(), reserved, Arc::clone(&hub));
            info!(dir = %dir.display(), "watching remote secrets");
            secrets.scan().await;
            others.push(tokio::spawn(secrets.run()));
        }
        Ok(Self {
            hub,
            resolution,
            clusters,
            others,
        })
    }

    /// Waits for every cluster's first state, at most `limit`, and builds the first table.
    /// Returns whether every cluster loaded.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        info!(clusters = self.hub.status().len(), wait = ?limit, "waiting for every cluster's first state");
        let all = self.hub.wait_loaded(limit).await;
        if !all {
            let missing: Vec<String> = self
                .hub
                .status()
                .into_iter()
                .filter(|s| !s.loaded)
                .map(|s| s.name)
                .collect();
            warn!(?missing, wait = ?limit, "not every cluster loaded in time; serving what is known and forwarding the rest");
        }
        self.hub.rebuild();
        all
    }

    pub fn stop(&mut self) {
        for task in self.clusters.values().chain(&self.others) {
            task.abort();
        }
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running meshdns.
pub struct App {
    /// The config in force; fields that need a restart keep their start-up values.
    config: Config,
    sources: Sources,
    server: DnsServer,
    admin: Option<AdminServer>,
    forwarder: Arc<Forwarder>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    builder: JoinHandle<()>,
}

impl App {
    pub async fn start(config: &Config) -> Result<Self, AppError> {
        let metrics = Arc::new(Metrics::new());
        let sources = Sources::open(config, Arc::clone(&metrics)).await?;
        let forwarder = Arc::new(Forwarder::with_metrics(
            sources.resolution.upstream_config(config),
            Arc::clone(&metrics),
        ));
        let readiness = Readiness::default();
        // The admin server comes up before the wait, so probes see start-up progress.
        let admin = match config.admin {
            Some(addr) => {
                let state = AdminState {
                    hub: Arc::clone(&sources.hub),
                    metrics: Arc::clone(&metrics),
                    readiness: readiness.clone(),
                    forwarder: Arc::clone(&forwarder),
                };
                Some(AdminServer::bind(addr, state).await?)
            }
            None => None,
        };
        sources.wait_loaded(config.startup_wait).await;
        let builder = tokio::spawn(Arc::clone(&sources.hub).run());

        let cache = Arc::new(Cache::with_metrics(config.cache, Arc::clone(&metrics)));
        let handler = DnsHandler::with_metrics(sources.hub.table(), Arc::clone(&forwarder), Arc::clone(&metrics))
            .with_cache(Arc::clone(&cache))
            .with_udp_payload(config.max_udp_payload);
        let settings = ServerSettings {
            fast_path: Some(sources.hub.table()),
            relay: Some(Arc::new(
                Relay::new(Arc::clone(&forwarder), Arc::clone(&cache), Arc::clone(&metrics))
                    .with_udp_payload(config.max_udp_payload),
            )),
            udp_payload: config.max_udp_payload,
            max_udp_in_flight: config.limits.udp_in_flight,
            max_tcp_connections: config.limits.tcp_connections,
            max_tcp_pipeline: config.limits.tcp_pipeline,
            ..ServerSettings::new(config.tcp_idle_timeout, Arc::clone(&metrics))
        };
        let server = match DnsServer::bind(&config.listen, handler, settings).await {
            Ok(server) => server,
            Err(error) => {
                builder.abort();
                if let Some(admin) = admin {
                    admin.shutdown();
                }
                return Err(error.into());
            }
        };
        readiness.set(true);
        info!(names = sources.hub.table().load().len(), "meshdns ready");
        Ok(Self {
            config: config.clone(),
            sources,
            server,
            admin,
            forwarder,
            cache,
            metrics,
            readiness,
            builder,
        })
    }

    /// The addresses the DNS server listens on (UDP and TCP share each).
    pub fn dns_addrs(&self) -> &[SocketAddr] {
        self.server.local_addrs()
    }

    /// Where the admin server listens, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.sources.hub
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The upstream response cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Applies a re-read config: clusters are added, removed or restarted, and the upstreams,
    /// TTLs, search path, cache settings and drain time take effect at once; the response cache
    /// is emptied, so no answer of an old upstream outlives the reload. Settings that only take
    /// effect at start-up are logged. On any error nothing is changed.
    pub async fn reload(&mut self, new: &Config) -> Result<(), AppError> {
        let result = self.apply(new).await;
        self.metrics.config_reloaded(result.is_ok());
        result
    }

    async fn apply(&mut self, new: &Config) -> Result<(), AppError> {
        let resolution = ResolvSettings::read(new)?;
        let old: BTreeMap<&str, &ClusterConfig> = self.config.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
        // Every new or changed source is opened before anything is applied.
        let mut opened = Vec::new();
        for cluster in &new.clusters {
            if old.get(cluster.name.as_str()) != Some(&cluster) {
                opened.push((cluster, open_source(cluster).await?));
            }
        }
        let hub = Arc::clone(&self.sources.hub);
        for name in old.keys().filter(|n| !new.clusters.iter().any(|c| c.name == **n)) {
            if let Some(task) = self.sources.clusters.remove(*name) {
                task.abort();
            }
            hub.remove_cluster(name);
        }
        for (cluster, source) in opened {
            if let Some(task) = self.sources.clusters.remove(&cluster.name) {
                task.abort();
                info!(cluster = %cluster.name, source = %cluster.source, "cluster changed; restarting its source");
            } else {
                info!(cluster = %cluster.name, local = cluster.local, source = %cluster.source, "cluster added");
            }
            let handle = hub.add_cluster(meta(cluster));
            self.sources
                .clusters
                .insert(cluster.name.clone(), tokio::spawn(source.run(handle)));
        }
        hub.set_settings(resolution.settings.clone());
        self.forwarder.set_config(resolution.upstream_config(new));
        self.cache.reset(new.cache);
        info!(upstreams = ?resolution.upstreams, search = ?resolution.settings.search, ttl = new.ttl, cache = ?new.cache, "config re-read and applied; response cache emptied");

        let mut restart = Vec::new();
        let mut applied = new.clone();
        macro_rules! keep {
            ($field:ident, $key:literal) => {
                if applied.$field != self.config.$field {
                    restart.push($key);
                    applied.$field = self.config.$field.clone();
                }
            };
        }
        keep!(listen, "listen");
        keep!(admin, "admin");
        keep!(worker_threads, "workerThreads");
        keep!(tcp_idle_timeout, "tcpIdleTimeout");
        keep!(max_udp_payload, "maxUdpPayload");
        keep!(limits, "limits");
        keep!(remote_secrets_dir, "remoteSecretsDir");
        if !restart.is_empty() {
            warn!(fields = ?restart, "changed in the config file; these take effect after a restart");
        }
        self.config = applied;
        self.sources.resolution = resolution;
        Ok(())
    }

    /// Stops reading queries, answers those already received (at most `drainTimeout`), then
    /// stops everything else.
    pub async fn shutdown(mut self) {
        self.readiness.set(false);
        info!(drain = ?self.config.drain_timeout, "draining: answering the queries already received");
        self.server.shutdown(self.config.drain_timeout).await;
        if let Some(admin) = self.admin.take() {
            admin.shutdown();
        }
        self.builder.abort();
        self.sources.stop();
    }
}

fn meta(cluster: &ClusterConfig) -> ClusterMeta {
    ClusterMeta {
        name: cluster.name.clone(),
        local: cluster.local,
        gateway_override: cluster.gateway.addresses.clone(),
        source: cluster.source.to_string(),
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
                source: Box::new(source),
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
