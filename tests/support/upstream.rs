//! An in-process upstream DNS server with injectable faults.
//!
//! It serves UDP and TCP on the same 127.0.0.1 port so a forwarder's TCP
//! retry reaches the same "server". Every task it spawns is owned by the
//! `FakeUpstream` and aborted when it is dropped, so a test never leaks a
//! listener into the next one. Only loopback is ever bound.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, SOA},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::{JoinHandle, JoinSet},
};

/// What the fake does with each query, on both transports unless noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Answers from its records like a real server (including setting TC
    /// when an answer does not fit the UDP payload size).
    Normal,
    /// Counts the query and never answers (TCP: keeps the connection open).
    Silent,
    /// Answers normally after this delay.
    Slow(Duration),
    /// Answers normally but with ID + 1.
    WrongId,
    /// Answers with the right ID but a different question name.
    WrongQuestion,
    /// Over UDP: TC set, no answers. Over TCP: the full answer.
    TruncateUdp,
    /// Sends bytes that start with the right ID but do not parse.
    Garbage,
    /// SERVFAIL with no records.
    ServFail,
    /// REFUSED with no records.
    Refused,
    /// Answers any A query with this many A records (10.0.x.y); truncates
    /// over UDP when they do not fit, like `Normal`.
    BigAnswer(usize),
    /// First a spoof with a wrong ID, then the right answer.
    WrongIdThenRight,
    /// First a reply carrying [`SPOOFED_V4`] that fails one of the forwarder's checks, then,
    /// if `then_right`, the right answer. The spoofs from another address or port are sent
    /// over UDP only (TCP cannot be spoofed that way): over TCP those are `Normal` or `Silent`.
    Spoofed { spoof: Spoof, then_right: bool },
    /// The right answer cut two bytes short, inside its last record's data. With `tc` the TC
    /// bit is set over UDP and the full answer is served over TCP, as from a server that cuts
    /// its datagrams at the byte level; without, both transports get the cut reply.
    CutMidRecord { tc: bool },
}

/// What a [`Behavior::Spoofed`] reply gets wrong, giving itself away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spoof {
    /// The ID: ID + 1.
    Id,
    /// The question: right ID, another question name.
    Question,
    /// The source address: right ID and question, sent from 127.0.0.2 on the fake's own port,
    /// like an off-path spoofer that guessed everything but cannot send from the upstream.
    SourceAddr,
    /// The source port: right ID and question, sent from 127.0.0.1 but another port.
    SourcePort,
}

/// The only address spoofed replies carry, so a test can assert it never reaches a client.
pub const SPOOFED_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 66, 66);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Udp,
    Tcp,
}

struct State {
    records: Vec<(Name, IpAddr)>,
    behavior: Behavior,
    udp_queries: AtomicUsize,
    tcp_queries: AtomicUsize,
    last_query: Mutex<Option<Vec<u8>>>,
    /// Where [`Spoof::SourceAddr`] and [`Spoof::SourcePort`] replies are sent from.
    spoofer: Option<Arc<UdpSocket>>,
}

/// A running fake upstream; stops when dropped.
pub struct FakeUpstream {
    /// UDP and TCP listen here.
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts serving `records` (name, address) with `behavior`.
    ///
    /// Panics on malformed names or if no port can be bound: test setup.
    pub async fn start(records: Vec<(&str, IpAddr)>, behavior: Behavior) -> FakeUpstream {
        let records = records
            .into_iter()
            .map(|(name, ip)| {
                let mut name = Name::from_ascii(name).expect("valid record name");
                name.set_fqdn(true);
                (name, ip)
            })
            .collect();
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("local addr");
        let spoofer = match behavior {
            Behavior::Spoofed {
                spoof: Spoof::SourceAddr,
                ..
            } => Some(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), addr.port()))),
            Behavior::Spoofed {
                spoof: Spoof::SourcePort,
                ..
            } => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            _ => None,
        };
        let spoofer = match spoofer {
            Some(at) => Some(Arc::new(UdpSocket::bind(at).await.expect("bind the spoofing socket"))),
            None => None,
        };
        let state = Arc::new(State {
            records,
            behavior,
            udp_queries: AtomicUsize::new(0),
            tcp_queries: AtomicUsize::new(0),
            last_query: Mutex::new(None),
            spoofer,
        });
        let udp = UdpSocket::from_std(udp).expect("tokio udp");
        let tcp = TcpListener::from_std(tcp).expect("tokio tcp");
        let tasks = vec![
            tokio::spawn(serve_udp(Arc::new(udp), state.clone())),
            tokio::spawn(serve_tcp(tcp, state.clone())),
        ];
        FakeUpstream { addr, state, tasks }
    }

    /// UDP datagrams received so far.
    pub fn udp_queries(&self) -> usize {
        self.state.udp_queries.load(Ordering::SeqCst)
    }

    /// TCP messages received so far.
    pub fn tcp_queries(&self) -> usize {
        self.state.tcp_queries.load(Ordering::SeqCst)
    }

    /// The raw bytes of the most recent query, on either transport.
    pub fn last_query(&self) -> Option<Vec<u8>> {
        self.state.last_query.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // The serving tasks own the JoinSets of their children, so aborting
        // them takes the per-connection and delayed-reply tasks down too.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// 127.0.0.1:<port> where nothing listens (bound once, then released).
pub fn closed_port_addr() -> SocketAddr {
    let socket = StdUdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind probe socket");
    socket.local_addr().expect("probe local addr")
}

/// A UDP socket and a TCP listener on the same ephemeral loopback port.
fn bind_pair() -> (StdUdpSocket, StdTcpListener) {
    for _ in 0..50 {
        let udp = StdUdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind udp");
        let addr = udp.local_addr().expect("udp local addr");
        // The TCP side of a kernel-chosen UDP port may be taken; try another.
        if let Ok(tcp) = StdTcpListener::bind(addr) {
            udp.set_nonblocking(true).expect("nonblocking udp");
            tcp.set_nonblocking(true).expect("nonblocking tcp");
            return (udp, tcp);
        }
    }
    panic!("no loopback port free on both UDP and TCP");
}

async fn serve_udp(socket: Arc<UdpSocket>, state: Arc<State>) {
    let mut delayed = JoinSet::new();
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..len].to_vec();
        state.udp_queries.fetch_add(1, Ordering::SeqCst);
        // The spoof goes first, so that a forwarder that accepted it would relay it.
        if let (Some(spoofer), Some(spoof)) = (&state.spoofer, state.spoof_from_elsewhere(&query)) {
            let _ = spoofer.send_to(&spoof, peer).await;
        }
        let replies = state.replies(&query, Via::Udp);
        if let Behavior::Slow(delay) = state.behavior {
            let socket = socket.clone();
            delayed.spawn(async move {
                tokio::time::sleep(delay).await;
                for reply in replies {
                    let _ = socket.send_to(&reply, peer).await;
                }
            });
        } else {
            for reply in replies {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
        // Reap finished delayed replies so the set does not grow unbounded.
        while delayed.try_join_next().is_some() {}
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            connections.spawn(serve_tcp_connection(stream, state.clone()));
        }
        while connections.try_join_next().is_some() {}
    }
}

async fn serve_tcp_connection(mut stream: TcpStream, state: Arc<State>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        state.tcp_queries.fetch_add(1, Ordering::SeqCst);
        let replies = state.replies(&query, Via::Tcp);
        if let Behavior::Slow(delay) = state.behavior {
            tokio::time::sleep(delay).await;
        }
        for reply in replies {
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}

impl State {
    /// The datagrams / TCP messages to send back for `query`, in order.
    fn replies(&self, query: &[u8], via: Via) -> Vec<Vec<u8>> {
        *self.last_query.lock().unwrap_or_else(|e| e.into_inner()) = Some(query.to_vec());
        let Ok(request) = Message::from_vec(query) else {
            return Vec::new();
        };
        let id = request.metadata.id;
        match self.behavior {
            Behavior::Silent => Vec::new(),
            Behavior::Garbage => {
                // Right ID, then a header promising a question that is cut
                // off: passes the ID check, fails the parse.
                let mut bytes = id.to_be_bytes().to_vec();
                bytes.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x']);
                vec![bytes]
            }
            Behavior::ServFail => vec![encode(&self.rcode_only(&request, ResponseCode::ServFail))],
            Behavior::Refused => vec![encode(&self.rcode_only(&request, ResponseCode::Refused))],
            Behavior::WrongId => {
                let mut reply = self.answer(&request);
                reply.metadata.id = id.wrapping_add(1);
                vec![self.fit(reply, &request, via)]
            }
            Behavior::WrongQuestion => {
                let mut reply = self.answer(&request);
                if let Some(question) = reply.queries.first_mut() {
                    question.set_name(Name::from_ascii("spoofed.invalid.").expect("valid name"));
                }
                vec![self.fit(reply, &request, via)]
            }
            Behavior::WrongIdThenRight => {
                let right = self.answer(&request);
                let mut spoof = right.clone();
                spoof.metadata.id = id.wrapping_add(1);
                vec![self.fit(spoof, &request, via), self.fit(right, &request, via)]
            }
            Behavior::Spoofed { spoof, then_right } => {
                let mut out = Vec::new();
                if matches!(spoof, Spoof::Id | Spoof::Question) {
                    let mut fake = self.spoof(&request);
                    match spoof {
                        Spoof::Id => fake.metadata.id = id.wrapping_add(1),
                        _ => {
                            if let Some(question) = fake.queries.first_mut() {
                                question.set_name(Name::from_ascii("spoofed.invalid.").expect("valid name"));
                            }
                        }
                    }
                    out.push(encode(&fake));
                }
                if then_right {
                    out.push(self.fit(self.answer(&request), &request, via));
                }
                out
            }
            Behavior::CutMidRecord { tc } => {
                // Without OPT, so the last record is the answer and the cut lands in its data.
                let mut reply = self.answer(&request);
                reply.edns = None;
                let mut bytes = encode(&reply);
                if tc && via == Via::Tcp {
                    return vec![bytes];
                }
                bytes.truncate(bytes.len().saturating_sub(2));
                if tc && let Some(flags) = bytes.get_mut(2) {
                    *flags |= 0x02;
                }
                vec![bytes]
            }
            Behavior::TruncateUdp if via == Via::Udp => {
                vec![encode(&self.answer(&request).truncate())]
            }
            Behavior::Normal | Behavior::Slow(_) | Behavior::TruncateUdp | Behavior::BigAnswer(_) => {
                vec![self.fit(self.answer(&request), &request, via)]
            }
        }
    }

    /// Encodes `reply`, truncating it like a real server when it exceeds
    /// the UDP payload size the request advertised.
    fn fit(&self, reply: Message, request: &Message, via: Via) -> Vec<u8> {
        let bytes = encode(&reply);
        let limit = request
            .edns
            .as_ref()
            .map_or(512, |edns| usize::from(edns.max_payload().max(512)));
        if via == Via::Udp && bytes.len() > limit {
            encode(&reply.truncate())
        } else {
            bytes
        }
    }

    /// A response shell: question echoed as received, RD/CD copied, RA set,
    /// AD set when the query had DO, EDNS echoed with payload 1232.
    fn shell(&self, request: &Message, rcode: ResponseCode) -> Message {
        let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.metadata.checking_disabled = request.metadata.checking_disabled;
        reply.metadata.recursion_available = true;
        reply.metadata.response_code = rcode;
        reply.queries = request.queries.clone();
        if let Some(edns) = &request.edns {
            let dnssec_ok = edns.flags().dnssec_ok;
            reply.metadata.authentic_data = dnssec_ok;
            let mut echoed = Edns::new();
            echoed.set_max_payload(1232);
            echoed.set_dnssec_ok(dnssec_ok);
            *echoed.options_mut() = edns.options().clone();
            reply.edns = Some(echoed);
        }
        reply
    }

    /// The right answer's shape with [`SPOOFED_V4`] as its only address.
    fn spoof(&self, request: &Message) -> Message {
        let mut reply = self.shell(request, ResponseCode::NoError);
        if let Some(question) = request.queries.first() {
            reply.add_answer(Record::from_rdata(question.name().clone(), 60, RData::A(A(SPOOFED_V4))));
        }
        reply
    }

    /// The spoof [`Spoof::SourceAddr`] and [`Spoof::SourcePort`] send from the other socket.
    fn spoof_from_elsewhere(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        Some(encode(&self.spoof(&request)))
    }

    fn rcode_only(&self, request: &Message, rcode: ResponseCode) -> Message {
        self.shell(request, rcode)
    }

    /// The normal answer to `request` from the configured records.
    fn answer(&self, request: &Message) -> Message {
        let mut reply = self.shell(request, ResponseCode::NoError);
        let Some(question) = request.queries.first() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return reply;
        };
        let qname = question.name().clone();
        let qtype = question.query_type();

        if let Behavior::BigAnswer(count) = self.behavior {
            if qtype == RecordType::A {
                for i in 0..count {
                    let ip = Ipv4Addr::new(10, 0, (i / 256) as u8, (i % 256) as u8);
                    reply.add_answer(Record::from_rdata(qname.clone(), 60, RData::A(A(ip))));
                }
            }
            return reply;
        }

        let known: Vec<IpAddr> = self
            .records
            .iter()
            .filter(|(name, _)| *name == qname)
            .map(|(_, ip)| *ip)
            .collect();
        if known.is_empty() {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.add_authority(soa_for(&qname));
            return reply;
        }
        for ip in known {
            let data = match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            // Owner name as asked, like real servers echo 0x20 case.
            reply.add_answer(Record::from_rdata(qname.clone(), 60, data));
        }
        if reply.answers.is_empty() {
            // Name exists, type does not: NODATA with the zone's SOA.
            reply.add_authority(soa_for(&qname));
        }
        reply
    }
}

/// SOA for the zone made of the last two labels of `name`.
fn soa_for(name: &Name) -> Record {
    let zone = name.trim_to(2);
    let mname = Name::from_ascii("ns").expect("valid").append_domain(&zone);
    let rname = Name::from_ascii("hostmaster").expect("valid").append_domain(&zone);
    let soa = SOA::new(
        mname.expect("mname fits"),
        rname.expect("rname fits"),
        1,
        3600,
        600,
        86400,
        300,
    );
    Record::from_rdata(zone, 300, RData::SOA(soa))
}

fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().expect("fake upstream reply encodes")
}
