//! Where cluster states meet: every source publishes its cluster's latest state here, and one
//! builder task turns the set of states into a new [`Table`] and swaps it in atomically.
//! Bursts of updates are coalesced into one rebuild; readers never wait for a build.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::cluster::{ClusterState, Ingress};
use crate::config::ClusterConfig;
use crate::table::{ClusterInput, Table, TableSettings};

/// How long the builder waits after the first change of a burst before it rebuilds, so that a
/// relist or a rolling update costs one rebuild instead of hundreds.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(10);

/// The shared, lock-free handle to the current table.
pub type SharedTable = Arc<ArcSwap<Table>>;

#[derive(Debug)]
struct ClusterMeta {
    name: String,
    local: bool,
    gateway_override: Option<Vec<Ingress>>,
}

#[derive(Debug, Default)]
struct Slot {
    state: Arc<ClusterState>,
    loaded: bool,
    last_error: Option<String>,
}

/// What the hub knows of one cluster, for status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatus {
    pub name: String,
    pub local: bool,
    pub loaded: bool,
    pub services: usize,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct Hub {
    settings: TableSettings,
    clusters: Vec<ClusterMeta>,
    slots: Mutex<Vec<Slot>>,
    table: SharedTable,
    dirty: Notify,
    /// Signalled whenever a cluster becomes loaded, for start-up to wait on.
    loaded_changed: Notify,
    generation: AtomicU64,
    /// Clusters already reported as having no gateway, so the log says it once per change.
    warned_no_gateway: Mutex<BTreeSet<String>>,
}

impl Hub {
    pub fn new(settings: TableSettings, clusters: &[ClusterConfig]) -> Arc<Self> {
        let meta: Vec<ClusterMeta> = clusters
            .iter()
            .map(|c| ClusterMeta {
                name: c.name.clone(),
                local: c.local,
                gateway_override: c.gateway.addresses.clone(),
            })
            .collect();
        let slots = meta.iter().map(|_| Slot::default()).collect();
        let table = Arc::new(ArcSwap::from_pointee(Table::empty(&settings)));
        Arc::new(Self {
            settings,
            clusters: meta,
            slots: Mutex::new(slots),
            table,
            dirty: Notify::new(),
            loaded_changed: Notify::new(),
            generation: AtomicU64::new(0),
            warned_no_gateway: Mutex::new(BTreeSet::new()),
        })
    }

    /// The table readers load from; cloning it is cheap and it always shows the latest build.
    pub fn table(&self) -> SharedTable {
        Arc::clone(&self.table)
    }

    /// The handle a source of the named cluster publishes through.
    pub fn handle(self: &Arc<Self>, cluster: &str) -> Option<ClusterHandle> {
        let index = self.clusters.iter().position(|c| c.name == cluster)?;
        Some(ClusterHandle {
            hub: Arc::clone(self),
            index,
        })
    }

    pub fn status(&self) -> Vec<ClusterStatus> {
        let slots = self.slots();
        self.clusters
            .iter()
            .zip(slots.iter())
            .map(|(meta, slot)| ClusterStatus {
                name: meta.name.clone(),
                local: meta.local,
                loaded: slot.loaded,
                services: slot.state.services.len(),
                last_error: slot.last_error.clone(),
            })
            .collect()
    }

    /// Waits until every cluster has delivered its first state, or `limit` passes; tells which.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.loaded_changed.notified();
            if self.slots().iter().all(|s| s.loaded) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Builds a table from the current states and publishes it.
    pub fn rebuild(&self) {
        let started = Instant::now();
        let snapshot: Vec<(Arc<ClusterState>, bool)> =
            self.slots().iter().map(|s| (Arc::clone(&s.state), s.loaded)).collect();
        let inputs: Vec<ClusterInput<'_>> = self
            .clusters
            .iter()
            .zip(snapshot.iter())
            .map(|(meta, (state, loaded))| ClusterInput {
                name: &meta.name,
                local: meta.local,
                state,
                loaded: *loaded,
                gateway_override: meta.gateway_override.as_deref(),
            })
            .collect();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (table, report) = Table::build(&self.settings, &inputs, generation);
        for skipped in &report.skipped {
            warn!(service = %skipped, "service name is not a valid DNS name; left out of the table");
        }
        {
            let mut warned = self
                .warned_no_gateway
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for cluster in report.clusters_without_gateway.difference(&warned) {
                warn!(cluster = %cluster, "remote cluster has no east-west gateway address; its services are not answered");
            }
            *warned = report.clusters_without_gateway;
        }
        let names = table.len();
        let all_loaded = table.all_loaded();
        self.table.store(Arc::new(table));
        debug!(
            generation,
            names,
            all_loaded,
            elapsed_us = started.elapsed().as_micros() as u64,
            "table rebuilt"
        );
    }

    /// Rebuilds whenever sources publish, coalescing bursts. Runs until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.dirty.notified().await;
            tokio::time::sleep(COALESCE_WINDOW).await;
            self.rebuild();
        }
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving it.
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A source's way to publish one cluster's state.
#[derive(Clone, Debug)]
pub struct ClusterHandle {
    hub: Arc<Hub>,
    index: usize,
}

impl ClusterHandle {
    pub fn cluster(&self) -> &str {
        &self.hub.clusters[self.index].name
    }

    /// Replaces the cluster's state; the cluster counts as loaded from now on.
    pub fn publish(&self, state: ClusterState) {
        let services = state.services.len();
        let first = {
            let mut slots = self.hub.slots();
            let slot = &mut slots[self.index];
            let first = !slot.loaded;
            slot.state = Arc::new(state);
            slot.loaded = true;
            slot.last_error = None;
            first
        };
        if first {
            self.hub.loaded_changed.notify_waiters();
            info!(cluster = self.cluster(), services, "cluster loaded");
        } else {
            debug!(cluster = self.cluster(), services, "cluster state updated");
        }
        self.hub.dirty.notify_one();
    }

    /// Records a failure to refresh the cluster; its last good state keeps being served.
    pub fn report_error(&self, error: &dyn Display) {
        warn!(cluster = self.cluster(), %error, "cluster state not updated; keeping the last good state");
        self.hub.slots()[self.index].last_error = Some(error.to_string());
    }
}
