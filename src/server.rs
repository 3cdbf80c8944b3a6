//! The DNS listeners: one UDP socket and one TCP listener per listen address, on the same port
//! (so `dig +tcp` finds the server where plain `dig` did, even with port 0).
//!
//! meshdns runs its own receive and accept loops around hickory-server's [`RequestHandler`]
//! instead of hickory's `Server`, for shutdown: `Server` aborts every query still in flight
//! when it stops, while a sidecar that is being terminated must answer what it has already
//! received. Here a stop first reads what the sockets had already queued (until they are
//! quiet for [`DRAIN_QUIET`], at most [`DRAIN_READ_MAX`]), then closes the door and waits for
//! the answers in flight, up to the drain deadline.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::handler::MIN_UDP_PAYLOAD;
use crate::metrics::{DropReason, MalformedReason, Metrics};
use crate::upstream::Transport;

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

#[derive(Debug, Error)]
pub enum ServerError {
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
            sockets.push(bind_pair(addr).await?);
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
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let stopping = loop {
        tokio::select! {
            biased;
            stopping = stopped(&mut stop) => break stopping,
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, src)) => udp_datagram(buf.get(..len).unwrap_or_default(), src, &socket, &shared, &mut tasks),
                Err(error) => {
                    debug!(%error, "cannot receive on the UDP socket");
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            },
        }
        reap(&mut tasks);
    };
    // Datagrams the kernel queued before the stop were received; they get their answers.
    while let Ok(Ok((len, src))) = tokio::time::timeout_at(stopping.quiet(), socket.recv_from(&mut buf)).await {
        udp_datagram(buf.get(..len).unwrap_or_default(), src, &socket, &shared, &mut tasks);
    }
    finish(tasks, stopping.deadline, "UDP queries").await;
}

fn udp_datagram<H: RequestHandler>(
    bytes: &[u8],
    src: SocketAddr,
    socket: &Arc<UdpSocket>,
    shared: &Arc<Shared<H>>,
    tasks: &mut JoinSet<()>,
) {
    let responder = UdpResponder {
        socket: Arc::clone(socket),
        dst: src,
    };
    match incoming(bytes, src, Transport::Udp, &shared.settings.metrics) {
        Incoming::Query(request) => {
            let shared = Arc::clone(shared);
            tasks.spawn(async move {
                shared.handler.handle_request::<_, TokioTime>(&request, responder).await;
            });
        }
        Incoming::Reply(reply) => {
            tasks.spawn(async move {
                if let Err(error) = responder.socket.send_to(&reply, responder.dst).await {
                    debug!(client = %responder.dst, %error, "cannot send error response");
                }
            });
        }
        Incoming::Dropped => {}
    }
}

async fn serve_tcp<H: RequestHandler>(listener: TcpListener, shared: Arc<Shared<H>>, mut stop: StopSignal) {
    let mut connections = JoinSet::new();
    let stopping = loop {
        tokio::select! {
            biased;
            stopping = stopped(&mut stop) => break stopping,
            accepted = listener.accept() => match accepted {
                Ok((stream, src)) => {
                    connections.spawn(connection(stream, src, Arc::clone(&shared), stop.clone()));
                }
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
        connections.spawn(connection(stream, src, Arc::clone(&shared), stop.clone()));
    }
    drop(listener);
    finish(connections, stopping.deadline, "TCP connections").await;
}

/// Serves one TCP connection: its messages are answered one after another, as hickory-server
/// does, so one client cannot make meshdns work on many of its queries at once.
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
    let responder = TcpResponder {
        writer: Arc::new(Mutex::new(writer)),
        write_timeout: idle,
    };
    let mut buf = BytesMut::with_capacity(usize::from(MIN_UDP_PAYLOAD));
    loop {
        if let Some(message) = take_frame(&mut buf) {
            match incoming(&message, src, Transport::Tcp, &shared.settings.metrics) {
                Incoming::Query(request) => {
                    shared
                        .handler
                        .handle_request::<_, TokioTime>(&request, responder.clone())
                        .await;
                }
                Incoming::Reply(reply) => {
                    if let Err(error) = responder.write(&reply).await {
                        debug!(client = %src, %error, "cannot send error response");
                        return;
                    }
                }
                Incoming::Dropped => {}
            }
            continue;
        }
        let draining = *stop.borrow();
        let limit = match draining {
            None => Instant::now() + idle,
            Some(stopping) => stopping.quiet(),
        };
        tokio::select! {
            biased;
            changed = stop.changed(), if draining.is_none() => {
                if changed.is_err() {
                    return;
                }
            }
            read = tokio::time::timeout_at(limit, reader.read_buf(&mut buf)) => match read {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    debug!(client = %src, %error, "TCP read failed");
                    return;
                }
                // Idle too long, or quiet after a stop.
                Err(_) => return,
            },
        }
    }
}

/// The next complete length-prefixed message in `buf`, if one is there.
fn take_frame(buf: &mut BytesMut) -> Option<BytesMut> {
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
enum Incoming {
    Query(Box<Request>),
    /// An error answer built without the handler (FORMERR for an undecodable query).
    Reply(Vec<u8>),
    Dropped,
}

fn incoming(bytes: &[u8], src: SocketAddr, transport: Transport, metrics: &Metrics) -> Incoming {
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
    let protocol = match transport {
        Transport::Udp => Protocol::Udp,
        Transport::Tcp => Protocol::Tcp,
    };
    match Request::from_bytes(bytes.to_vec(), src, protocol) {
        Ok(request) => {
            // The handler answers these NOTIMP and FORMERR; they are counted here because they
            // never reach a lookup.
            if request.metadata.op_code != OpCode::Query {
                metrics.malformed(transport, MalformedReason::Opcode);
            } else if request.queries.queries().len() != 1 {
                metrics.malformed(transport, MalformedReason::QuestionCount);
            }
            Incoming::Query(Box::new(request))
        }
        Err(error) => {
            debug!(client = %src, %error, "undecodable query; answering FORMERR");
            metrics.malformed(transport, MalformedReason::Undecodable);
            let mut metadata = Metadata::response_from_request(&header.metadata);
            metadata.response_code = ResponseCode::FormErr;
            let header = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            match header.to_bytes() {
                Ok(reply) => Incoming::Reply(reply),
                Err(_) => Incoming::Dropped,
            }
        }
    }
}

/// Whether an answer can be sent to `src` at all: never to port 0, an unspecified, broadcast or
/// multicast address (a spoofed source there would turn one query into many packets).
fn answerable(src: SocketAddr) -> bool {
    let ip = src.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    src.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && !broadcast
}

/// Serializes a response, truncated (TC) to `max_size`; an answer that cannot be encoded at all
/// becomes a bare SERVFAIL.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max_size: u16,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let id = response.metadata().id;
    let op_code = response.metadata().op_code;
    let mut bytes = Vec::with_capacity(usize::from(MIN_UDP_PAYLOAD));
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max_size);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => Ok((info, bytes)),
        Err(error) => {
            warn!(%error, "cannot encode a response; answering SERVFAIL");
            let mut metadata = Metadata::new(id, MessageType::Response, op_code);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            let bytes = header.to_bytes()?;
            Ok((ResponseInfo::from(header), bytes))
        }
    }
}

/// Sends answers to one UDP client from the socket its query came in on.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
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
        // RFC 1035: without EDNS a UDP answer is at most 512 bytes.
        let max = response
            .edns()
            .map_or(MIN_UDP_PAYLOAD, |edns| edns.max_payload().max(MIN_UDP_PAYLOAD));
        let (info, bytes) = encode(response, max)?;
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
        let (info, bytes) = encode(response, u16::MAX)?;
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
