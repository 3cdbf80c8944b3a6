//! An in-process fake Kubernetes API server that speaks the HTTP list/watch
//! protocol closely enough for `kube::Client` and kube-runtime's `watcher` to
//! run against it unchanged.
//!
//! It serves two resources, core/v1 Services and discovery.k8s.io/v1
//! EndpointSlices, cluster-wide and per namespace, plus the minimal discovery
//! documents (`/version`, `/api`, `/apis`, group versions). State is a single
//! resourceVersion counter, the current objects and a bounded history of
//! changes that watches replay from, so the interesting failure modes of a
//! real apiserver (410 Gone on a compacted resourceVersion or continue token,
//! dropped watch connections, a refused port, 5xx storms, hangs, garbage on
//! the stream) can be produced on demand from test code, sync or async.
//!
//! Only 127.0.0.1 is ever bound. Every task ends when the [`FakeApiServer`]
//! handle is dropped.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    future::poll_fn,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus},
        discovery::v1::{Endpoint, EndpointConditions, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::{Map, Value, json};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

/// Changes kept for watch replay; older resourceVersions answer 410 Gone.
const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// Paginated list snapshots kept for `continue` tokens; older tokens answer 410.
const SNAPSHOT_LIMIT: usize = 32;
/// Request log entries kept, so a hot-looping client cannot exhaust memory.
const REQUEST_LOG_LIMIT: usize = 100_000;
/// What a real apiserver picks (at random between 1x and 2x of its minimum)
/// when the client sends no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// The endpointslice controller's link from a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Set (empty) by the controller on slices of headless Services only.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
/// Deliberately not JSON, and not a truncated JSON prefix either: kube-client
/// silently skips lines that fail with an EOF-class serde error, and the point
/// of injecting one is to make the client see a decode error.
const MALFORMED_LINE: &[u8] = b"this is not a watch event }{\n";

static NEXT_SERVER: AtomicU64 = AtomicU64::new(1);

/// One HTTP request as the server saw it, recorded before any fault applies.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string, empty when absent.
    pub query: String,
    pub at: Instant,
}

impl RequestRecord {
    /// The first value of a query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch").is_some_and(|v| parse_bool(&v))
    }
}

/// The fake server. Dropping it shuts everything down and frees the port.
pub struct FakeApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    store: Mutex<Store>,
    /// Bumped after every change a watch may care about; watch tasks re-read
    /// the store when it moves, so no change can be missed between reads.
    changed: watch::Sender<u64>,
    /// Generation of the listener and its connections: `stop()` and drop
    /// bump it, and every accept loop and connection of an older generation
    /// ends.
    life: watch::Sender<u64>,
    /// Held outside the tasks so `stop()` closes the port synchronously:
    /// a connection attempt right after `stop()` returns must be refused.
    listener: Mutex<Option<TcpListener>>,
    open_watches: AtomicUsize,
    port: u16,
    token: String,
    /// `restart()` may be called from sync code outside the runtime.
    runtime: tokio::runtime::Handle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn of(obj: &Value) -> Option<Kind> {
        match (obj.get("apiVersion")?.as_str()?, obj.get("kind")?.as_str()?) {
            ("v1", "Service") => Some(Kind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
        }
    }

    /// Mirrors the field selectors the real apiserver accepts for each type.
    fn supports_field(self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace")
            || match self {
                Kind::Service => matches!(field, "spec.clusterIP" | "spec.type"),
                Kind::EndpointSlice => field == "addressType",
            }
    }
}

type ObjKey = (Kind, String, String);

struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    /// The object after the change; for a deletion, its last state stamped
    /// with the deletion's resourceVersion, as the real server sends it.
    object: Arc<Value>,
    previous: Option<Arc<Value>>,
    deleted: bool,
}

struct Snapshot {
    id: u64,
    rv: u64,
    items: Arc<Vec<Arc<Value>>>,
}

#[derive(Clone, Copy, Default)]
struct Epochs {
    expire: u64,
    drop: u64,
    malformed: u64,
    bookmark: u64,
}

struct Store {
    rv: u64,
    /// The oldest resourceVersion a watch may still start from; anything
    /// older was compacted away (history overflow or `expire()`).
    compacted_rv: u64,
    objects: BTreeMap<ObjKey, Arc<Value>>,
    history: VecDeque<Change>,
    history_limit: usize,
    snapshots: VecDeque<Snapshot>,
    next_snapshot: u64,
    next_uid: u64,
    requests: VecDeque<RequestRecord>,
    failure: Option<u16>,
    hang: bool,
    list_delay: Duration,
    bookmark_interval: Duration,
    epochs: Epochs,
    stopped: bool,
    shutdown: bool,
}

impl Store {
    fn new() -> Store {
        Store {
            rv: 1,
            compacted_rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            snapshots: VecDeque::new(),
            next_snapshot: 1,
            next_uid: 1,
            requests: VecDeque::new(),
            failure: None,
            hang: false,
            list_delay: Duration::ZERO,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            epochs: Epochs::default(),
            stopped: false,
            shutdown: false,
        }
    }

    fn apply(&mut self, mut obj: Value) -> Value {
        let Some(kind) = Kind::of(&obj) else {
            panic!("FakeApiServer only stores v1 Services and discovery.k8s.io/v1 EndpointSlices, got {obj}");
        };
        let Some(root) = obj.as_object_mut() else {
            unreachable!("Kind::of accepted a non-object");
        };
        let meta = root.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        let Some(meta) = meta.as_object_mut() else {
            unreachable!("metadata was just made an object");
        };
        let Some(name) = meta.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
            panic!("FakeApiServer: {} without metadata.name", kind.kind());
        };
        let name = name.to_owned();
        let namespace = match meta.get("namespace").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            Some(ns) => ns.to_owned(),
            None => "default".to_owned(),
        };
        meta.insert("namespace".into(), Value::String(namespace.clone()));

        let key = (kind, namespace.clone(), name);
        let previous = self.objects.get(&key).cloned();
        // An update that omits server-set fields keeps them, as a real
        // update through the apiserver would.
        for field in ["uid", "creationTimestamp"] {
            if meta.get(field).is_none_or(Value::is_null) {
                let kept = previous.as_ref().and_then(|p| p["metadata"].get(field)).cloned();
                let value = kept.unwrap_or_else(|| match field {
                    "uid" => {
                        let n = self.next_uid;
                        self.next_uid += 1;
                        Value::String(format!("00000000-0000-4000-8000-{n:012x}"))
                    }
                    _ => Value::String("2025-01-01T00:00:00Z".into()),
                });
                meta.insert(field.into(), value);
            }
        }
        self.rv += 1;
        meta.insert("resourceVersion".into(), Value::String(self.rv.to_string()));

        let object = Arc::new(obj);
        self.objects.insert(key, object.clone());
        self.record_change(Change {
            rv: self.rv,
            kind,
            namespace,
            object: object.clone(),
            previous,
            deleted: false,
        });
        (*object).clone()
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(previous) = self.objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        let object = Arc::new(with_resource_version(&previous, self.rv));
        self.record_change(Change {
            rv: self.rv,
            kind,
            namespace: namespace.to_owned(),
            object,
            previous: Some(previous),
            deleted: true,
        });
        true
    }

    fn record_change(&mut self, change: Change) {
        self.history.push_back(change);
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
    }

    fn record_request(&mut self, record: RequestRecord) {
        if self.requests.len() >= REQUEST_LOG_LIMIT {
            self.requests.pop_front();
        }
        self.requests.push_back(record);
    }
}

fn with_resource_version(obj: &Value, rv: u64) -> Value {
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
    obj
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not cascade into
    // every other test sharing the server.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on an ephemeral port and starts serving.
    pub async fn start() -> FakeApiServer {
        let std_listener =
            StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the fake apiserver on 127.0.0.1:0");
        let port = std_listener
            .local_addr()
            .expect("local addr of a bound listener")
            .port();
        let listener = into_tokio_listener(std_listener).expect("register the fake apiserver listener");
        let serial = NEXT_SERVER.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::new()),
            changed: watch::Sender::new(0),
            life: watch::Sender::new(0),
            listener: Mutex::new(Some(listener)),
            open_watches: AtomicUsize::new(0),
            port,
            token: format!("fake-apiserver-token-{}-{serial}", std::process::id()),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(accept_loop(inner.clone(), 0));
        FakeApiServer { inner }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.inner.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The bearer token every request must carry (it is in the kubeconfig).
    pub fn token(&self) -> &str {
        &self.inner.token
    }

    /// A kubeconfig with one cluster, one static-token user and one context,
    /// all named after `cluster_name`, selected as current-context.
    pub fn kubeconfig_yaml(&self, cluster_name: &str) -> String {
        // A JSON string is a valid YAML flow scalar, so any name is quoted safely.
        let name = Value::String(cluster_name.to_owned()).to_string();
        let user = Value::String(format!("{cluster_name}-user")).to_string();
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {name}\n  cluster:\n    server: {server}\n\
             users:\n\
             - name: {user}\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: {name}\n  context:\n    cluster: {name}\n    user: {user}\n    namespace: default\n\
             current-context: {name}\n",
            server = self.url(),
            token = self.inner.token,
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>, cluster_name: &str) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(cluster_name))
    }

    /// A client built the way an application would: from the kubeconfig text.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml("fake")).expect("generated kubeconfig parses");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("generated kubeconfig is usable");
        kube::Client::try_from(config).expect("client from generated kubeconfig")
    }

    /// Creates (ADDED) or replaces (MODIFIED) a Service; returns it as stored,
    /// with its new resourceVersion.
    pub fn apply_service(&self, svc: Service) -> Service {
        let stored = self.apply_json(serde_json::to_value(svc).expect("a Service serializes"));
        serde_json::from_value(stored).expect("a stored Service deserializes")
    }

    pub fn delete_service(&self, namespace: &str, name: &str) -> bool {
        self.delete(Kind::Service, namespace, name)
    }

    pub fn apply_endpoint_slice(&self, slice: EndpointSlice) -> EndpointSlice {
        let stored = self.apply_json(serde_json::to_value(slice).expect("an EndpointSlice serializes"));
        serde_json::from_value(stored).expect("a stored EndpointSlice deserializes")
    }

    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) -> bool {
        self.delete(Kind::EndpointSlice, namespace, name)
    }

    /// Like `apply_service`/`apply_endpoint_slice` for raw JSON, which lets a
    /// test store objects the typed structs cannot express. `apiVersion` and
    /// `kind` pick the resource; a missing namespace becomes `default`.
    pub fn apply_json(&self, obj: Value) -> Value {
        let stored = lock(&self.inner.store).apply(obj);
        self.inner.notify();
        stored
    }

    /// The resourceVersion of the latest change.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.store).rv
    }

    /// Aborts every open watch mid-stream, without the terminating chunk, as
    /// a connection reset or a killed apiserver would.
    pub fn drop_watches(&self) {
        lock(&self.inner.store).epochs.drop += 1;
        self.inner.notify();
    }

    /// Compacts all history: every open watch gets a 410 `Expired` ERROR event
    /// and ends, and every older resourceVersion and continue token is too old.
    pub fn expire(&self) {
        {
            let mut store = lock(&self.inner.store);
            store.compacted_rv = store.rv;
            store.history.clear();
            store.snapshots.clear();
            store.epochs.expire += 1;
        }
        self.inner.notify();
    }

    /// Sends a BOOKMARK now on every watch that allowed them.
    pub fn send_bookmarks(&self) {
        lock(&self.inner.store).epochs.bookmark += 1;
        self.inner.notify();
    }

    /// Period of unsolicited BOOKMARK events (default 1 s), from the next one on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        lock(&self.inner.store).bookmark_interval = interval.max(Duration::from_millis(10));
        self.inner.notify();
    }

    /// How many changes are kept for watch replay (default 10 000); a watch
    /// that falls further behind gets 410 Gone.
    pub fn set_history_limit(&self, limit: usize) {
        {
            let mut store = lock(&self.inner.store);
            store.history_limit = limit;
            store.trim_history();
        }
        self.inner.notify();
    }

    /// Answers every new request with this HTTP status and a Status body (429
    /// adds `Retry-After: 1`); `None` serves normally again. Watches already
    /// streaming are left alone: combine with `drop_watches()` to force the
    /// client through the failing path.
    pub fn set_failure(&self, status: Option<u16>) {
        lock(&self.inner.store).failure = status;
    }

    /// While set, new requests are read but never answered (until the
    /// connection is closed by `stop()` or drop), and open watches go silent:
    /// no events, no bookmarks, no timeout. Clearing it lets open watches
    /// catch up; requests already held stay unanswered.
    pub fn set_hang(&self, hang: bool) {
        lock(&self.inner.store).hang = hang;
        self.inner.notify();
    }

    /// Delays every list response by this much.
    pub fn set_list_delay(&self, delay: Duration) {
        lock(&self.inner.store).list_delay = delay;
    }

    /// Writes one line of garbage into every open watch stream.
    pub fn inject_malformed_event(&self) {
        lock(&self.inner.store).epochs.malformed += 1;
        self.inner.notify();
    }

    /// Closes the listening socket (before returning, so new connections are
    /// refused) and every open connection. State is kept for `restart()`.
    pub fn stop(&self) {
        drop(lock(&self.inner.listener).take());
        lock(&self.inner.store).stopped = true;
        self.inner.life.send_modify(|generation| *generation += 1);
        self.inner.notify();
    }

    /// Listens again on the same port with the same state. A no-op while
    /// listening.
    pub fn restart(&self) {
        let mut slot = lock(&self.inner.listener);
        if slot.is_some() {
            return;
        }
        let addr = self.addr();
        let mut attempt = 0;
        let std_listener = loop {
            match StdTcpListener::bind(addr) {
                Ok(listener) => break listener,
                // The port can linger briefly after the close in `stop()`.
                Err(_) if attempt < 100 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => panic!("FakeApiServer::restart: rebinding {addr}: {err}"),
            }
        };
        let listener = {
            let _runtime = self.inner.runtime.enter();
            into_tokio_listener(std_listener).expect("register the restarted listener")
        };
        *slot = Some(listener);
        lock(&self.inner.store).stopped = false;
        let generation = *self.inner.life.borrow();
        self.inner.runtime.spawn(accept_loop(self.inner.clone(), generation));
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.inner.store).requests.iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        lock(&self.inner.store).requests.clear();
    }

    /// Watch streams currently open (counted until their task has ended).
    pub fn open_watches(&self) -> usize {
        self.inner.open_watches.load(Ordering::SeqCst)
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let deleted = lock(&self.inner.store).delete(kind, namespace, name);
        if deleted {
            self.inner.notify();
        }
        deleted
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        lock(&self.inner.store).shutdown = true;
        drop(lock(&self.inner.listener).take());
        self.inner.life.send_modify(|generation| *generation += 1);
        self.inner.notify();
    }
}

impl Inner {
    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn into_tokio_listener(listener: StdTcpListener) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

async fn accept_loop(inner: Arc<Inner>, generation: u64) {
    let mut life = inner.life.subscribe();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = life.wait_for(|g| *g != generation) => return,
            accepted = poll_fn(|cx| {
                // A stale loop must never serve from a listener a later
                // `restart()` installed in the slot.
                if *inner.life.borrow() != generation {
                    return Poll::Ready(None);
                }
                match lock(&inner.listener).as_ref() {
                    Some(listener) => listener.poll_accept(cx).map(Some),
                    None => Poll::Ready(None),
                }
            }) => accepted,
        };
        match accepted {
            None => return,
            Some(Ok((stream, _))) => {
                tokio::spawn(serve_connection(inner.clone(), stream, generation));
            }
            // Out of file descriptors and the like: retry without spinning.
            Some(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: tokio::net::TcpStream, generation: u64) {
    let mut life = inner.life.subscribe();
    let handler = inner.clone();
    let service = service_fn(move |req| {
        let inner = handler.clone();
        async move { Ok::<_, Infallible>(handle(inner, req).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    // Dropping the connection future closes the socket at once, mid-response
    // if need be, which is what `stop()` and drop promise.
    tokio::select! {
        _ = conn => {}
        _ = life.wait_for(|g| *g != generation) => {}
    }
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let bytes = match serde_json::to_vec(body) {
        Ok(bytes) => bytes,
        Err(err) => return status_response(500, "InternalError", &format!("encoding the response: {err}")),
    };
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &status_value(code, reason, message));
    if code == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(400, "BadRequest", message)
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let (hang, failure) = {
        let mut store = lock(&inner.store);
        store.record_request(RequestRecord {
            method: req.method().as_str().to_owned(),
            path: path.clone(),
            query: query.clone(),
            at: Instant::now(),
        });
        (store.hang, store.failure)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    if let Some(code) = failure {
        return status_response(code, reason_for(code), &format!("injected failure {code}"));
    }
    let expected = format!("Bearer {}", inner.token);
    if req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return status_response(401, "Unauthorized", "Unauthorized");
    }
    if req.method() != hyper::Method::GET {
        return status_response(405, "MethodNotAllowed", "the fake apiserver only serves GET");
    }
    // Asking for metadata only is how `Api<PartialObjectMeta<K>>` talks.
    let meta_only = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("as=PartialObjectMetadata"));

    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["version"] => json_response(StatusCode::OK, &version_info()),
        ["healthz" | "readyz" | "livez"] => Response::new(full("ok")),
        ["api"] => json_response(
            StatusCode::OK,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{}", inner.port)}],
            }),
        ),
        ["apis"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group()]}),
        ),
        ["apis", "discovery.k8s.io"] => json_response(StatusCode::OK, &discovery_group()),
        ["api", "v1"] => json_response(StatusCode::OK, &resource_list(Kind::Service)),
        ["apis", "discovery.k8s.io", "v1"] => json_response(StatusCode::OK, &resource_list(Kind::EndpointSlice)),
        _ => match parse_resource_path(&segments) {
            Some((kind, namespace, None)) => collection(&inner, kind, namespace, &query, meta_only).await,
            Some((kind, Some(namespace), Some(name))) => get_object(&inner, kind, namespace, name, meta_only),
            _ => status_response(404, "NotFound", "the server could not find the requested resource"),
        },
    }
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn discovery_group() -> Value {
    let version = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "discovery.k8s.io",
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

fn resource_list(kind: Kind) -> Value {
    let (name, singular, short) = match kind {
        Kind::Service => ("services", "service", json!(["svc"])),
        Kind::EndpointSlice => ("endpointslices", "endpointslice", json!([])),
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": kind.api_version(),
        "resources": [{
            "name": name,
            "singularName": singular,
            "namespaced": true,
            "kind": kind.kind(),
            "verbs": ["get", "list", "watch"],
            "shortNames": short,
        }],
    })
}

/// `(kind, namespace, name)` for the resource URLs this server knows.
fn parse_resource_path<'a>(segments: &[&'a str]) -> Option<(Kind, Option<&'a str>, Option<&'a str>)> {
    let (group, rest) = match segments {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let kind = match (group, plural) {
        ("", "services") => Kind::Service,
        ("discovery.k8s.io", "endpointslices") => Kind::EndpointSlice,
        _ => return None,
    };
    Some((kind, namespace, name))
}

fn get_object(inner: &Inner, kind: Kind, namespace: &str, name: &str, meta_only: bool) -> Response<Body> {
    let key = (kind, namespace.to_owned(), name.to_owned());
    let found = lock(&inner.store).objects.get(&key).cloned();
    match found {
        Some(obj) => json_response(StatusCode::OK, &Rendered::new(&obj, kind, meta_only, true)),
        None => status_response(
            404,
            "NotFound",
            &format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
        ),
    }
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(parse_bool)
    }

    /// Absent and empty mean the same to the apiserver.
    fn non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }
}

fn parse_bool(value: &str) -> bool {
    // Go's strconv.ParseBool truthy spellings, which is what the server accepts.
    matches!(value, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a list or watch is restricted to.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let namespace = obj["metadata"]["namespace"].as_str().unwrap_or_default();
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(obj["metadata"]["labels"].as_object())
            && self.fields.matches(obj)
    }

    /// How a change looks through this filter. Like the real watch cache, an
    /// object moving into the selection is ADDED and one moving out of it is
    /// DELETED (its previous state at the new resourceVersion).
    fn view(&self, change: &Change) -> Option<(&'static str, Arc<Value>)> {
        if change.kind != self.kind || self.namespace.as_deref().is_some_and(|ns| ns != change.namespace) {
            return None;
        }
        let was = change.previous.as_deref().is_some_and(|p| self.matches(p));
        if change.deleted {
            return was.then(|| ("DELETED", change.object.clone()));
        }
        match (was, self.matches(&change.object)) {
            (false, true) => Some(("ADDED", change.object.clone())),
            (true, true) => Some(("MODIFIED", change.object.clone())),
            (true, false) => {
                let previous = change.previous.as_deref()?;
                Some(("DELETED", Arc::new(with_resource_version(previous, change.rv))))
            }
            (false, false) => None,
        }
    }
}

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Default)]
struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    fn parse(text: &str) -> Result<LabelSelector, String> {
        if text.trim().is_empty() {
            return Ok(LabelSelector::default());
        }
        let mut requirements = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    requirements.push(Self::requirement(&text[start..i])?);
                    start = i + 1;
                }
                _ => {}
            }
        }
        requirements.push(Self::requirement(&text[start..])?);
        Ok(LabelSelector(requirements))
    }

    fn requirement(term: &str) -> Result<Requirement, String> {
        let term = term.trim();
        let invalid = || format!("unable to parse requirement: {term:?}");
        if term.is_empty() {
            return Err(invalid());
        }
        if let Some(key) = term.strip_prefix('!') {
            return Ok(Requirement::NotExists(label_key(key.trim()).ok_or_else(invalid)?));
        }
        if let Some(open) = term.find('(') {
            let inner = term[open + 1..].strip_suffix(')').ok_or_else(invalid)?;
            let mut head = term[..open].split_whitespace();
            let (Some(key), Some(op), None) = (head.next(), head.next(), head.next()) else {
                return Err(invalid());
            };
            let key = label_key(key).ok_or_else(invalid)?;
            let values = inner
                .split(',')
                .map(|v| label_value(v.trim()).ok_or_else(invalid))
                .collect::<Result<Vec<_>, _>>()?;
            return match op {
                "in" => Ok(Requirement::In(key, values)),
                "notin" => Ok(Requirement::NotIn(key, values)),
                _ => Err(invalid()),
            };
        }
        let split = |op: &str| term.split_once(op).map(|(k, v)| (k.trim(), v.trim()));
        if let Some((key, value)) = split("!=") {
            let pair = (
                label_key(key).ok_or_else(invalid)?,
                label_value(value).ok_or_else(invalid)?,
            );
            return Ok(Requirement::NotEquals(pair.0, pair.1));
        }
        if let Some((key, value)) = split("==").or_else(|| split("=")) {
            let pair = (
                label_key(key).ok_or_else(invalid)?,
                label_value(value).ok_or_else(invalid)?,
            );
            return Ok(Requirement::Equals(pair.0, pair.1));
        }
        Ok(Requirement::Exists(label_key(term).ok_or_else(invalid)?))
    }

    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            // Kubernetes: `!=` and `notin` also select objects without the label.
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

fn label_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_owned())
}

fn label_value(value: &str) -> Option<String> {
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| value.to_owned())
}

#[derive(Debug, Default)]
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(kind: Kind, text: &str) -> Result<FieldSelector, String> {
        if text.trim().is_empty() {
            return Ok(FieldSelector::default());
        }
        let mut terms = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{text}'; can't understand '{term}'"));
            };
            let field = field.trim();
            if !kind.supports_field(field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(obj, |v, part| v.get(part))
                .and_then(Value::as_str)
                .unwrap_or_default();
            (actual == value) == *equal
        })
    }
}

/// An object as it goes on the wire. List items omit `kind`/`apiVersion`, as
/// the real server's do; metadata-only requests get `PartialObjectMetadata`.
struct Rendered<'a> {
    obj: &'a Value,
    kind: Kind,
    meta_only: bool,
    type_meta: bool,
}

impl<'a> Rendered<'a> {
    fn new(obj: &'a Value, kind: Kind, meta_only: bool, type_meta: bool) -> Self {
        Rendered {
            obj,
            kind,
            meta_only,
            type_meta,
        }
    }
}

impl Serialize for Rendered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if self.meta_only {
            map.serialize_entry("kind", "PartialObjectMetadata")?;
            map.serialize_entry("apiVersion", "meta.k8s.io/v1")?;
            map.serialize_entry("metadata", &self.obj["metadata"])?;
            return map.end();
        }
        if self.type_meta {
            map.serialize_entry("kind", self.kind.kind())?;
            map.serialize_entry("apiVersion", self.kind.api_version())?;
        }
        if let Some(fields) = self.obj.as_object() {
            for (key, value) in fields {
                if key != "kind" && key != "apiVersion" {
                    map.serialize_entry(key, value)?;
                }
            }
        }
        map.end()
    }
}

async fn collection(
    inner: &Arc<Inner>,
    kind: Kind,
    namespace: Option<&str>,
    query: &str,
    meta_only: bool,
) -> Response<Body> {
    let query = Query(parse_query(query));
    let labels = match LabelSelector::parse(query.get("labelSelector").unwrap_or_default()) {
        Ok(labels) => labels,
        Err(message) => return bad_request(&message),
    };
    let fields = match FieldSelector::parse(kind, query.get("fieldSelector").unwrap_or_default()) {
        Ok(fields) => fields,
        Err(message) => return bad_request(&message),
    };
    let filter = Filter {
        kind,
        namespace: namespace.map(str::to_owned),
        labels,
        fields,
    };
    if query.flag("watch") {
        start_watch(inner, filter, &query, meta_only)
    } else {
        let delay = lock(&inner.store).list_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        list(inner, &filter, &query, meta_only)
    }
}

fn parse_rv(value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("invalid resource version: {value:?}"))
}

fn too_old(requested: u64, oldest: u64) -> String {
    format!("too old resource version: {requested} ({oldest})")
}

fn list(inner: &Inner, filter: &Filter, query: &Query, meta_only: bool) -> Response<Body> {
    let limit = match query.non_empty("limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let mut store = lock(&inner.store);
    let (snapshot_id, rv, items, offset) = if let Some(token) = query.non_empty("continue") {
        let Some((id, offset)) = decode_continue(token) else {
            return bad_request("continue key is not valid");
        };
        let compacted = store.compacted_rv;
        let Some(snapshot) = store.snapshots.iter().find(|s| s.id == id && s.rv >= compacted) else {
            return status_response(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            );
        };
        (Some(snapshot.id), snapshot.rv, snapshot.items.clone(), offset)
    } else {
        // Only the current state is kept, so the other readings of
        // resourceVersion are approximated as a real server would answer
        // them when that state is all it has.
        if let Some(requested) = query.non_empty("resourceVersion").filter(|rv| *rv != "0") {
            let requested = match parse_rv(requested) {
                Ok(rv) => rv,
                Err(message) => return bad_request(&message),
            };
            let exact = query.get("resourceVersionMatch") == Some("Exact");
            if requested > store.rv {
                return status_response(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {requested}, current: {}", store.rv),
                );
            }
            if exact && requested != store.rv {
                return status_response(410, "Expired", &too_old(requested, store.rv));
            }
        }
        let items: Vec<Arc<Value>> = store
            .objects
            .range((filter.kind, String::new(), String::new())..)
            .take_while(|((kind, _, _), _)| *kind == filter.kind)
            .filter(|(_, obj)| filter.matches(obj))
            .map(|(_, obj)| obj.clone())
            .collect();
        (None, store.rv, Arc::new(items), 0)
    };

    let offset = offset.min(items.len());
    let end = if limit == 0 {
        items.len()
    } else {
        offset.saturating_add(limit).min(items.len())
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        let id = snapshot_id.unwrap_or_else(|| {
            let id = store.next_snapshot;
            store.next_snapshot += 1;
            store.snapshots.push_back(Snapshot {
                id,
                rv,
                items: items.clone(),
            });
            if store.snapshots.len() > SNAPSHOT_LIMIT {
                store.snapshots.pop_front();
            }
            id
        });
        metadata["continue"] = Value::String(encode_continue(id, end));
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    drop(store);

    let page: Vec<Rendered<'_>> = items[offset..end]
        .iter()
        .map(|obj| Rendered::new(obj, filter.kind, meta_only, false))
        .collect();
    let (kind, api_version) = if meta_only {
        ("PartialObjectMetadataList", "meta.k8s.io/v1")
    } else {
        (filter.kind.list_kind(), filter.kind.api_version())
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page}),
    )
}

fn encode_continue(snapshot: u64, offset: usize) -> String {
    format!("fake-{snapshot:x}-{offset:x}")
}

fn decode_continue(token: &str) -> Option<(u64, usize)> {
    let (snapshot, offset) = token.strip_prefix("fake-")?.split_once('-')?;
    Some((
        u64::from_str_radix(snapshot, 16).ok()?,
        usize::from_str_radix(offset, 16).ok()?,
    ))
}

struct WatchSpec {
    filter: Filter,
    meta_only: bool,
    bookmarks: bool,
    send_initial_events: bool,
    /// `None`: start with the current state as synthetic ADDED events.
    from: Option<u64>,
    timeout: Duration,
    epochs: Epochs,
}

fn start_watch(inner: &Arc<Inner>, filter: Filter, query: &Query, meta_only: bool) -> Response<Body> {
    let timeout = match query.non_empty("timeoutSeconds").map(str::parse::<u64>) {
        None | Some(Ok(0)) => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(secs)) => Duration::from_secs(secs),
        Some(Err(_)) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    let from = match query.non_empty("resourceVersion").filter(|rv| *rv != "0") {
        None => None,
        Some(rv) => match parse_rv(rv) {
            Ok(rv) => Some(rv),
            Err(message) => return bad_request(&message),
        },
    };
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial_events = query.flag("sendInitialEvents");
    if send_initial_events {
        // The same validation the real server applies to streaming lists.
        if !bookmarks {
            return bad_request("sendInitialEvents requires allowWatchBookmarks=true");
        }
        if query.get("resourceVersionMatch") != Some("NotOlderThan") {
            return bad_request("sendInitialEvents requires resourceVersionMatch=NotOlderThan");
        }
    }
    let spec = WatchSpec {
        filter,
        meta_only,
        bookmarks,
        send_initial_events,
        from: if send_initial_events { None } else { from },
        timeout,
        // Taken now, so a fault injected right after the response starts
        // still reaches this watch.
        epochs: lock(&inner.store).epochs,
    };
    let (tx, rx) = mpsc::channel(16);
    inner.open_watches.fetch_add(1, Ordering::SeqCst);
    let open = OpenWatch(inner.clone());
    tokio::spawn(run_watch(open, spec, tx));
    let mut response = Response::new(BodyExt::boxed_unsync(WatchBody(rx)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A chunked body fed by the watch task; an `Err` aborts the connection
/// without the terminating chunk.
struct WatchBody(mpsc::Receiver<io::Result<Bytes>>);

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        self.0.poll_recv(cx).map(|item| item.map(|r| r.map(Frame::data)))
    }
}

struct OpenWatch(Arc<Inner>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Step {
    Send(Vec<u8>, bool),
    Abort,
    Hang,
}

#[derive(Serialize)]
struct WireEvent<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: T,
}

fn push_event(out: &mut Vec<u8>, kind: &str, object: impl Serialize) {
    // Serializing a `Value` into memory cannot fail.
    let _ = serde_json::to_writer(&mut *out, &WireEvent { kind, object });
    out.push(b'\n');
}

fn push_bookmark(out: &mut Vec<u8>, spec: &WatchSpec, rv: u64, initial_end: bool) {
    let (kind, api_version) = if spec.meta_only {
        ("PartialObjectMetadata", "meta.k8s.io/v1")
    } else {
        (spec.filter.kind.kind(), spec.filter.kind.api_version())
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    push_event(
        out,
        "BOOKMARK",
        json!({"kind": kind, "apiVersion": api_version, "metadata": metadata}),
    );
}

/// Decides, under the store lock, what the watch writes next.
fn plan(store: &Store, spec: &WatchSpec, cursor: &mut Option<u64>, seen: &mut Epochs, bookmark_due: bool) -> Step {
    if store.shutdown || store.stopped || store.epochs.drop != seen.drop {
        return Step::Abort;
    }
    if store.hang {
        return Step::Hang;
    }
    let mut out = Vec::new();
    if store.epochs.expire != seen.expire {
        let requested = cursor.unwrap_or(0);
        push_event(
            &mut out,
            "ERROR",
            status_value(410, "Expired", &too_old(requested, store.compacted_rv)),
        );
        return Step::Send(out, true);
    }
    match *cursor {
        None => {
            let kind = spec.filter.kind;
            for ((_, _, _), obj) in store
                .objects
                .range((kind, String::new(), String::new())..)
                .take_while(|((k, _, _), _)| *k == kind)
                .filter(|(_, obj)| spec.filter.matches(obj))
            {
                push_event(&mut out, "ADDED", Rendered::new(obj, kind, spec.meta_only, true));
            }
            if spec.send_initial_events {
                push_bookmark(&mut out, spec, store.rv, true);
            }
            *cursor = Some(store.rv);
        }
        Some(from) => {
            if from < store.compacted_rv {
                push_event(
                    &mut out,
                    "ERROR",
                    status_value(410, "Expired", &too_old(from, store.compacted_rv)),
                );
                return Step::Send(out, true);
            }
            let start = store.history.partition_point(|c| c.rv <= from);
            for change in store.history.range(start..) {
                if let Some((kind, obj)) = spec.filter.view(change) {
                    push_event(
                        &mut out,
                        kind,
                        Rendered::new(&obj, spec.filter.kind, spec.meta_only, true),
                    );
                }
            }
            *cursor = Some(from.max(store.rv));
        }
    }
    if store.epochs.malformed != seen.malformed {
        seen.malformed = store.epochs.malformed;
        out.extend_from_slice(MALFORMED_LINE);
    }
    if spec.bookmarks && (bookmark_due || store.epochs.bookmark != seen.bookmark) {
        push_bookmark(&mut out, spec, cursor.unwrap_or(store.rv), false);
    }
    seen.bookmark = store.epochs.bookmark;
    Step::Send(out, false)
}

async fn run_watch(open: OpenWatch, spec: WatchSpec, tx: mpsc::Sender<io::Result<Bytes>>) {
    let inner = &open.0;
    let mut changed = inner.changed.subscribe();
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut cursor = spec.from;
    let mut seen = spec.epochs;
    let mut bookmark_due = false;
    // A fixed schedule rather than an idle timer, so a busy stream still
    // gets its periodic bookmarks, as from a real server.
    let mut bookmark_at: Option<tokio::time::Instant> = None;
    loop {
        let (step, interval) = {
            let store = lock(&inner.store);
            (
                plan(&store, &spec, &mut cursor, &mut seen, bookmark_due),
                store.bookmark_interval,
            )
        };
        let hanging = match step {
            Step::Abort => {
                let _ = tx.send(Err(io::Error::other("fake apiserver dropped the watch"))).await;
                return;
            }
            Step::Send(bytes, end) => {
                if !bytes.is_empty() && tx.send(Ok(bytes.into())).await.is_err() {
                    return;
                }
                if end {
                    return;
                }
                if bookmark_due || bookmark_at.is_none() {
                    bookmark_at = Some(tokio::time::Instant::now() + interval);
                }
                bookmark_due = false;
                false
            }
            Step::Hang => true,
        };
        let next_bookmark = bookmark_at.unwrap_or(deadline);
        tokio::select! {
            changed = changed.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(next_bookmark), if !hanging && spec.bookmarks => bookmark_due = true,
            _ = tokio::time::sleep_until(deadline), if !hanging => return,
            _ = tx.closed() => return,
        }
    }
}

fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: (!labels.is_empty()).then(|| labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
        ..ObjectMeta::default()
    }
}

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

/// A ClusterIP Service with these cluster IPs (the first is `spec.clusterIP`).
pub fn service(namespace: &str, name: &str, cluster_ips: &[&str]) -> Service {
    Service {
        metadata: meta(namespace, name, &[]),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            cluster_ip: cluster_ips.first().map(|ip| (*ip).to_owned()),
            cluster_ips: Some(strings(cluster_ips)),
            ports: Some(vec![port("http", 80)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// A headless Service (`clusterIP: None`).
pub fn headless_service(namespace: &str, name: &str) -> Service {
    let mut svc = service(namespace, name, &["None"]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.ports = Some(vec![port("tcp", 5432)]);
    }
    svc
}

/// A LoadBalancer Service like an east-west gateway: these labels, port
/// 15443, and these addresses in `status.loadBalancer.ingress`.
pub fn gateway_service(namespace: &str, name: &str, labels: &[(&str, &str)], ingress_ips: &[&str]) -> Service {
    // Any stable, plausible ClusterIP will do; derive it from the name so two
    // gateways differ.
    let hash = name
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16777619));
    let cluster_ip = format!("10.96.{}.{}", (hash >> 8) & 0xff, (hash & 0xfe) | 1);
    Service {
        metadata: meta(namespace, name, labels),
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_owned()),
            cluster_ip: Some(cluster_ip.clone()),
            cluster_ips: Some(vec![cluster_ip]),
            ports: Some(vec![port("tls", 15443)]),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ingress_ips
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some((*ip).to_owned()),
                            ..LoadBalancerIngress::default()
                        })
                        .collect(),
                ),
            }),
            ..ServiceStatus::default()
        }),
    }
}

/// An EndpointSlice of a headless Service, labelled as the endpointslice
/// controller labels it. Each endpoint is `(ip, ready, hostname)`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: &[(&str, Option<bool>, Option<&str>)],
) -> EndpointSlice {
    let ipv6 = endpoints.first().is_some_and(|(ip, _, _)| ip.contains(':'));
    EndpointSlice {
        metadata: meta(
            namespace,
            name,
            &[
                (SERVICE_NAME_LABEL, service),
                (HEADLESS_LABEL, ""),
                (
                    "endpointslice.kubernetes.io/managed-by",
                    "endpointslice-controller.k8s.io",
                ),
            ],
        ),
        address_type: if ipv6 { "IPv6" } else { "IPv4" }.to_owned(),
        endpoints: endpoints
            .iter()
            .map(|(ip, ready, hostname)| Endpoint {
                addresses: vec![(*ip).to_owned()],
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..EndpointConditions::default()
                }),
                hostname: hostname.map(str::to_owned),
                ..Endpoint::default()
            })
            .collect(),
        ports: None,
    }
}
