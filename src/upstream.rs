//! Forwarding a client's query to the upstream resolvers.
//!
//! The proxy is a stub in front of the cluster's real resolvers, so the
//! client's query is relayed byte for byte (flags, EDNS options, DO/CD bits,
//! 0x20 mixed case all matter to the upstream and to the client) and only the
//! message ID is replaced. A fresh random ID and a fresh ephemeral source port
//! for every attempt, a `connect()`ed socket and a check of the echoed question
//! are what make blind off-path spoofing of the upstream impractical; the
//! client's own ID is never put on the wire towards the upstream, so it cannot
//! be learned or predicted from there.
//!
//! Upstreams are tried in order. Each try has its own timeout and the whole
//! call has a hard deadline kept below glibc's default 5 s resolver timeout:
//! a client that hears SERVFAIL can move on, a client that hears nothing
//! waits the full 5 s before its next server or attempt.

use std::{fmt, io, net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, SockaddrStorage, connect, recv, socket};

use hickory_proto::{
    op::{Header, Message, MessageType, Query, ResponseCode},
    serialize::binary::{BinDecodable, BinDecoder},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{TcpStream, UdpSocket},
    time::Instant,
};
use tracing::{debug, trace};

use crate::metrics::{Metrics, UpstreamFailure, UpstreamStats};

/// Per-attempt budget for one upstream.
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(2);

/// Total budget across all upstreams; below glibc's 5 s so the client hears
/// SERVFAIL before giving up on us.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(4);

/// Largest DNS message: TCP's 2-byte length prefix caps it, and UDP
/// datagrams cannot be larger either.
const MAX_MESSAGE_LEN: usize = 65535;

/// How a query is sent to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// Lower-case name, usable as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and how patiently to forward.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Tried in this order; the first usable answer wins.
    pub servers: Vec<SocketAddr>,
    /// Budget for one exchange with one upstream.
    pub try_timeout: Duration,
    /// Budget for the whole `forward` call, across all upstreams.
    pub deadline: Duration,
}

impl UpstreamConfig {
    /// `servers` with the default timeouts.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            try_timeout: DEFAULT_TRY_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// Why no usable answer could be obtained. The caller answers SERVFAIL.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers configured")]
    NoUpstreams,
    #[error("upstream {upstream} ({transport}) did not answer within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        transport: Transport,
        timeout: Duration,
    },
    #[error("upstream {upstream} ({transport}): {source}")]
    Network {
        upstream: SocketAddr,
        transport: Transport,
        #[source]
        source: io::Error,
    },
    #[error("upstream {upstream} ({transport}) sent no acceptable reply: {detail}")]
    BadReply {
        upstream: SocketAddr,
        transport: Transport,
        detail: String,
    },
    #[error("forwarding deadline exceeded before any upstream gave a usable answer")]
    Deadline,
    #[error("query cannot be forwarded: {0}")]
    BadQuery(String),
}

impl ForwardError {
    /// Short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ForwardError::NoUpstreams => "no_upstreams",
            ForwardError::Timeout { .. } => "timeout",
            ForwardError::Network { .. } => "network",
            ForwardError::BadReply { .. } => "bad_reply",
            ForwardError::Deadline => "deadline",
            ForwardError::BadQuery(_) => "bad_query",
        }
    }

    /// The upstream the error is about, if it is about one.
    pub fn upstream(&self) -> Option<SocketAddr> {
        match self {
            ForwardError::Timeout { upstream, .. }
            | ForwardError::Network { upstream, .. }
            | ForwardError::BadReply { upstream, .. } => Some(*upstream),
            ForwardError::NoUpstreams | ForwardError::Deadline | ForwardError::BadQuery(_) => None,
        }
    }
}

/// Narrow seam so the request handler can be tested with a fake forwarder.
pub trait Forward: Send + Sync + 'static {
    /// Relays `query` (the client's raw bytes) and returns the upstream's
    /// reply carrying the client's original ID.
    fn forward(
        &self,
        query: &[u8],
        transport: Transport,
    ) -> impl std::future::Future<Output = Result<Message, ForwardError>> + Send;
}

/// A reply as it came from the upstream, checked: decoded (with the client's ID) and as the
/// bytes received (still carrying the upstream exchange's ID), so that a caller that relays it
/// unchanged need not encode it again.
#[derive(Debug)]
pub struct Relayed {
    pub message: Message,
    pub wire: Vec<u8>,
}

/// The upstream list in force and the counters of each upstream, same order.
#[derive(Debug)]
struct Upstreams {
    config: UpstreamConfig,
    /// Empty when the forwarder records no metrics.
    stats: Vec<UpstreamStats>,
}

/// Forwards queries to the configured upstreams, one fresh socket per attempt.
#[derive(Debug)]
pub struct Forwarder {
    /// Swapped whole when a re-read config changes it; a query in flight keeps the list it
    /// started with.
    upstreams: ArcSwap<Upstreams>,
    metrics: Option<Arc<Metrics>>,
}

impl Forwarder {
    /// A forwarder for `config`; sockets are made per attempt, so there is
    /// nothing to set up here.
    pub fn from_parts(config: UpstreamConfig) -> Self {
        Self {
            upstreams: ArcSwap::from_pointee(Upstreams {
                config,
                stats: Vec::new(),
            }),
            metrics: None,
        }
    }

    /// Like [`Forwarder::from_parts`], counting every exchange in `metrics`.
    pub fn with_metrics(config: UpstreamConfig, metrics: Arc<Metrics>) -> Self {
        let forwarder = Self {
            upstreams: ArcSwap::from_pointee(Upstreams {
                config: UpstreamConfig::new(Vec::new()),
                stats: Vec::new(),
            }),
            metrics: Some(metrics),
        };
        forwarder.set_config(config);
        forwarder
    }

    pub fn config(&self) -> UpstreamConfig {
        self.upstreams.load().config.clone()
    }

    /// Replaces the upstream list and timeouts; queries already in flight finish with the old.
    pub fn set_config(&self, config: UpstreamConfig) {
        let stats = match &self.metrics {
            Some(metrics) => config.servers.iter().map(|s| metrics.upstream(*s)).collect(),
            None => Vec::new(),
        };
        self.upstreams.store(Arc::new(Upstreams { config, stats }));
    }

    /// Walks the upstream list until one gives a usable answer or the
    /// deadline leaves no time. Bounded by `deadline` on its own: each attempt's
    /// timeout is capped by the time left.
    async fn forward_all(
        &self,
        upstreams: &Upstreams,
        query: &[u8],
        expected: &Query,
        client_id: u16,
        transport: Transport,
        deadline: Instant,
    ) -> Result<Relayed, ForwardError> {
        // The outcome of the most recent attempt: a SERVFAIL/REFUSED reply is
        // worth relaying only if nothing after it was tried.
        let mut last: Option<Result<Relayed, ForwardError>> = None;
        for (i, &upstream) in upstreams.config.servers.iter().enumerate() {
            if Instant::now() >= deadline {
                break;
            }
            let stats = upstreams.stats.get(i);
            let target = Target {
                config: &upstreams.config,
                stats,
                upstream,
            };
            match target.ask(query, expected, transport, deadline).await {
                Ok(mut reply) => {
                    reply.message.metadata.id = client_id;
                    let rcode = reply.message.metadata.response_code;
                    if rcode == ResponseCode::ServFail || rcode == ResponseCode::Refused {
                        debug!(%upstream, %rcode, "upstream declined, trying the next one");
                        if let Some(stats) = stats {
                            stats.failure(UpstreamFailure::Declined);
                        }
                        last = Some(Ok(reply));
                    } else {
                        return Ok(reply);
                    }
                }
                Err(err) => {
                    debug!(%upstream, reason = err.reason(), error = %err, "upstream attempt failed");
                    last = Some(Err(err));
                }
            }
        }
        last.unwrap_or(Err(ForwardError::Deadline))
    }
}

/// One upstream of the list in force, with its counters.
struct Target<'a> {
    config: &'a UpstreamConfig,
    stats: Option<&'a UpstreamStats>,
    upstream: SocketAddr,
}

impl Target<'_> {
    /// UDP with a TCP retry on truncation, or TCP only.
    async fn ask(
        &self,
        query: &[u8],
        expected: &Query,
        transport: Transport,
        deadline: Instant,
    ) -> Result<Relayed, ForwardError> {
        if transport == Transport::Udp {
            let reply = self.attempt(query, expected, Transport::Udp, deadline).await?;
            if !reply.message.metadata.truncation {
                return Ok(reply);
            }
            debug!(upstream = %self.upstream, "truncated UDP reply, retrying over TCP");
        }
        self.attempt(query, expected, Transport::Tcp, deadline).await
    }

    /// One exchange under `min(try_timeout, time left)`, counted in `stats`.
    async fn attempt(
        &self,
        query: &[u8],
        expected: &Query,
        transport: Transport,
        deadline: Instant,
    ) -> Result<Relayed, ForwardError> {
        let started = Instant::now();
        if let Some(stats) = self.stats {
            stats.attempt(transport);
        }
        let result = self.exchange(query, expected, transport, deadline).await;
        if let Some(stats) = self.stats {
            match &result {
                Ok(_) => stats.replied(started.elapsed()),
                Err(ForwardError::Timeout { .. }) => stats.failure(UpstreamFailure::Timeout),
                Err(ForwardError::BadReply { .. }) => stats.failure(UpstreamFailure::BadReply),
                Err(_) => stats.failure(UpstreamFailure::Network),
            }
        }
        result
    }

    async fn exchange(
        &self,
        query: &[u8],
        expected: &Query,
        transport: Transport,
        deadline: Instant,
    ) -> Result<Relayed, ForwardError> {
        let upstream = self.upstream;
        let budget = self
            .config
            .try_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        // Lives outside the timed future so that what was dropped while
        // waiting is still known once the timeout has cancelled the exchange.
        let mut rejected: Option<String> = None;
        let exchange = async {
            match transport {
                Transport::Udp => exchange_udp(upstream, query, expected, &mut rejected).await,
                Transport::Tcp => exchange_tcp(upstream, query, expected, &mut rejected).await,
            }
        };
        match tokio::time::timeout(budget, exchange).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(source)) => match rejected {
                // A peer that closes after garbage is a bad upstream, not a
                // network problem.
                Some(detail) if source.kind() == io::ErrorKind::UnexpectedEof => Err(ForwardError::BadReply {
                    upstream,
                    transport,
                    detail,
                }),
                _ => Err(ForwardError::Network {
                    upstream,
                    transport,
                    source,
                }),
            },
            Err(_elapsed) => match rejected {
                Some(detail) => Err(ForwardError::BadReply {
                    upstream,
                    transport,
                    detail,
                }),
                None => Err(ForwardError::Timeout {
                    upstream,
                    transport,
                    timeout: budget,
                }),
            },
        }
    }
}

impl Forward for Forwarder {
    async fn forward(&self, query: &[u8], transport: Transport) -> Result<Message, ForwardError> {
        self.forward_wire(query, transport).await.map(|reply| reply.message)
    }
}

impl Forwarder {
    /// Like [`Forward::forward`], also returning the reply's bytes as received.
    pub async fn forward_wire(&self, query: &[u8], transport: Transport) -> Result<Relayed, ForwardError> {
        let (client_id, expected) = parse_query(query)?;
        let upstreams = self.upstreams.load_full();
        if upstreams.config.servers.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let start = Instant::now();
        // A config with an absurd deadline must not panic on overflow; a
        // year is "no deadline" for a DNS query.
        let deadline = start
            .checked_add(upstreams.config.deadline)
            .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600));
        // Every attempt's own timeout ends by `deadline`, so no outer timer is needed: one timer
        // less per query on the forwarding path.
        self.forward_all(&upstreams, query, &expected, client_id, transport, deadline)
            .await
    }
}

/// Reads just enough of the client's query to verify replies against it;
/// the rest is the upstream's business and is relayed untouched.
pub(crate) fn parse_query(query: &[u8]) -> Result<(u16, Query), ForwardError> {
    if query.len() > MAX_MESSAGE_LEN {
        return Err(ForwardError::BadQuery(format!(
            "{} bytes is larger than any DNS message",
            query.len()
        )));
    }
    let mut decoder = BinDecoder::new(query);
    let header = Header::read(&mut decoder).map_err(|e| ForwardError::BadQuery(format!("unreadable header: {e}")))?;
    if header.metadata.message_type != MessageType::Query {
        return Err(ForwardError::BadQuery("message is a response".into()));
    }
    // Replies are matched on exactly one question; anything else cannot be
    // verified and no resolver answers it anyway.
    if header.counts.queries != 1 {
        return Err(ForwardError::BadQuery(format!(
            "{} questions, expected exactly 1",
            header.counts.queries
        )));
    }
    let question =
        Query::read(&mut decoder).map_err(|e| ForwardError::BadQuery(format!("unreadable question: {e}")))?;
    Ok((header.metadata.id, question))
}

/// The client's bytes with a fresh random ID, returned with that ID.
fn with_fresh_id(query: &[u8]) -> (u16, Vec<u8>) {
    let id: u16 = rand::random();
    let mut packet = query.to_vec();
    // parse_query already proved the 12-byte header is there.
    if let Some(id_bytes) = packet.get_mut(..2) {
        id_bytes.copy_from_slice(&id.to_be_bytes());
    }
    (id, packet)
}

thread_local! {
    /// Room for the largest datagram, one per runtime thread.
    static RECEIVE_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_MESSAGE_LEN]);
}

/// A new UDP socket connected to `upstream`. New per attempt: a fresh ephemeral port (chosen
/// at random by the kernel when `connect` binds it) is the other half of the entropy a spoofer
/// has to guess. Connected, so the kernel drops datagrams from any other source and reports
/// ICMP port unreachable as ECONNREFUSED on receive; tokio wakes on error readiness too, so a
/// dead upstream fails at once rather than at the timeout. Not bound first: `connect` binds,
/// and a system call less per query counts on the forwarding path.
fn connected_udp(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let family = match upstream {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(upstream))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// Sends one UDP query and waits for the matching reply, dropping anything
/// else. Returns only on a match or a socket error; the caller times it out.
async fn exchange_udp(
    upstream: SocketAddr,
    query: &[u8],
    expected: &Query,
    rejected: &mut Option<String>,
) -> io::Result<Relayed> {
    let socket = connected_udp(upstream)?;
    let (id, packet) = with_fresh_id(query);
    socket.send(&packet).await?;

    let fd = socket.as_raw_fd();
    loop {
        // Error readiness too: that is how an ICMP refusal shows. `try_io` is then asked about
        // the one kind that is ready (tokio masks a combined interest to nothing there).
        let ready = socket.ready(Interest::READABLE | Interest::ERROR).await?;
        let interest = if ready.is_error() {
            Interest::ERROR
        } else {
            Interest::READABLE
        };
        // Received into the thread's buffer (no await while it is borrowed) and copied out at
        // its size: a query waiting on an upstream holds no 64 KiB buffer, and a reply costs
        // no large allocation.
        let received = RECEIVE_BUFFER.with_borrow_mut(|buffer| {
            match socket.try_io(interest, || {
                recv(fd, buffer, MsgFlags::empty()).map_err(io::Error::from)
            }) {
                Ok(len) => Ok(buffer.get(..len).map(<[u8]>::to_vec)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(error) => Err(error),
            }
        });
        let Some(buf) = received? else { continue };
        match check_reply(&buf, id, expected, Transport::Udp) {
            Ok(message) => return Ok(Relayed { message, wire: buf }),
            Err(detail) => {
                trace!(%upstream, %detail, "dropped UDP reply");
                *rejected = Some(detail);
            }
        }
    }
}

/// Sends one query over a new TCP connection and reads framed replies until
/// one matches.
async fn exchange_tcp(
    upstream: SocketAddr,
    query: &[u8],
    expected: &Query,
    rejected: &mut Option<String>,
) -> io::Result<Relayed> {
    let mut stream = TcpStream::connect(upstream).await?;
    // One small write then wait: Nagle would only add latency.
    stream.set_nodelay(true)?;
    let (id, packet) = with_fresh_id(query);
    let len = u16::try_from(packet.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too large for TCP"))?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&packet);
    stream.write_all(&framed).await?;

    loop {
        let len = usize::from(stream.read_u16().await?);
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        match check_reply(&buf, id, expected, Transport::Tcp) {
            Ok(message) => return Ok(Relayed { message, wire: buf }),
            Err(detail) => {
                trace!(%upstream, %detail, "dropped TCP reply");
                *rejected = Some(detail);
            }
        }
    }
}

/// A reply that does not parse but says it was truncated (TC) is cut mid-record, as some
/// servers and middleboxes cut: its header alone, so that the caller retries over TCP.
/// Nothing of it is relayed, so a forged one can cause no more than that retry.
fn truncated_header(bytes: &[u8]) -> Option<Message> {
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    let metadata = header.metadata;
    (metadata.message_type == MessageType::Response && metadata.truncation).then(|| {
        let mut reply = Message::new(metadata.id, MessageType::Response, metadata.op_code);
        reply.metadata.truncation = true;
        reply
    })
}

/// Accepts `bytes` only if it is a response to exactly our question with our
/// ID; the reason for rejection otherwise. The header-only reading of a reply cut with TC
/// ([`truncated_header`]) is for UDP only: over TCP nothing is retried, so a cut reply there is
/// a bad reply, never a TC header to pass on.
pub(crate) fn check_reply(bytes: &[u8], id: u16, expected: &Query, transport: Transport) -> Result<Message, String> {
    // ID first, from the raw bytes: a flood of spoofs should not cost a full
    // parse each.
    let [hi, lo, ..] = bytes else {
        return Err(format!("{}-byte reply is too short", bytes.len()));
    };
    if u16::from_be_bytes([*hi, *lo]) != id {
        return Err("reply ID does not match".into());
    }
    let reply = match Message::from_vec(bytes) {
        Ok(reply) => reply,
        Err(error) => {
            return truncated_header(bytes)
                .filter(|_| transport == Transport::Udp)
                .ok_or_else(|| format!("unparseable reply: {error}"));
        }
    };
    if reply.metadata.message_type != MessageType::Response {
        return Err("reply is not a response".into());
    }
    let [question] = reply.queries.as_slice() else {
        return Err(format!("reply has {} questions, expected 1", reply.queries.len()));
    };
    // Name equality is case-insensitive, as DNS names are; a resolver may
    // normalise the case of the echoed question.
    if question.name() != expected.name()
        || question.query_type() != expected.query_type()
        || question.query_class() != expected.query_class()
    {
        return Err(format!("reply question {question} does not match {expected}"));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    #[test]
    fn a_reply_cut_with_tc_is_a_retry_over_udp_and_a_bad_reply_over_tcp() {
        let name = Name::from_ascii("www.example.test.").unwrap();
        let question = Query::query(name.clone(), RecordType::A);
        let mut reply = Message::new(7, MessageType::Response, hickory_proto::op::OpCode::Query);
        reply.metadata.truncation = true;
        reply.add_query(question.clone());
        reply.add_answer(Record::from_rdata(name, 30, RData::A(A::new(192, 0, 2, 1))));
        let whole = reply.to_vec().unwrap();
        let cut = &whole[..whole.len() - 2];
        let udp = check_reply(cut, 7, &question, Transport::Udp).expect("UDP: the header, to retry over TCP");
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let tcp = check_reply(cut, 7, &question, Transport::Tcp).expect_err("TCP: nothing to retry");
        assert!(tcp.contains("unparseable"), "{tcp}");
        assert!(check_reply(&whole, 7, &question, Transport::Tcp).is_ok());
    }
}
