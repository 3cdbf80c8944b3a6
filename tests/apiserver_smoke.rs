//! Proves the fake apiserver in `support::apiserver` is faithful enough to
//! stand in for a cluster: kube's real `Client` and kube-runtime's `watcher`
//! run against it unchanged, and every fault it injects surfaces to them the
//! way the real failure would.

mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};
use support::apiserver::{self, FakeApiServer, HEADLESS_LABEL};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

const STEP: Duration = Duration::from_secs(5);

/// Builds the client the way meshdns does: kubeconfig text, then `Config`.
async fn client_from_yaml(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml("cluster-1")).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client builds")
}

/// Retries quickly so recovery tests stay fast; the real default backoff
/// is exercised separately.
struct Quick;

impl Iterator for Quick {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(150))
    }
}

impl Backoff for Quick {
    fn reset(&mut self) {}
}

fn describe<K: ResourceExt>(item: &Result<Event<K>, watcher::Error>) -> String {
    match item {
        Ok(event) => event.to_string(),
        Err(watcher::Error::WatchError(status)) => format!("Err({})", status.code),
        Err(err) => format!("Err({err})"),
    }
}

/// Drives a watcher on its own task, as an application does: the watcher
/// only issues its next request when polled, so a test that paused polling
/// would see no watch open at all.
struct Events {
    rx: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn drive<K, S>(stream: S) -> Events
where
    K: ResourceExt + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(describe(&item)).is_err() {
                return;
            }
        }
    });
    Events { rx, task }
}

impl Events {
    /// Events until one is `target`, `target` last.
    async fn until(&mut self, target: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(text)) => {
                    let done = text == target;
                    seen.push(text);
                    if done {
                        return seen;
                    }
                }
                Ok(None) => panic!("watcher ended waiting for {target}; saw {seen:?}"),
                Err(_) => panic!("no {target} within {STEP:?}; saw {seen:?}"),
            }
        }
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn watch_requests(server: &FakeApiServer) -> Vec<support::apiserver::RequestRecord> {
    server.requests().into_iter().filter(|r| r.is_watch()).collect()
}

/// One request on a fresh connection; returns (status, head, body).
async fn raw_request(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn get(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_paginate_and_expired_continue_tokens_are_gone() {
    let server = FakeApiServer::start().await;
    for i in 0..1200 {
        server.apply_service(apiserver::service("bulk", &format!("svc-{i:04}"), &["10.96.0.1"]));
    }
    server.apply_service(apiserver::headless_service("other", "db"));
    let client = client_from_yaml(&server).await;
    let api: Api<Service> = Api::namespaced(client.clone(), "bulk");

    let mut names = Vec::new();
    let mut versions = BTreeSet::new();
    let mut pages = 0;
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(500);
        if let Some(token) = token.take() {
            params = params.continue_token(&token);
        }
        let page = api.list(&params).await.expect("list page");
        pages += 1;
        versions.insert(page.metadata.resource_version.clone());
        names.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_ {
            Some(next) if !next.is_empty() => token = Some(next),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 1200);
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), 1200, "no duplicates");
    assert_eq!(versions.len(), 1, "all pages come from one snapshot: {versions:?}");
    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/namespaces/bulk/services")
        .collect();
    assert!(
        lists.iter().all(|r| r.param("limit").as_deref() == Some("500")),
        "{lists:?}"
    );
    assert_eq!(lists.iter().filter(|r| r.param("continue").is_some()).count(), 2);

    let everything = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list all");
    assert_eq!(everything.items.len(), 1201);

    let first = api.list(&ListParams::default().limit(500)).await.expect("first page");
    let token = first.metadata.continue_.expect("a continue token");
    server.expire();
    let err = api
        .list(&ListParams::default().limit(500).continue_token(&token))
        .await
        .expect_err("an expired continue token fails");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
        "{err:?}"
    );

    let meta = api
        .list_metadata(&ListParams::default().limit(2))
        .await
        .expect("metadata list");
    assert_eq!(meta.items.len(), 2);
    assert_eq!(meta.items[0].name_any(), "svc-0000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_follows_changes_and_recovers_from_expire_drop_and_restart() {
    let server = FakeApiServer::start().await;
    server.apply_service(apiserver::service("default", "a", &["10.96.0.10"]));
    server.apply_service(apiserver::service("default", "b", &["10.96.0.11"]));
    let client = client_from_yaml(&server).await;
    let mut events = drive(watcher::watcher(Api::<Service>::all(client), watcher::Config::default()).backoff(Quick));

    let seen = events.until("InitDone").await;
    assert_eq!(seen, ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]);
    eventually("the first watch", || server.open_watches() == 1).await;
    let watch = watch_requests(&server).pop().expect("a watch request");
    assert_eq!(watch.path, "/api/v1/services");
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(watch.param("timeoutSeconds").as_deref(), Some("290"));
    assert_eq!(
        watch.param("resourceVersion"),
        Some(server.resource_version().to_string())
    );

    server.apply_service(apiserver::service("default", "c", &["10.96.0.12"]));
    assert_eq!(events.until("Apply(c)").await, ["Apply(c)"]);
    server.apply_service(apiserver::service("default", "a", &["10.96.0.20"]));
    assert_eq!(events.until("Apply(a)").await, ["Apply(a)"]);
    server.delete_service("default", "b");
    assert_eq!(events.until("Delete(b)").await, ["Delete(b)"]);

    server.expire();
    let seen = events.until("InitDone").await;
    assert_eq!(seen, ["Err(410)", "Init", "InitApply(a)", "InitApply(c)", "InitDone"]);

    // A dropped connection resumes from the last resourceVersion: no relist.
    eventually("the watch after the relist", || server.open_watches() == 1).await;
    let resume_from = server.resource_version().to_string();
    server.clear_requests();
    server.drop_watches();
    eventually("a new watch", || {
        !watch_requests(&server).is_empty() && server.open_watches() == 1
    })
    .await;
    server.apply_service(apiserver::service("default", "d", &["10.96.0.13"]));
    assert_eq!(events.until("Apply(d)").await, ["Apply(d)"]);
    let requests = server.requests();
    assert!(
        requests.iter().all(|r| r.is_watch()),
        "no list after a drop: {requests:?}"
    );
    assert_eq!(requests[0].param("resourceVersion"), Some(resume_from));

    server.stop();
    let refused = tokio::net::TcpStream::connect(server.addr()).await;
    assert!(refused.is_err(), "connections are refused while stopped");
    server.apply_service(apiserver::service("default", "e", &["10.96.0.14"]));
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.restart();
    let seen = events.until("Apply(e)").await;
    assert!(seen.len() > 1, "the outage was noticed: {seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|s| s.starts_with("Err(")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selected_slice_watch_sees_only_headless_slices() {
    let server = FakeApiServer::start().await;
    server.apply_endpoint_slice(apiserver::endpoint_slice(
        "data",
        "db-abc",
        "db",
        &[("10.0.0.2", Some(true), Some("db-0")), ("10.0.0.3", None, None)],
    ));
    let mut plain = apiserver::endpoint_slice("web", "web-abc", "web", &[("10.0.1.2", Some(true), None)]);
    plain.labels_mut().remove(HEADLESS_LABEL);
    server.apply_endpoint_slice(plain.clone());
    let client = client_from_yaml(&server).await;

    let api = Api::<EndpointSlice>::all(client.clone());
    let mut events = drive(watcher::watcher(api, watcher::Config::default().labels(HEADLESS_LABEL)).backoff(Quick));
    assert_eq!(
        events.until("InitDone").await,
        ["Init", "InitApply(db-abc)", "InitDone"]
    );
    eventually("the watch", || server.open_watches() == 1).await;
    let watch = watch_requests(&server).pop().expect("a watch request");
    assert_eq!(watch.path, "/apis/discovery.k8s.io/v1/endpointslices");
    assert_eq!(watch.param("labelSelector").as_deref(), Some(HEADLESS_LABEL));

    // Changes outside the selection are invisible; moving in is an Apply,
    // moving out a Delete.
    let mut changed = plain.clone();
    changed.endpoints[0].addresses = vec!["10.0.1.3".into()];
    server.apply_endpoint_slice(changed.clone());
    changed.labels_mut().insert(HEADLESS_LABEL.into(), String::new());
    server.apply_endpoint_slice(changed);
    assert_eq!(events.until("Apply(web-abc)").await, ["Apply(web-abc)"]);
    let mut db = apiserver::endpoint_slice("data", "db-abc", "db", &[("10.0.0.2", Some(true), Some("db-0"))]);
    db.labels_mut().remove(HEADLESS_LABEL);
    server.apply_endpoint_slice(db);
    assert_eq!(events.until("Delete(db-abc)").await, ["Delete(db-abc)"]);

    let selected = Api::<EndpointSlice>::namespaced(client, "data")
        .list(&ListParams::default().labels("kubernetes.io/service-name=db,!nothere,kubernetes.io/service-name!=web"))
        .await
        .expect("selected list");
    assert_eq!(selected.items.len(), 1);
    let endpoints = &selected.items[0].endpoints;
    assert_eq!(endpoints[0].hostname.as_deref(), Some("db-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_server_makes_the_watcher_back_off_then_recover() {
    let server = FakeApiServer::start().await;
    server.apply_service(apiserver::service("default", "a", &["10.96.0.10"]));
    let client = client_from_yaml(&server).await;
    let mut events = drive(watcher::watcher(Api::<Service>::all(client), watcher::Config::default()).default_backoff());
    events.until("InitDone").await;
    eventually("the watch", || server.open_watches() == 1).await;

    server.set_failure(Some(500));
    server.clear_requests();
    server.drop_watches();
    let window = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut errors = 0;
    while let Ok(Some(item)) = tokio::time::timeout_at(window, events.rx.recv()).await {
        assert!(item.starts_with("Err("), "only errors while failing: {item}");
        errors += 1;
    }
    let requests = server.requests().len();
    assert!(errors >= 1, "the watcher reported the failure");
    assert!(
        (1..20).contains(&requests),
        "backed off, not a hot loop: {requests} requests in 2 s"
    );

    server.set_failure(None);
    server.apply_service(apiserver::service("default", "z", &["10.96.0.99"]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let item = tokio::time::timeout_at(deadline, events.rx.recv())
            .await
            .expect("recovered in time")
            .expect("stream continues");
        if item == "Apply(z)" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watches_get_bookmarks_garbage_timeouts_and_gone() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path, "cluster-2").expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = Client::try_from(config).expect("client");
    let api: Api<Service> = Api::all(client.clone());
    server.apply_service(apiserver::service("default", "a", &["10.96.0.10"]));
    let from = server.resource_version().to_string();

    let mut events = api
        .watch(&WatchParams::default().timeout(2), &from)
        .await
        .expect("watch")
        .boxed();
    server.send_bookmarks();
    let next = tokio::time::timeout(STEP, events.next())
        .await
        .expect("an item")
        .expect("open");
    assert!(
        matches!(&next, Ok(WatchEvent::Bookmark(b)) if b.metadata.resource_version == from),
        "{next:?}"
    );
    server.inject_malformed_event();
    let next = tokio::time::timeout(STEP, events.next())
        .await
        .expect("an item")
        .expect("open");
    assert!(matches!(next, Err(kube::Error::SerdeError(_))), "{next:?}");
    server.apply_service(apiserver::service("default", "b", &["10.96.0.11"]));
    let mut kinds = Vec::new();
    let started = Instant::now();
    while let Some(item) = tokio::time::timeout(STEP, events.next()).await.expect("ends in time") {
        kinds.push(match item.expect("no more errors") {
            WatchEvent::Added(svc) => format!("ADDED {}", svc.name_any()),
            WatchEvent::Bookmark(_) => "BOOKMARK".into(),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(kinds[0], "ADDED b");
    assert!(
        kinds[1..].iter().all(|k| k == "BOOKMARK") && kinds.len() > 2,
        "periodic bookmarks: {kinds:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "timeoutSeconds closed the stream"
    );

    // A resourceVersion from before a compaction is answered with an ERROR event.
    server.expire();
    let mut events = api.watch(&WatchParams::default(), &from).await.expect("watch").boxed();
    let next = tokio::time::timeout(STEP, events.next())
        .await
        .expect("an item")
        .expect("open");
    assert!(
        matches!(&next, Ok(WatchEvent::Error(s)) if s.code == 410 && s.reason == "Expired"),
        "{next:?}"
    );
    let end = tokio::time::timeout(STEP, events.next()).await.expect("ends");
    assert!(end.is_none(), "the stream ends after the 410");

    // So is one that fell out of a short history.
    server.set_history_limit(1);
    let behind = server.resource_version().to_string();
    server.apply_service(apiserver::service("default", "a", &["10.96.0.30"]));
    server.apply_service(apiserver::service("default", "a", &["10.96.0.31"]));
    let mut events = api
        .watch(&WatchParams::default(), &behind)
        .await
        .expect("watch")
        .boxed();
    let next = tokio::time::timeout(STEP, events.next())
        .await
        .expect("an item")
        .expect("open");
    assert!(matches!(&next, Ok(WatchEvent::Error(s)) if s.code == 410), "{next:?}");

    // Streaming lists (sendInitialEvents) end their initial burst with the
    // annotated bookmark kube-runtime waits for.
    let mut events = drive(watcher::watcher(api, watcher::Config::default().streaming_lists()));
    assert_eq!(
        events.until("InitDone").await,
        ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]
    );
    let initial = watch_requests(&server).pop().expect("a watch");
    assert_eq!(initial.param("sendInitialEvents").as_deref(), Some("true"));

    let metadata_only = Api::<PartialObjectMeta<Service>>::all(client);
    let mut events = drive(watcher::watcher(metadata_only, watcher::Config::default()));
    assert_eq!(
        events.until("InitDone").await,
        ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_auth_failures_hangs_and_delays_are_answered_sanely() {
    let server = FakeApiServer::start().await;
    let addr = server.addr();
    let token = Some(server.token());

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"\x00\x01garbage\r\n\r\n").await.expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut sink)).await;

    let (status, _, body) = raw_request(addr, &get("/api/v1/services", None)).await;
    assert_eq!(status, 401, "{body}");
    for (path, expected) in [
        ("/api/v1/services?labelSelector=a%20b%20c", 400),
        ("/api/v1/services?labelSelector=%zz%", 400),
        ("/api/v1/services?fieldSelector=spec.nope%3Dx", 400),
        ("/api/v1/services?limit=-1", 400),
        ("/api/v1/services?limit=5&continue=junk", 400),
        ("/api/v1/services?watch=true&resourceVersion=abc", 400),
        ("/api/v1/services?watch=1&timeoutSeconds=x", 400),
        ("/api/v1/pods", 404),
        ("/nothing/here", 404),
        ("/api/v1/namespaces/default/services/missing", 404),
        ("/api/v1/services?resourceVersion=999999", 504),
    ] {
        let (status, _, body) = raw_request(addr, &get(path, token)).await;
        assert_eq!(status, expected, "{path}: {body}");
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("a JSON Status");
        assert_eq!(parsed["kind"], "Status", "{path}");
        assert_eq!(parsed["code"], expected, "{path}");
    }
    let (status, head, body) = raw_request(addr, &get("/api/v1/services?watch=1&timeoutSeconds=1", token)).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        body.ends_with("0\r\n\r\n"),
        "a watch ends cleanly after timeoutSeconds: {body:?}"
    );

    let client = client_from_yaml(&server).await;
    let version = client.apiserver_version().await.expect("version");
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));

    server.set_failure(Some(429));
    let (status, head, _) = raw_request(addr, &get("/api/v1/services", token)).await;
    assert_eq!(status, 429);
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    server.set_failure(None);

    server.set_hang(true);
    let mut hung = tokio::net::TcpStream::connect(addr).await.expect("connect");
    hung.write_all(get("/api/v1/services", token).as_bytes())
        .await
        .expect("write");
    let mut byte = [0u8; 1];
    let answer = tokio::time::timeout(Duration::from_millis(300), hung.read(&mut byte)).await;
    assert!(answer.is_err(), "a hung server does not answer");
    server.set_hang(false);

    server.set_list_delay(Duration::from_millis(300));
    let started = Instant::now();
    Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list");
    assert!(started.elapsed() >= Duration::from_millis(300));

    server.apply_service(apiserver::gateway_service(
        "istio-system",
        "istio-eastwestgateway",
        &[("istio", "eastwestgateway")],
        &["34.136.67.85"],
    ));
    let gateway = Api::<Service>::namespaced(client, "istio-system")
        .get("istio-eastwestgateway")
        .await
        .expect("get one object");
    assert_eq!(
        gateway.labels().get("istio").map(String::as_str),
        Some("eastwestgateway")
    );
    let ingress = gateway.status.and_then(|s| s.load_balancer).and_then(|lb| lb.ingress);
    assert_eq!(ingress.expect("ingress")[0].ip.as_deref(), Some("34.136.67.85"));

    // Dropping the handle closes held connections and frees the port.
    drop(server);
    let closed = tokio::time::timeout(STEP, hung.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after drop"
    );
}
