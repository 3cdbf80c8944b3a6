//! The admin HTTP server: Prometheus metrics, the kubelet probes and JSON debug pages, on a
//! separate (by default loopback) address so the DNS port stays DNS only.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | the Prometheus text format |
//! | `/healthz` | 200 while the process runs |
//! | `/ready` | 200 once DNS is served, 503 before; the body names the clusters not loaded |
//! | `/debug/clusters` | JSON: each cluster's source, state, services, gateways (answered and refused), last error |
//! | `/debug/table` | JSON: every table name, its records and why; `?name=` for one name |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_proto::rr::RecordType;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::explain::{self, Context, EntryView, Explanation};
use crate::hub::Hub;
use crate::metrics::{self, Metrics};
use crate::table::fqdn;
use crate::upstream::Forwarder;

/// A client must send its request headers within this long; an idle connection cannot hold a
/// task forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept, so a persistent error does not spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} (admin server): {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Whether meshdns serves DNS yet: set once start-up has bound the DNS listeners (every
/// cluster loaded, or the start-up wait expired), cleared when shutdown begins.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin pages read.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    /// Forwarded names are explained with its upstreams.
    pub forwarder: Arc<Forwarder>,
}

/// The running admin server.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        info!(%addr, "admin server listening (/metrics, /ready, /healthz, /debug/clusters, /debug/table)");
        let task = tokio::spawn(serve(listener, Arc::new(state)));
        Ok(Self { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(self) {
        // Connections live in the accept task's JoinSet and go down with it.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "admin server cannot accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, &request)) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                debug!(%peer, %error, "admin connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    let query = request.uri().query().unwrap_or_default();
    match request.uri().path() {
        "/metrics" => {
            let text = state.metrics.render(state.hub.status(), state.readiness.get());
            reply(StatusCode::OK, metrics::CONTENT_TYPE, text)
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/ready" => ready(state),
        "/debug/clusters" => json(&clusters(state)),
        "/debug/table" => table(state, query),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let missing: Vec<String> = state
        .hub
        .status()
        .into_iter()
        .filter(|c| !c.loaded)
        .map(|c| c.name)
        .collect();
    if state.readiness.get() {
        let body = if missing.is_empty() {
            "ready\n".to_string()
        } else {
            format!(
                "ready (the start-up wait expired; not loaded yet: {})\n",
                missing.join(", ")
            )
        };
        return reply(StatusCode::OK, TEXT, body);
    }
    let body = if missing.is_empty() {
        "not ready: starting\n".to_string()
    } else {
        format!("not ready: waiting for clusters {}\n", missing.join(", "))
    };
    reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterView {
    name: String,
    local: bool,
    source: String,
    loaded: bool,
    stale: bool,
    services: usize,
    gateways: Vec<String>,
    /// `127.0.0.1 (loopback)`: reported gateway addresses that are never answered.
    refused_gateway_addresses: Vec<String>,
    last_error: Option<String>,
    errors: u64,
    seconds_since_update: Option<f64>,
}

fn clusters(state: &AdminState) -> Vec<ClusterView> {
    let now = Instant::now();
    state
        .hub
        .status()
        .into_iter()
        .map(|c| ClusterView {
            gateways: c.gateways.iter().map(ToString::to_string).collect(),
            refused_gateway_addresses: c.refused_gateways.iter().map(ToString::to_string).collect(),
            seconds_since_update: c.last_update.map(|at| now.saturating_duration_since(at).as_secs_f64()),
            name: c.name,
            local: c.local,
            source: c.source,
            loaded: c.loaded,
            stale: c.stale,
            services: c.services,
            last_error: c.last_error,
            errors: c.errors,
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TableView {
    generation: u64,
    all_loaded: bool,
    names: Vec<EntryView>,
    /// For `?name=` of a name that is not a table entry: what the rules make of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    explanation: Option<Explanation>,
}

fn table(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let params: HashMap<String, String> = query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect();
    let table = state.hub.table().load_full();
    let mut view = TableView {
        generation: table.generation(),
        all_loaded: table.all_loaded(),
        names: Vec::new(),
        explanation: None,
    };
    match params.get("name").filter(|n| !n.is_empty()) {
        None => view.names = explain::table_entries(&table),
        Some(raw) => {
            let Some(name) = fqdn(raw) else {
                return reply(StatusCode::BAD_REQUEST, TEXT, format!("{raw:?} is not a DNS name\n"));
            };
            match table.get(&name) {
                Some(entry) => view.names.push(explain::describe_entry(&table, &name, entry)),
                None => {
                    let context = Context {
                        upstreams: state.forwarder.config().servers,
                        clusters: state.hub.status(),
                    };
                    view.explanation = Some(explain::explain(&table, &name, RecordType::A, &context));
                }
            }
        }
    }
    json(&view)
}

/// Percent-decoding of a query-string component (`+` is a space); `None` if malformed.
fn decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
    }
    String::from_utf8(out).ok()
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(mut text) => {
            text.push('\n');
            reply(StatusCode::OK, JSON, text)
        }
        Err(error) => {
            warn!(%error, "cannot encode a debug page");
            reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{error}\n"))
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_are_decoded() {
        assert_eq!(decode("a%2Eb+c").as_deref(), Some("a.b c"));
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%4"), None);
    }
}
