//! The DNS listeners: one UDP socket and one TCP listener per listen address, on the same port
//! (so `dig +tcp` finds the server where plain `dig` did, even with port 0).
//!
//! meshdns runs its own receive and accept loops around hickory-server's [`RequestHandler`]
//! instead of hickory's `Server`, for shutdown: `Server` aborts every query still in flight
//! when it stops, while a sidecar that is being terminated must answer what it has already
//! received. Here a stop first reads what the sockets had already queued (until they are
//! quiet for [`DRAIN_QUIET`], at most [`DRAIN_READ_MAX`]), then closes the door and waits for
//! the answers in flight, up to the drain deadline.
//!
//! UDP is read in batches (`recvmmsg`), and the common question, an address query for a name
//! the table holds, is answered on the spot by [`crate::fast`], the batch's answers going out
//! in one `sendmmsg`: no task, no allocation, a fraction of a system call per query. Every
//! other datagram gets a task that runs the handler. The handler stays the one place that
//! decides everything else, and the fast path only ever declines to it.
//!
//! Resource caps keep a misbehaving or hostile client from growing the sidecar: UDP queries
//! in the handler at once, TCP connections, queries per TCP connection, and an idle timer
//! that only a whole query or an answer restarts.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hickory_proto::op::{Edns, Header, HeaderCounts, Message, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::fast;
use crate::handler;
use crate::hub::SharedTable;
use crate::metrics::{DropReason, MalformedReason, Metrics, Outcome};
use crate::relay::{Plan, Relay, Relayed, Step};
use crate::upstream::Transport;
use crate::wire::{self, MIN_UDP_PAYLOAD, OPCODE_MASK, RCODE_FORMERR, RCODE_NOTIMP, UdpPayload};

/// How many times a port-0 bind retries when the UDP port it got is taken for TCP.
const SAME_PORT_ATTEMPTS: usize = 16;
/// After a stop, a socket or connection that delivers nothing for this long has nothing more
/// queued: what the kernel had received before the stop is readable at once.
pub const DRAIN_QUIET: Duration = Duration::from_millis(20);
/// After a stop, reading ends this long after it even if clients keep sending: enough to empty
/// a full socket buffer, short enough that the door really closes.
pub const DRAIN_READ_MAX: Duration = Duration::from_millis(250);
/// Largest DNS message (TCP's length prefix caps it; no datagram is larger either).
const MAX_MESSAGE_LEN: usize = 65_535;
/// Pause after a failed receive or accept, so a persistent error does not spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Length prefix of a DNS message over TCP.
const TCP_LENGTH_PREFIX: usize = 2;
/// Datagrams read per `recvmmsg` call and answers sent per `sendmmsg` call: enough to cut the
/// system calls per query well below one under load, small enough that one batch does not
/// hold up the other tasks of a single-threaded runtime.
const UDP_BATCH: usize = 32;
/// Batches read per wake-up before yielding to the runtime's other tasks.
const UDP_BATCHES_PER_WAKE: usize = 8;
/// Room for one fast-path answer; larger answers take the full path, which truncates.
const FAST_REPLY_MAX: usize = 4096;
/// Default for [`ServerSettings::max_udp_in_flight`]: far above what one pod's applications
/// have outstanding, far below what would make the sidecar's memory grow (each waiting
/// query holds a few KiB).
pub const DEFAULT_MAX_UDP_IN_FLIGHT: usize = 1024;
/// Default for [`ServerSettings::max_tcp_connections`]: stub resolvers open one connection
/// per lookup that fell back to TCP and close it after the answer.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 128;
/// Default for [`ServerSettings::max_tcp_pipeline`] (glibc pipelines A and AAAA).
pub const DEFAULT_MAX_TCP_PIPELINE: usize = 16;

/// Whether binding `addr` failed because its address family is not there: no IPv6 in the
/// kernel (EAFNOSUPPORT), or IPv6 disabled so that `::1` is not on the loopback interface.
fn family_unavailable(addr: SocketAddr, error: &io::Error) -> bool {
    let errno = error.raw_os_error();
    addr.is_ipv6()
        && (errno == Some(nix::errno::Errno::EAFNOSUPPORT as i32)
            || (errno == Some(nix::errno::Errno::EADDRNOTAVAIL as i32) && addr.ip().is_loopback()))
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("no listen address could be bound")]
    NoAddress,
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: std::io::Error,
    },
}

/// How the listeners behave, besides the handler.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// A TCP client that sends nothing this long is disconnected; a response that cannot be
    /// written in this long is abandoned.
    pub tcp_idle_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// The table the UDP fast path answers from ([`crate::fast`]); `None` sends every query
    /// the full way through the handler.
    pub fast_path: Option<SharedTable>,
    /// Forwards plain UDP queries for names the fast path's table does not own without the
    /// handler ([`crate::relay`]); `None`, or no `fast_path`, sends them through the handler.
    pub relay: Option<Arc<Relay>>,
    /// Most UDP queries being worked on at once (forwarded ones wait on upstreams); beyond it
    /// a query is answered SERVFAIL at once instead of holding memory.
    pub max_udp_in_flight: usize,
    /// Most TCP connections open at once; a connection beyond it is closed on accept.
    pub max_tcp_connections: usize,
    /// Most queries of one TCP connection worked on at once; the connection is not read
    /// further until one is answered.
    pub max_tcp_pipeline: usize,
    /// How large UDP replies may be (`maxUdpPayload`); larger ones are truncated to whole
    /// records with TC set, so the client asks again over TCP.
    pub udp_payload: UdpPayload,
}

impl ServerSettings {
    /// The defaults for everything but the fast path's table.
    pub fn new(tcp_idle_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            tcp_idle_timeout,
            metrics,
            fast_path: None,
            relay: None,
            max_udp_in_flight: DEFAULT_MAX_UDP_IN_FLIGHT,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            max_tcp_pipeline: DEFAULT_MAX_TCP_PIPELINE,
            udp_payload: UdpPayload::default(),
        }
    }
}

/// When a stop came and when the answers in flight are abandoned.
#[derive(Clone, Copy, Debug)]
struct Stop {
    /// No more reading after this.
    read_until: Instant,
    deadline: Instant,
}

impl Stop {
    /// Until when to wait for the next message: the quiet window, within the reading time.
    fn quiet(&self) -> Instant {
        self.read_until.min(Instant::now() + DRAIN_QUIET)
    }
}

/// `None` while serving.
type StopSignal = watch::Receiver<Option<Stop>>;

/// The running DNS listeners and the addresses they actually listen on.
pub struct DnsServer {
    local_addrs: Vec<SocketAddr>,
    stop: watch::Sender<Option<Stop>>,
    listeners: JoinSet<()>,
}

struct Shared<H> {
    handler: H,
    settings: ServerSettings,
}

impl DnsServer {
    /// Binds every address; any failure is returned before anything is served.
    pub async fn bind<H: RequestHandler>(
        listen: &[SocketAddr],
        handler: H,
        settings: ServerSettings,
    ) -> Result<Self, ServerError> {
        let mut sockets = Vec::with_capacity(listen.len());
        for &addr in listen {
            if !addr.ip().is_loopback() {
                warn!(%addr, "listening on a non-loopback address: meshdns will answer (and forward for) other hosts");
            }
            match bind_pair(addr).await {
                Ok(pair) => sockets.push(pair),
                // The manifests listen on 127.0.0.1 and [::1]; a node without IPv6 must not
                // lose DNS for that. Any other failure is the operator's to see.
                Err(ServerError::Bind { source, .. }) if family_unavailable(addr, &source) && listen.len() > 1 => {
                    warn!(%addr, error = %source, "IPv6 is not available here; not listening on this address");
                }
                Err(error) => return Err(error),
            }
        }
        if sockets.is_empty() {
            return Err(ServerError::NoAddress);
        }
        let shared = Arc::new(Shared { handler, settings });
        let (stop, stop_rx) = watch::channel(None);
        let mut listeners = JoinSet::new();
        let mut local_addrs = Vec::with_capacity(sockets.len());
        for (udp, tcp, addr) in sockets {
            info!(%addr, "listening for DNS on UDP and TCP");
            local_addrs.push(addr);
            listeners.spawn(serve_udp(Arc::new(udp), Arc::clone(&shared), stop_rx.clone()));
            listeners.spawn(serve_tcp(tcp, Arc::clone(&shared), stop_rx.clone()));
        }
        Ok(Self {
            local_addrs,
            stop,
            listeners,
        })
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops reading new queries and waits, at most `drain`, for the answers to those already
    /// received; whatever is still unanswered then is abandoned.
    pub async fn shutdown(mut self, drain: Duration) {
        let now = Instant::now();
        let deadline = now + drain;
        let read_until = deadline.min(now + DRAIN_READ_MAX);
        // Receivers only go away with their listeners, which then need no signal.
        let _ = self.stop.send(Some(Stop { read_until, deadline }));
        let listeners = async { while self.listeners.join_next().await.is_some() {} };
        // Each listener stops at the deadline by itself; the margin covers its last wake-up.
        if tokio::time::timeout_at(deadline + DRAIN_QUIET, listeners)
            .await
            .is_err()
        {
            warn!("DNS listeners did not stop at the drain deadline; aborting them");
        }
        self.listeners.abort_all();
    }
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), ServerError> {
    let err = |proto, source| ServerError::Bind { addr, proto, source };
    let attempts = if addr.port() == 0 { SAME_PORT_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await.map_err(|e| err("udp", e))?;
        let bound = udp.local_addr().map_err(|e| err("udp", e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e) => last = Some(e),
        }
    }
    Err(err(
        "tcp",
        last.unwrap_or_else(|| std::io::Error::other("no attempt made")),
    ))
}

/// Waits for the stop signal (a stop now, if the server is gone).
async fn stopped(stop: &mut StopSignal) -> Stop {
    loop {
        if let Some(stop) = *stop.borrow_and_update() {
            return stop;
        }
        if stop.changed().await.is_err() {
            let now = Instant::now();
            return Stop {
                read_until: now,
                deadline: now,
            };
        }
    }
}

/// Removes finished tasks without waiting, so a long-lived set does not grow.
fn reap(tasks: &mut JoinSet<()>) {
    while tasks.try_join_next().is_some() {}
}

/// Waits for `tasks` until `deadline`; aborts (and reports) what is left.
async fn finish(mut tasks: JoinSet<()>, deadline: Instant, what: &'static str) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, all).await.is_err() {
        warn!(abandoned = tasks.len(), what, "drain time over; abandoning");
        tasks.abort_all();
    }
}

async fn serve_udp<H: RequestHandler>(socket: Arc<UdpSocket>, shared: Arc<Shared<H>>, mut stop: StopSignal) {
    let mut tasks = JoinSet::new();
    let mut batch = UdpBatch::new();
    let stopping = loop {
        tokio::select! {
            biased;
            stopping = stopped(&mut stop) => break stopping,
            ready = socket.readable() => match ready {
                Ok(()) => {
                    let unsent = read_ready(&socket, &shared, &mut batch, &mut tasks);
                    send_unsent(&socket, unsent).await;
                }
                Err(error) => {
                    debug!(%error, "cannot wait on the UDP socket");
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            },
        }
        reap(&mut tasks);
    };
    // Datagrams the kernel queued before the stop were received; they get their answers.
    while let Ok(Ok(())) = tokio::time::timeout_at(stopping.quiet(), socket.readable()).await {
        let unsent = read_ready(&socket, &shared, &mut batch, &mut tasks);
        send_unsent(&socket, unsent).await;
        reap(&mut tasks);
    }
    finish(tasks, stopping.deadline, "UDP queries").await;
}

/// Buffers for one batch of datagrams and the fast-path answers to them. The `recvmmsg`
/// headers are not kept here: they hold raw pointers, so they cannot live across an await.
struct UdpBatch {
    /// [`UDP_BATCH`] slots of [`MAX_MESSAGE_LEN`] bytes; only the pages a datagram touches
    /// become resident.
    received: Vec<u8>,
    /// Length and source of each datagram in `received`.
    sources: Vec<(usize, Option<SocketAddr>)>,
    /// [`UDP_BATCH`] slots of [`FAST_REPLY_MAX`] bytes.
    replies: Vec<u8>,
    /// Length and destination of each answer in `replies`.
    destinations: Vec<(usize, SocketAddr)>,
    /// Which address comes first in the next answer with several.
    rotation: usize,
}

impl UdpBatch {
    fn new() -> Self {
        Self {
            received: vec![0; UDP_BATCH * MAX_MESSAGE_LEN],
            sources: Vec::with_capacity(UDP_BATCH),
            replies: vec![0; UDP_BATCH * FAST_REPLY_MAX],
            destinations: Vec::with_capacity(UDP_BATCH),
            rotation: 0,
        }
    }
}

/// Reads what the socket has queued, a batch at a time, until it is empty or the per-wake
/// budget is spent. Table names are answered on the spot, everything else goes to a task of
/// its own. Returns the answers the socket could not take without waiting.
fn read_ready<H: RequestHandler>(
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared<H>>,
    batch: &mut UdpBatch,
    tasks: &mut JoinSet<()>,
) -> Vec<(Vec<u8>, SocketAddr)> {
    let fd = socket.as_raw_fd();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
    let mut unsent = Vec::new();
    // One snapshot per wake-up: a rebuilt table is picked up at the next one.
    let table = shared.settings.fast_path.as_ref().map(|t| t.load());
    let metrics = &shared.settings.metrics;
    for _ in 0..UDP_BATCHES_PER_WAKE {
        let received = socket.try_io(Interest::READABLE, || {
            recv_batch(fd, &mut headers, &mut batch.received, &mut batch.sources)
        });
        let count = match received {
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => {
                debug!(%error, "cannot receive on the UDP socket");
                break;
            }
        };
        batch.destinations.clear();
        for (slot, &(len, src)) in batch.sources.iter().enumerate() {
            let query = batch.received.get(slot * MAX_MESSAGE_LEN..slot * MAX_MESSAGE_LEN + len);
            let (Some(query), Some(src)) = (query, src) else {
                metrics.dropped(Transport::Udp, DropReason::Source);
                continue;
            };
            if let Some(table) = &table
                && answerable(src)
            {
                let started = std::time::Instant::now();
                let at = batch.destinations.len() * FAST_REPLY_MAX;
                let out = &mut batch.replies[at..at + FAST_REPLY_MAX];
                if let Some(answer) = fast::answer(table, query, batch.rotation, shared.settings.udp_payload, out) {
                    batch.rotation = batch.rotation.wrapping_add(1);
                    batch.destinations.push((answer.len, src));
                    debug!(client = %src, name = %fast::QuestionName(query), qtype = %answer.qtype, outcome = answer.rule.as_str(), rcode = %ResponseCode::NoError, elapsed_us = started.elapsed().as_micros() as u64, path = "fast", "query");
                    metrics.request(Transport::Udp, answer.qtype, Outcome::from(answer.rule), started);
                    continue;
                }
                if let Some(relay) = &shared.settings.relay {
                    match relay.step(table, query, out) {
                        Step::Answered { len, qtype } => {
                            batch.destinations.push((len, src));
                            debug!(client = %src, name = %fast::QuestionName(query), %qtype, outcome = Outcome::CacheHit.as_str(), elapsed_us = started.elapsed().as_micros() as u64, path = "fast", "query");
                            metrics.request(Transport::Udp, qtype, Outcome::CacheHit, started);
                            continue;
                        }
                        Step::Forward(plan) if tasks.len() < shared.settings.max_udp_in_flight => {
                            relay_datagram(query, plan, src, socket, shared, relay, tasks);
                            continue;
                        }
                        Step::Forward(_) | Step::FullPath => {}
                    }
                }
            }
            udp_datagram(query, src, socket, shared, tasks);
        }
        send_batch(socket, fd, &batch.replies, &batch.destinations, &mut unsent);
        if count < UDP_BATCH {
            break;
        }
    }
    unsent
}

/// One `recvmmsg`: fills `sources` with the length and sender of each datagram received.
fn recv_batch(
    fd: RawFd,
    headers: &mut MultiHeaders<SockaddrStorage>,
    buffer: &mut [u8],
    sources: &mut Vec<(usize, Option<SocketAddr>)>,
) -> io::Result<usize> {
    sources.clear();
    let mut slots: Vec<[IoSliceMut<'_>; 1]> = buffer
        .chunks_mut(MAX_MESSAGE_LEN)
        .map(|slot| [IoSliceMut::new(slot)])
        .collect();
    let messages = recvmmsg(fd, headers, slots.iter_mut(), MsgFlags::MSG_DONTWAIT, None).map_err(io::Error::from)?;
    sources.extend(messages.map(|m| (m.bytes, m.address.as_ref().and_then(socket_addr))));
    Ok(sources.len())
}

/// Sends the answers of one batch with `sendmmsg`; those the socket cannot take now are
/// copied to `unsent`, one it refuses outright is dropped (the client retries).
fn send_batch(
    socket: &UdpSocket,
    fd: RawFd,
    replies: &[u8],
    destinations: &[(usize, SocketAddr)],
    unsent: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    if destinations.is_empty() {
        return;
    }
    let slices: Vec<[IoSlice<'_>; 1]> = destinations
        .iter()
        .enumerate()
        .map(|(slot, &(len, _))| {
            [IoSlice::new(
                &replies[slot * FAST_REPLY_MAX..slot * FAST_REPLY_MAX + len],
            )]
        })
        .collect();
    let addresses: Vec<Option<SockaddrStorage>> = destinations
        .iter()
        .map(|&(_, dst)| Some(SockaddrStorage::from(dst)))
        .collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(destinations.len(), None);
    let mut next = 0;
    // Each round sends at least one answer or drops one, so this ends.
    while next < destinations.len() {
        let sent = socket.try_io(Interest::WRITABLE, || {
            let no_control: [ControlMessage<'_>; 0] = [];
            sendmmsg(
                fd,
                &mut headers,
                &slices[next..],
                &addresses[next..],
                no_control,
                MsgFlags::MSG_DONTWAIT,
            )
            .map(Iterator::count)
            .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => break,
            Ok(count) => next += count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => {
                debug!(client = %destinations[next].1, %error, "cannot send an answer");
                next += 1;
            }
        }
    }
    for (slot, &(len, dst)) in destinations.iter().enumerate().skip(next) {
        unsent.push((
            replies[slot * FAST_REPLY_MAX..slot * FAST_REPLY_MAX + len].to_vec(),
            dst,
        ));
    }
}

/// Sends what a full socket buffer refused, waiting for room.
async fn send_unsent(socket: &UdpSocket, unsent: Vec<(Vec<u8>, SocketAddr)>) {
    for (bytes, dst) in unsent {
        if let Err(error) = socket.send_to(&bytes, dst).await {
            debug!(client = %dst, %error, "cannot send an answer");
        }
    }
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

fn udp_datagram<H: RequestHandler>(
    bytes: &[u8],
    src: SocketAddr,
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared<H>>,
    tasks: &mut JoinSet<()>,
) {
    let incoming = if tasks.len() >= shared.settings.max_udp_in_flight {
        overloaded(bytes, src, &shared.settings.metrics)
    } else {
        incoming(bytes, src, Transport::Udp, &shared.settings.metrics)
    };
    match incoming {
        Incoming::Query(request) => {
            let responder = UdpResponder::new(Arc::clone(socket), &request, shared.settings.udp_payload);
            let shared = Arc::clone(shared);
            tasks.spawn(async move {
                shared.handler.handle_request::<_, TokioTime>(&request, responder).await;
            });
        }
        Incoming::Reply(reply) => {
            // Sent now rather than by a task: an overloaded server must not queue more.
            if let Err(error) = socket.try_send_to(&reply, src) {
                debug!(client = %src, %error, "cannot send error response");
            }
        }
        Incoming::Dropped => {}
    }
}

/// Forwards a query the relay took in a task of its own (counted against the in-flight cap);
/// a reply the relay cannot pass on as it is sends the query the full way.
fn relay_datagram<H: RequestHandler>(
    query: &[u8],
    plan: Plan,
    src: SocketAddr,
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared<H>>,
    relay: &Arc<Relay>,
    tasks: &mut JoinSet<()>,
) {
    let query = query.to_vec();
    let socket = Arc::clone(socket);
    let shared = Arc::clone(shared);
    let relay = Arc::clone(relay);
    tasks.spawn(async move {
        match relay.relay(&query, &plan, src).await {
            Relayed::Reply(reply) => {
                if let Err(error) = socket.send_to(&reply, src).await {
                    debug!(client = %src, %error, "cannot send an answer");
                }
            }
            Relayed::Declined(fetched) => match incoming(&query, src, Transport::Udp, &shared.settings.metrics) {
                // The reply already received is answered as the full path answers it, not
                // fetched a second time.
                Incoming::Query(request) if let Some(reply) = fetched => {
                    let payload = shared.settings.udp_payload;
                    let edns = handler::response_edns(&request, reply.edns.as_ref(), payload);
                    let response = handler::forwarded_response(&request, &reply, edns.as_ref());
                    let mut responder = UdpResponder::new(socket, &request, payload);
                    if let Err(error) = responder.send_response(response).await {
                        debug!(client = %src, %error, "cannot send an answer");
                    }
                }
                Incoming::Query(request) => {
                    let responder = UdpResponder::new(socket, &request, shared.settings.udp_payload);
                    shared.handler.handle_request::<_, TokioTime>(&request, responder).await;
                }
                Incoming::Reply(reply) => {
                    if let Err(error) = socket.send_to(&reply, src).await {
                        debug!(client = %src, %error, "cannot send error response");
                    }
                }
                Incoming::Dropped => {}
            },
        }
    });
}

/// The answer to a UDP query that arrives while [`ServerSettings::max_udp_in_flight`] queries
/// are being worked on: SERVFAIL with the question, so the client tries its next server or
/// again later instead of waiting out its timeout.
fn overloaded(bytes: &[u8], src: SocketAddr, metrics: &Metrics) -> Incoming {
    if !answerable(src) {
        metrics.dropped(Transport::Udp, DropReason::Source);
        return Incoming::Dropped;
    }
    metrics.dropped(Transport::Udp, DropReason::Overload);
    let Ok(query) = Message::from_vec(bytes) else {
        return Incoming::Dropped;
    };
    if query.metadata.message_type != MessageType::Query {
        return Incoming::Dropped;
    }
    let mut reply = Message::new(query.metadata.id, MessageType::Response, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = ResponseCode::ServFail;
    reply.add_queries(query.queries);
    match reply.to_vec() {
        Ok(bytes) => Incoming::Reply(bytes),
        Err(_) => Incoming::Dropped,
    }
}

async fn serve_tcp<H: RequestHandler>(listener: TcpListener, shared: Arc<Shared<H>>, mut stop: StopSignal) {
    let mut connections = JoinSet::new();
    let stopping = loop {
        tokio::select! {
            biased;
            stopping = stopped(&mut stop) => break stopping,
            accepted = listener.accept() => match accepted {
                Ok((stream, src)) => admit(stream, src, &shared, &stop, &mut connections),
                Err(error) => {
                    debug!(%error, "cannot accept a TCP connection");
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            },
        }
        reap(&mut connections);
    };
    // Connections the kernel completed before the stop may already carry a query.
    while let Ok(Ok((stream, src))) = tokio::time::timeout_at(stopping.quiet(), listener.accept()).await {
        admit(stream, src, &shared, &stop, &mut connections);
    }
    drop(listener);
    finish(connections, stopping.deadline, "TCP connections").await;
}

/// Serves an accepted connection, or closes it at once when
/// [`ServerSettings::max_tcp_connections`] are open: the client sees the close and tries
/// elsewhere, rather than meshdns holding a task and buffers for it.
fn admit<H: RequestHandler>(
    stream: TcpStream,
    src: SocketAddr,
    shared: &Arc<Shared<H>>,
    stop: &StopSignal,
    connections: &mut JoinSet<()>,
) {
    reap(connections);
    if connections.len() >= shared.settings.max_tcp_connections {
        debug!(client = %src, open = connections.len(), "too many TCP connections; closing the new one");
        shared.settings.metrics.dropped(Transport::Tcp, DropReason::Overload);
        return;
    }
    connections.spawn(connection(stream, src, Arc::clone(shared), stop.clone()));
}

/// Serves one TCP connection. Up to [`ServerSettings::max_tcp_pipeline`] of its queries are
/// worked on at once and answered as they complete (RFC 7766 allows any order); beyond that
/// the connection is not read until an answer is out, so a client that pipelines without end
/// is held back by its own socket buffer, not by meshdns's memory.
///
/// The idle timer restarts only when a whole query arrives or an answer leaves, so a client
/// that trickles a byte at a time, or connects and sends nothing, is dropped after
/// [`ServerSettings::tcp_idle_timeout`] all the same.
async fn connection<H: RequestHandler>(
    stream: TcpStream,
    src: SocketAddr,
    shared: Arc<Shared<H>>,
    mut stop: StopSignal,
) {
    // One small write per answer; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let idle = shared.settings.tcp_idle_timeout;
    let pipeline = shared.settings.max_tcp_pipeline.max(1);
    let responder = TcpResponder {
        writer: Arc::new(Mutex::new(writer)),
        write_timeout: idle,
    };
    let mut buf = BytesMut::with_capacity(usize::from(MIN_UDP_PAYLOAD));
    let mut queries = JoinSet::new();
    let mut idle_until = Instant::now() + idle;
    'serve: loop {
        while queries.len() < pipeline
            && let Some(message) = take_frame(&mut buf)
        {
            match incoming(&message, src, Transport::Tcp, &shared.settings.metrics) {
                Incoming::Query(request) => {
                    // Only a real query restarts the idle timer: empty or garbage frames sent
                    // every second must not hold a connection (and its task) for ever.
                    idle_until = Instant::now() + idle;
                    let shared = Arc::clone(&shared);
                    let responder = responder.clone();
                    queries.spawn(async move {
                        shared.handler.handle_request::<_, TokioTime>(&request, responder).await;
                    });
                }
                Incoming::Reply(reply) => {
                    if let Err(error) = responder.write(&reply).await {
                        debug!(client = %src, %error, "cannot send error response");
                        break 'serve;
                    }
                    // A frame that is not a DNS message (FORMERR) ends the stream: what follows
                    // it cannot be trusted to be framed either. NOTIMP is a well-formed query.
                    if reply.get(3).is_some_and(|&b| b & 0x0F == RCODE_FORMERR) {
                        debug!(client = %src, "undecodable TCP frame; closing the connection");
                        break 'serve;
                    }
                }
                Incoming::Dropped => {
                    debug!(client = %src, "TCP frame that is not a query; closing the connection");
                    break 'serve;
                }
            }
        }
        let draining = *stop.borrow();
        let limit = match draining {
            None => idle_until,
            Some(stopping) => stopping.quiet(),
        };
        let readable = queries.len() < pipeline;
        tokio::select! {
            biased;
            changed = stop.changed(), if draining.is_none() => {
                if changed.is_err() {
                    break 'serve;
                }
            }
            Some(_) = queries.join_next(), if !queries.is_empty() => idle_until = Instant::now() + idle,
            read = tokio::time::timeout_at(limit, reader.read_buf(&mut buf)), if readable => match read {
                // The client is done sending; it still gets the answers in flight.
                Ok(Ok(0)) => break 'serve,
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    debug!(client = %src, %error, "TCP read failed");
                    break 'serve;
                }
                // Idle too long, or quiet after a stop.
                Err(_) => break 'serve,
            },
        }
    }
    // Bounded by the handler (the forwarding deadline, the write timeout); a stop's deadline
    // aborts the whole connection task anyway.
    while queries.join_next().await.is_some() {}
}

/// The next complete length-prefixed message in `buf`, if one is there.
pub fn take_frame(buf: &mut BytesMut) -> Option<BytesMut> {
    let prefix = buf.get(..TCP_LENGTH_PREFIX)?;
    let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
    if buf.len() < TCP_LENGTH_PREFIX + len {
        buf.reserve(TCP_LENGTH_PREFIX + len - buf.len());
        return None;
    }
    buf.advance(TCP_LENGTH_PREFIX);
    Some(buf.split_to(len))
}

/// What to do with one received message.
pub enum Incoming {
    Query(Box<Request>),
    /// An error answer built without the handler (FORMERR for an undecodable query).
    Reply(Vec<u8>),
    Dropped,
}

/// The checks every received message passes before the handler sees it: the source, the
/// header, decoding (FORMERR when it fails). Public for the fuzz targets.
pub fn incoming(bytes: &[u8], src: SocketAddr, transport: Transport, metrics: &Metrics) -> Incoming {
    if !answerable(src) {
        metrics.dropped(transport, DropReason::Source);
        return Incoming::Dropped;
    }
    let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else {
        metrics.dropped(transport, DropReason::Short);
        return Incoming::Dropped;
    };
    if header.metadata.message_type == MessageType::Response {
        metrics.dropped(transport, DropReason::Response);
        return Incoming::Dropped;
    }
    // Only the header of a query of another opcode is meshdns's to read.
    if bytes[2] & OPCODE_MASK != 0 {
        metrics.malformed(transport, MalformedReason::Opcode);
        return bare(bytes, RCODE_NOTIMP);
    }
    let protocol = match transport {
        Transport::Udp => Protocol::Udp,
        Transport::Tcp => Protocol::Tcp,
    };
    let decoded = if fast::question_points_into_header(bytes) {
        Err("the question name points into the header".to_string())
    } else {
        Request::from_bytes(bytes.to_vec(), src, protocol).map_err(|e| e.to_string())
    };
    match decoded {
        Ok(request) if request.queries.queries().len() != 1 => {
            metrics.malformed(transport, MalformedReason::QuestionCount);
            bare(bytes, RCODE_FORMERR)
        }
        Ok(request) => Incoming::Query(Box::new(request)),
        Err(error) => {
            debug!(client = %src, %error, "undecodable query; answering FORMERR");
            metrics.malformed(transport, MalformedReason::Undecodable);
            bare(bytes, RCODE_FORMERR)
        }
    }
}

/// A header-only reply ([`wire::bare_reply`]).
fn bare(query: &[u8], rcode: u8) -> Incoming {
    match wire::bare_reply(query, rcode) {
        Some(reply) => Incoming::Reply(reply.to_vec()),
        None => Incoming::Dropped,
    }
}

/// Whether an answer can be sent to `src` at all: never to port 0, an unspecified, broadcast or
/// multicast address (a spoofed source there would turn one query into many packets).
fn answerable(src: SocketAddr) -> bool {
    let ip = src.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    src.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && !broadcast
}

/// An encoded response.
pub struct Encoded {
    pub info: ResponseInfo,
    pub bytes: Vec<u8>,
    /// The response could not be encoded; `bytes` is the bare SERVFAIL that replaced it.
    pub fell_back: bool,
}

/// The largest UDP answer for `request` under `payload` ([`UdpPayload::limit`]).
pub fn udp_limit(request: &Request, payload: UdpPayload) -> u16 {
    payload.limit(request.edns.as_ref().map(Edns::max_payload))
}

/// Serializes a response, truncated to whole records (TC, [`wire::truncate`]) when it is
/// longer than `max_size`; an answer that cannot be encoded at all becomes a bare SERVFAIL.
/// Public for the fuzz targets, which encode as the server does.
///
/// hickory's encoder is given no limit: its own truncation stops in the middle of the record
/// that does not fit and leaves the part written, bytes that strict clients reject.
pub fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max_size: u16,
) -> Result<Encoded, NetError> {
    let id = response.metadata().id;
    let op_code = response.metadata().op_code;
    let mut bytes = Vec::with_capacity(usize::from(MIN_UDP_PAYLOAD));
    let mut encoder = BinEncoder::new(&mut bytes);
    let emitted = response.destructive_emit(&mut encoder).and_then(|info| {
        if bytes.len() <= usize::from(max_size) {
            return Ok(info);
        }
        wire::truncate(&mut bytes, usize::from(max_size)).ok_or(hickory_proto::ProtoError::Message(
            "the reply does not truncate to whole records",
        ))?;
        Ok(ResponseInfo::from(Header::read(&mut BinDecoder::new(&bytes))?))
    });
    match emitted {
        Ok(info) => Ok(Encoded {
            info,
            bytes,
            fell_back: false,
        }),
        Err(error) => {
            warn!(%error, "cannot encode a response; answering SERVFAIL");
            let mut metadata = Metadata::new(id, MessageType::Response, op_code);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            Ok(Encoded {
                bytes: header.to_bytes()?,
                info: ResponseInfo::from(header),
                fell_back: true,
            })
        }
    }
}

/// Sends answers to one UDP client from the socket its query came in on, each cut to what the
/// client takes.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
    limit: u16,
}

impl UdpResponder {
    fn new(socket: Arc<UdpSocket>, request: &Request, payload: UdpPayload) -> Self {
        Self {
            socket,
            dst: request.src(),
            limit: udp_limit(request, payload),
        }
    }
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let Encoded { info, bytes, .. } = encode(response, self.limit)?;
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

/// Writes answers to one TCP connection, each with its length prefix.
#[derive(Clone)]
struct TcpResponder {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    write_timeout: Duration,
}

impl TcpResponder {
    async fn write(&self, message: &[u8]) -> std::io::Result<()> {
        let len = u16::try_from(message.len())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "answer too large for TCP"))?;
        let mut framed = Vec::with_capacity(message.len() + TCP_LENGTH_PREFIX);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(message);
        let mut writer = self.writer.lock().await;
        tokio::time::timeout(self.write_timeout, writer.write_all(&framed))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read its answers"))?
    }
}

#[async_trait::async_trait]
impl ResponseHandler for TcpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let Encoded { info, bytes, .. } = encode(response, u16::MAX)?;
        self.write(&bytes).await?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_at_their_length_prefix() {
        let mut buf = BytesMut::from(&[0u8, 3, 1, 2, 3, 0, 2, 9][..]);
        assert_eq!(take_frame(&mut buf).as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(take_frame(&mut buf), None, "only one byte of the second message");
        buf.extend_from_slice(&[8]);
        assert_eq!(take_frame(&mut buf).as_deref(), Some(&[9u8, 8][..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn unanswerable_sources() {
        for (addr, ok) in [
            ("127.0.0.1:5353", true),
            ("127.0.0.1:0", false),
            ("0.0.0.0:53", false),
            ("255.255.255.255:53", false),
            ("[ff02::1]:53", false),
            ("[::1]:5353", true),
        ] {
            assert_eq!(answerable(addr.parse().unwrap()), ok, "{addr}");
        }
    }
}
