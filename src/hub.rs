//! Where cluster states meet: every source publishes its cluster's latest state here, and one
//! builder task turns the set of states into a new [`Table`] and swaps it in atomically.
//! Bursts of updates are coalesced into one rebuild; readers never wait for a build. Clusters
//! can join and leave at run time (remote secrets change), each under a fresh handle so that a
//! source that was replaced cannot publish into its successor's slot.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::cluster::{ClusterState, Ingress, RefusedGateway, partition_gateways};
use crate::metrics::Metrics;
use crate::table::{ClusterInput, Table, TableSettings};

/// How long the builder waits after the first change of a burst before it rebuilds, so that a
/// relist or a rolling update costs one rebuild instead of hundreds.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(10);

/// The shared, lock-free handle to the current table.
pub type SharedTable = Arc<ArcSwap<Table>>;

/// What the table builder needs to know about a cluster besides its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMeta {
    pub name: String,
    pub local: bool,
    /// Static gateway addresses from the config, replacing what the cluster reports.
    pub gateway_override: Option<Vec<Ingress>>,
    /// Where the state comes from, for status reports.
    pub source: String,
}

#[derive(Debug)]
struct Slot {
    meta: ClusterMeta,
    /// Distinguishes this registration from an earlier one under the same name.
    epoch: u64,
    state: Arc<ClusterState>,
    loaded: bool,
    /// The source failed since its last successful update: serving the last known state.
    stale: bool,
    last_error: Option<String>,
    last_update: Option<Instant>,
    /// Failures reported by the source since the cluster was registered.
    errors: u64,
}

/// What the hub knows of one cluster, for status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatus {
    pub name: String,
    pub local: bool,
    pub source: String,
    pub loaded: bool,
    pub stale: bool,
    pub services: usize,
    pub last_error: Option<String>,
    /// When the source last delivered a state or reported itself current.
    pub last_update: Option<Instant>,
    /// Failures reported by the source since the cluster was registered.
    pub errors: u64,
    /// The gateway addresses remote names of this cluster are answered with: the configured
    /// ones, or else those the cluster reports, less the refused ones.
    pub gateways: Vec<Ingress>,
    /// Gateway addresses never answered (loopback, link-local, ...), with the reason.
    pub refused_gateways: Vec<RefusedGateway>,
}

/// What the last rebuild reported, to log only what changed since.
#[derive(Debug, Default)]
struct Warned {
    without_gateway: BTreeSet<String>,
    skipped: BTreeSet<String>,
    refused_gateways: BTreeMap<String, BTreeSet<RefusedGateway>>,
}

#[derive(Debug)]
pub struct Hub {
    /// Replaced when a re-read config changes the TTLs, the search path or the domain.
    settings: Mutex<Arc<TableSettings>>,
    slots: Mutex<BTreeMap<String, Slot>>,
    table: SharedTable,
    dirty: Notify,
    /// Signalled whenever a cluster becomes loaded, for start-up to wait on.
    loaded_changed: Notify,
    generation: AtomicU64,
    epochs: AtomicU64,
    /// Problems already logged, so each is logged when it appears, not on every rebuild.
    warned: Mutex<Warned>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(settings: TableSettings) -> Arc<Self> {
        Self::with_metrics(settings, Arc::new(Metrics::new()))
    }

    /// A hub that records its rebuilds in `metrics`.
    pub fn with_metrics(settings: TableSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let table = Arc::new(ArcSwap::from_pointee(Table::empty(&settings)));
        Arc::new(Self {
            settings: Mutex::new(Arc::new(settings)),
            slots: Mutex::new(BTreeMap::new()),
            table,
            dirty: Notify::new(),
            loaded_changed: Notify::new(),
            generation: AtomicU64::new(0),
            epochs: AtomicU64::new(0),
            warned: Mutex::new(Warned::default()),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn settings(&self) -> Arc<TableSettings> {
        Arc::clone(&self.settings.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Replaces the table settings; the next rebuild uses them.
    pub fn set_settings(&self, settings: TableSettings) {
        *self.settings.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(settings);
        self.dirty.notify_one();
    }

    /// The table readers load from; cloning it is cheap and it always shows the latest build.
    pub fn table(&self) -> SharedTable {
        Arc::clone(&self.table)
    }

    /// Registers a cluster (replacing any earlier one of that name, whose handle goes dead) and
    /// returns the handle its source publishes through. The cluster counts as not loaded until
    /// its first state arrives, so names it might hold are not denied meanwhile.
    pub fn add_cluster(self: &Arc<Self>, meta: ClusterMeta) -> ClusterHandle {
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let name = meta.name.clone();
        let slot = Slot {
            meta,
            epoch,
            state: Arc::default(),
            loaded: false,
            stale: false,
            last_error: None,
            last_update: None,
            errors: 0,
        };
        self.slots().insert(name.clone(), slot);
        self.dirty.notify_one();
        ClusterHandle {
            hub: Arc::clone(self),
            name,
            epoch,
        }
    }

    /// Removes a cluster and its names from the table.
    pub fn remove_cluster(&self, name: &str) {
        if self.slots().remove(name).is_some() {
            info!(cluster = name, "cluster removed");
            self.dirty.notify_one();
            self.loaded_changed.notify_waiters();
        }
    }

    pub fn status(&self) -> Vec<ClusterStatus> {
        let settings = self.settings();
        self.slots()
            .values()
            .map(|slot| {
                // The rule the table builder applies, so the page shows what is answered.
                let (gateways, refused_gateways) = partition_gateways(
                    &slot
                        .meta
                        .gateway_override
                        .clone()
                        .unwrap_or_else(|| slot.state.gateway_addresses()),
                    &settings.cluster_domain,
                );
                ClusterStatus {
                    name: slot.meta.name.clone(),
                    local: slot.meta.local,
                    source: slot.meta.source.clone(),
                    loaded: slot.loaded,
                    stale: slot.stale,
                    services: slot.state.services.len(),
                    last_error: slot.last_error.clone(),
                    last_update: slot.last_update,
                    errors: slot.errors,
                    gateways,
                    refused_gateways,
                }
            })
            .collect()
    }

    /// Waits until every registered cluster has delivered its first state, or `limit` passes;
    /// tells which.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.loaded_changed.notified();
            if self.slots().values().all(|s| s.loaded) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Builds a table from the current states and publishes it. Returns how long it took.
    pub fn rebuild(&self) -> Duration {
        let started = Instant::now();
        let snapshot: Vec<(ClusterMeta, Arc<ClusterState>, bool)> = self
            .slots()
            .values()
            .map(|s| (s.meta.clone(), Arc::clone(&s.state), s.loaded))
            .collect();
        let inputs: Vec<ClusterInput<'_>> = snapshot
            .iter()
            .map(|(meta, state, loaded)| ClusterInput {
                name: &meta.name,
                local: meta.local,
                state,
                loaded: *loaded,
                gateway_override: meta.gateway_override.as_deref(),
            })
            .collect();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let settings = self.settings();
        let (table, report) = Table::build(&settings, &inputs, generation);
        {
            // Each problem is logged when it appears, not on every rebuild.
            let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for cluster in report.clusters_without_gateway.difference(&warned.without_gateway) {
                warn!(cluster = %cluster, "remote cluster has no east-west gateway address; its services are not answered");
            }
            for service in report.skipped.difference(&warned.skipped) {
                warn!(%service, "service name is not a valid DNS name; left out of the table");
            }
            for (cluster, refused) in &report.refused_gateways {
                if warned.refused_gateways.get(cluster) != Some(refused) {
                    let refused: Vec<String> = refused.iter().map(ToString::to_string).collect();
                    warn!(
                        cluster = %cluster,
                        refused = %refused.join(", "),
                        "remote cluster reports east-west gateway addresses that are never answered"
                    );
                }
            }
            *warned = Warned {
                without_gateway: report.clusters_without_gateway,
                skipped: report.skipped,
                refused_gateways: report.refused_gateways,
            };
        }
        let names = table.len();
        let all_loaded = table.all_loaded();
        self.table.store(Arc::new(table));
        let elapsed = started.elapsed();
        self.metrics.table_rebuilt(names, elapsed);
        debug!(
            generation,
            names,
            all_loaded,
            elapsed_us = elapsed.as_micros() as u64,
            "table rebuilt"
        );
        elapsed
    }

    /// Rebuilds whenever sources publish, coalescing bursts. Runs until the task is dropped.
    ///
    /// A build of tens of thousands of names takes tens of milliseconds, so it runs on the
    /// blocking pool: the runtime's worker (one, by default) keeps answering from the table
    /// in force meanwhile instead of stalling every query for the length of the build.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.dirty.notified().await;
            tokio::time::sleep(COALESCE_WINDOW).await;
            let hub = Arc::clone(&self);
            if let Err(error) = tokio::task::spawn_blocking(move || hub.rebuild()).await {
                warn!(%error, "table rebuild did not finish; the table in force stays");
            }
        }
    }

    fn slots(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving it.
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A source's way to publish one cluster's state. It goes dead (its calls do nothing) once the
/// cluster is removed or registered again.
#[derive(Clone, Debug)]
pub struct ClusterHandle {
    hub: Arc<Hub>,
    name: String,
    epoch: u64,
}

impl ClusterHandle {
    pub fn cluster(&self) -> &str {
        &self.name
    }

    fn with_slot<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> Option<T> {
        let mut slots = self.hub.slots();
        slots.get_mut(&self.name).filter(|s| s.epoch == self.epoch).map(f)
    }

    /// Replaces the cluster's state; the cluster counts as loaded from now on.
    pub fn publish(&self, state: ClusterState) {
        let services = state.services.len();
        let Some((first, was_stale)) = self.with_slot(|slot| {
            let first = !slot.loaded;
            let was_stale = slot.stale;
            slot.state = Arc::new(state);
            slot.loaded = true;
            slot.stale = false;
            slot.last_error = None;
            slot.last_update = Some(Instant::now());
            (first, was_stale)
        }) else {
            return;
        };
        if first {
            self.hub.loaded_changed.notify_waiters();
            info!(cluster = %self.name, services, "cluster loaded");
        } else if was_stale {
            info!(cluster = %self.name, services, "cluster state current again");
        } else {
            debug!(cluster = %self.name, services, "cluster state updated");
        }
        self.hub.dirty.notify_one();
    }

    /// The source is healthy again without a state change to publish (e.g. a watch reconnected).
    pub fn mark_current(&self) {
        let was_stale = self
            .with_slot(|slot| {
                let was = slot.stale && slot.loaded;
                slot.stale = false;
                slot.last_error = None;
                slot.last_update = Some(Instant::now());
                was
            })
            .unwrap_or(false);
        if was_stale {
            info!(cluster = %self.name, "cluster state current again");
        }
    }

    /// Records a failure to refresh the cluster; its last good state keeps being served.
    pub fn report_error(&self, error: &dyn Display) {
        let newly_stale = self
            .with_slot(|slot| {
                let newly = !slot.stale;
                slot.stale = true;
                slot.errors += 1;
                slot.last_error = Some(error.to_string());
                newly
            })
            .unwrap_or(false);
        if newly_stale {
            warn!(cluster = %self.name, %error, "cluster state is stale: serving the last known state");
        } else {
            debug!(cluster = %self.name, %error, "cluster source still failing");
        }
    }

    /// Whether this handle still owns its cluster's slot.
    pub fn is_current(&self) -> bool {
        self.with_slot(|_| ()).is_some()
    }
}
