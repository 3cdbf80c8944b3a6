//! Remote clusters from Istio remote secrets. The secret (`istioctl create-remote-secret`,
//! label `istio/multiCluster=true`) is mounted as a volume: one file per remote cluster, named
//! after it, holding a kubeconfig. Kubelet updates such a volume by swapping a hidden `..data`
//! symlink, so the directory is watched as a whole and rescanned on any change; each entry's
//! content decides whether its cluster is added, restarted or removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::kubeconfig::{client_from_kubeconfig, parse_kubeconfig, plain_http_servers, read_kubeconfig};
use super::live::KubeSource;
use super::{ClusterSource, RELOAD_DEBOUNCE};
use crate::cluster::{DEFAULT_GATEWAY_SELECTOR, LabelSelector};
use crate::hub::{ClusterMeta, Hub};

/// How often the directory is rescanned without an event, in case a watch was lost.
pub const SECRETS_POLL: Duration = Duration::from_secs(10);

/// An entry's kubeconfig text, or why it could not be read (not UTF-8, too large).
type Content = Result<String, String>;

/// One entry of the directory as last seen.
struct Running {
    /// An unreadable entry is kept as its error, so it is refused (and logged) once, not on
    /// every rescan, and retried when what is read changes.
    content: Content,
    /// `None` when the entry was refused; it stays out until its content changes.
    task: Option<JoinHandle<()>>,
}

/// Watches `dir` and keeps the hub's remote clusters in step with its entries.
pub struct RemoteSecrets {
    dir: PathBuf,
    /// Names that never come from the directory: the local cluster and clusters configured
    /// explicitly in the config file.
    reserved: BTreeSet<String>,
    local: String,
    hub: Arc<Hub>,
    running: BTreeMap<String, Running>,
}

impl RemoteSecrets {
    pub fn new(dir: &Path, local: &str, reserved: BTreeSet<String>, hub: Arc<Hub>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            reserved,
            local: local.to_string(),
            hub,
            running: BTreeMap::new(),
        }
    }

    /// Reads the directory once and starts a source for every acceptable entry.
    pub async fn scan(&mut self) {
        let Some(entries) = read_entries(&self.dir) else {
            return;
        };
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|n| !entries.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(run) = self.running.remove(&name) {
                if let Some(task) = run.task {
                    task.abort();
                }
                self.hub.remove_cluster(&name);
                info!(cluster = %name, "remote secret entry removed; cluster removed");
            }
        }
        for (name, content) in entries {
            if self.running.get(&name).is_some_and(|r| r.content == content) {
                continue;
            }
            if name == self.local {
                // Istio puts every cluster's key in the shared secret; ours is not remote.
                continue;
            }
            if self.reserved.contains(&name) {
                warn!(cluster = %name, "remote secret entry names a cluster configured in the config file; ignored");
                continue;
            }
            if let Some(old) = self.running.remove(&name) {
                if let Some(task) = old.task {
                    task.abort();
                }
                info!(cluster = %name, "remote secret changed; restarting cluster");
            }
            let started = match &content {
                Ok(text) => self.start(&name, text).await,
                Err(problem) => Err(problem.clone()),
            };
            let task = match started {
                Ok(task) => Some(task),
                Err(problem) => {
                    error!(cluster = %name, path = %self.dir.join(&name).display(), %problem, "remote cluster refused");
                    self.hub.remove_cluster(&name);
                    None
                }
            };
            self.running.insert(name, Running { content, task });
        }
    }

    async fn start(&self, name: &str, content: &str) -> Result<JoinHandle<()>, String> {
        let config = parse_kubeconfig(content, true).map_err(|e| e.to_string())?;
        for field in plain_http_servers(&config) {
            warn!(cluster = %name, %field, "remote secret's API server is plain http: its token and answers travel unencrypted");
        }
        let client = client_from_kubeconfig(config).await.map_err(|e| e.to_string())?;
        let selector = LabelSelector::parse(DEFAULT_GATEWAY_SELECTOR).map_err(|e| e.to_string())?;
        let handle = self.hub.add_cluster(ClusterMeta {
            name: name.to_string(),
            local: false,
            gateway_override: None,
            source: format!("remote secret {}", self.dir.join(name).display()),
        });
        info!(cluster = %name, "remote cluster added from remote secret");
        Ok(tokio::spawn(
            Box::new(KubeSource::from_parts(client, selector)).run(handle),
        ))
    }

    /// Rescans on every change of the directory, and every [`SECRETS_POLL`] regardless.
    pub async fn run(mut self) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let _watcher = match watch_dir(&self.dir, tx) {
            Ok(w) => Some(w),
            Err(error) => {
                warn!(dir = %self.dir.display(), %error, "cannot watch remote secrets; polling instead");
                None
            }
        };
        let mut poll = tokio::time::interval(SECRETS_POLL);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = rx.recv() => tokio::time::sleep(RELOAD_DEBOUNCE).await,
                _ = poll.tick() => {}
            }
            while rx.try_recv().is_ok() {}
            self.scan().await;
        }
    }
}

impl Drop for RemoteSecrets {
    fn drop(&mut self) {
        for run in self.running.values() {
            if let Some(task) = &run.task {
                task.abort();
            }
        }
    }
}

fn watch_dir(dir: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// The directory's visible entries (symlinks followed) and their contents; an entry that
/// cannot be read is there with the reason, so its cluster is refused rather than silently
/// dropped. A directory that is gone has no entries; one that cannot be read gives `None`, so a
/// passing error does not remove every remote cluster.
fn read_entries(dir: &Path) -> Option<BTreeMap<String, Content>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Some(out),
        Err(error) => {
            warn!(dir = %dir.display(), %error, "cannot read remote secrets directory");
            return None;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if !crate::cluster::is_dns_label(&name) {
            warn!(entry = %name, "remote secret entry is not a valid cluster name; ignored");
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        out.insert(name, read_kubeconfig(&path).map_err(|e| e.to_string()));
    }
    Some(out)
}
