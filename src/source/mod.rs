//! Sources of cluster state. Each source owns one cluster and publishes that cluster's
//! [`ClusterState`] through a [`ClusterHandle`]; the hub and the table builder do not care
//! whether the state came from a file, the binary itself or (later) a live API server.

pub mod dump;
pub mod kubeconfig;
pub mod live;
pub mod secrets;

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cluster::{ClusterState, LabelSelector};
use crate::hub::ClusterHandle;

pub use dump::{DumpError, MAX_DUMP_BYTES, parse_dump};

/// A boxed future, so sources of different types can be held and spawned alike.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of one cluster's state.
pub trait ClusterSource: Send + 'static {
    /// Publishes the cluster's state, and every later change, until the future is dropped.
    fn run(self: Box<Self>, handle: ClusterHandle) -> BoxFuture;
}

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: larger than {MAX_DUMP_BYTES} bytes; refusing to load it")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Dump { path: PathBuf, source: Box<DumpError> },
}

/// Waits this long after a change event in the remote-secrets directory before reading it:
/// kubelet swaps the whole directory at once, so a short pause collects one swap's events.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(100);
/// A changed dump is read once its size and modification time have not changed for this
/// long: `std::fs::write`, an editor or `kubectl get ... > dump.yaml` truncate the file and
/// then write it, and a read in between would see it empty or half-written.
pub const RELOAD_SETTLE: Duration = Duration::from_millis(200);
/// How long a dump that keeps changing, or stays empty (truncated for a rewrite that has not
/// started), is waited for before it is read as it is.
pub const RELOAD_SETTLE_MAX: Duration = Duration::from_secs(3);
/// Checks the file's size and modification time this often even without events: a watch can
/// be lost (inotify limits, a replaced directory) and a missed reload would go unnoticed.
pub const RELOAD_POLL: Duration = Duration::from_secs(5);

/// A `kubectl get services,endpointslices -A -o yaml|json` dump on disk, reloaded on change.
#[derive(Debug)]
pub struct DumpSource {
    path: PathBuf,
    selector: LabelSelector,
    initial: Option<ClusterState>,
}

impl DumpSource {
    /// Reads and parses the dump once, so a broken file fails start-up instead of serving
    /// nothing.
    pub fn new(path: &Path, selector: LabelSelector) -> Result<Self, SourceError> {
        let (state, _) = load_dump(path, &selector)?;
        Ok(Self {
            path: path.to_path_buf(),
            selector,
            initial: Some(state),
        })
    }

    async fn watch(mut self, handle: ClusterHandle) {
        if let Some(state) = self.initial.take() {
            handle.publish(state);
        }
        let mut last_seen = file_stamp(&self.path);
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let _watcher = match self.start_watcher(tx) {
            Ok(w) => Some(w),
            Err(error) => {
                warn!(cluster = handle.cluster(), path = %self.path.display(), %error, "cannot watch object dump; polling for changes instead");
                None
            }
        };
        let mut poll = tokio::time::interval(RELOAD_POLL);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = rx.recv() => {},
                _ = poll.tick() => {
                    if file_stamp(&self.path) == last_seen {
                        continue;
                    }
                },
            }
            let stamp = settled(&self.path).await;
            while rx.try_recv().is_ok() {}
            if stamp == last_seen && stamp.is_some() {
                continue;
            }
            last_seen = stamp;
            let path = self.path.clone();
            let selector = self.selector.clone();
            match tokio::task::spawn_blocking(move || load_dump(&path, &selector)).await {
                Ok(Ok((state, bytes))) => {
                    info!(cluster = handle.cluster(), path = %self.path.display(), bytes, services = state.services.len(), "object dump reloaded");
                    handle.publish(state);
                }
                Ok(Err(error)) => handle.report_error(&error),
                Err(error) => handle.report_error(&error),
            }
        }
    }

    fn start_watcher(&self, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let file = self.path.file_name().map(ToOwned::to_owned);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Kubelet swaps a hidden `..data` symlink when a mounted ConfigMap changes, so
            // those names count as changes of every file in the directory.
            let relevant = event.paths.iter().any(|p| {
                let name = p.file_name();
                name == file.as_deref() || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
            });
            if relevant {
                let _ = tx.try_send(());
            }
        })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }
}

impl ClusterSource for DumpSource {
    fn run(self: Box<Self>, handle: ClusterHandle) -> BoxFuture {
        Box::pin(self.watch(handle))
    }
}

/// A dump compiled into the binary: published once, never changes.
#[derive(Debug)]
pub struct StaticSource {
    state: ClusterState,
}

impl StaticSource {
    pub fn from_parts(state: ClusterState) -> Self {
        Self { state }
    }
}

impl ClusterSource for StaticSource {
    fn run(self: Box<Self>, handle: ClusterHandle) -> BoxFuture {
        Box::pin(async move { handle.publish(self.state) })
    }
}

/// The file's stamp once it has settled: unchanged across [`RELOAD_SETTLE`] and not empty, or
/// whatever it is after [`RELOAD_SETTLE_MAX`].
async fn settled(path: &Path) -> Option<(u64, SystemTime)> {
    let give_up = tokio::time::Instant::now() + RELOAD_SETTLE_MAX;
    let mut before = file_stamp(path);
    loop {
        tokio::time::sleep(RELOAD_SETTLE).await;
        let now = file_stamp(path);
        let empty = now.is_some_and(|(len, _)| len == 0);
        if (now == before && !empty) || tokio::time::Instant::now() >= give_up {
            return now;
        }
        before = now;
    }
}

/// Size and modification time: enough to notice a rewritten file without reading it.
fn file_stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Reads a dump with a size cap (checked while reading, so a growing file cannot slip past)
/// and parses it. Returns the state and the number of bytes read.
pub fn load_dump(path: &Path, selector: &LabelSelector) -> Result<(ClusterState, usize), SourceError> {
    let read_err = |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_DUMP_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() > MAX_DUMP_BYTES {
        return Err(SourceError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let state = parse_dump(&bytes, selector).map_err(|source| SourceError::Dump {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok((state, bytes.len()))
}
