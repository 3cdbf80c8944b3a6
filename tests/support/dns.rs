//! A small DNS client for tests, built on hickory-proto messages so a test controls every
//! bit of the query (EDNS size, DO, 0x20 case, several questions, raw garbage).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Long enough for any answer the tests expect, short enough that a lost one fails fast.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

pub const BOTH: [Proto; 2] = [Proto::Udp, Proto::Tcp];

/// Builds a query; `edns` is the advertised UDP payload size, `None` for no OPT record.
pub fn query_msg(name: &str, qtype: RecordType, edns: Option<u16>, dnssec_ok: bool) -> Message {
    let mut msg = Message::query();
    msg.metadata.id = rand::random();
    msg.metadata.recursion_desired = true;
    let name = Name::from_ascii(name).expect("test name");
    msg.add_query(Query::query(name, qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        e.set_dnssec_ok(dnssec_ok);
        msg.set_edns(e);
    }
    msg
}

/// Sends raw bytes and returns the raw reply, or `None` if nothing came back in time.
pub async fn exchange_raw(addr: SocketAddr, proto: Proto, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let fut = async {
        match proto {
            Proto::Udp => {
                let sock = UdpSocket::bind("127.0.0.1:0").await.ok()?;
                sock.send_to(bytes, addr).await.ok()?;
                let mut buf = vec![0u8; 65535];
                let (n, _) = sock.recv_from(&mut buf).await.ok()?;
                buf.truncate(n);
                Some(buf)
            }
            Proto::Tcp => {
                let mut stream = TcpStream::connect(addr).await.ok()?;
                let len = u16::try_from(bytes.len()).ok()?;
                stream.write_all(&len.to_be_bytes()).await.ok()?;
                stream.write_all(bytes).await.ok()?;
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.ok()?;
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut buf).await.ok()?;
                Some(buf)
            }
        }
    };
    tokio::time::timeout(wait, fut).await.ok().flatten()
}

/// Sends a query message and parses the reply, after checking it strictly
/// ([`super::strict::assert_reply`]): it reads whole and answers this query.
pub async fn exchange(addr: SocketAddr, proto: Proto, msg: &Message) -> Message {
    let bytes = msg.to_vec().expect("encode query");
    let reply = exchange_raw(addr, proto, &bytes, CLIENT_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("no reply over {proto:?} for {:?}", msg.queries));
    super::strict::assert_reply(&bytes, &reply, proto == Proto::Udp);
    let reply = Message::from_vec(&reply).expect("reply parses");
    assert_eq!(reply.metadata.id, msg.metadata.id, "reply ID");
    reply
}

pub async fn ask(addr: SocketAddr, proto: Proto, name: &str, qtype: RecordType) -> Message {
    exchange(addr, proto, &query_msg(name, qtype, Some(1232), false)).await
}

/// A record as `TYPE data` (owner left out), for order-free comparison.
pub fn show(record: &Record) -> String {
    match &record.data {
        RData::A(a) => format!("A {a}"),
        RData::AAAA(a) => format!("AAAA {a}"),
        RData::CNAME(c) => format!("CNAME {}", c.0),
        other => format!("{} {other}", record.record_type()),
    }
}

/// The answer section as sorted `TYPE data` strings.
pub fn answers(msg: &Message) -> Vec<String> {
    let mut v: Vec<String> = msg.answers.iter().map(show).collect();
    v.sort();
    v
}

pub fn has_soa(msg: &Message) -> bool {
    msg.authorities.iter().any(|r| r.record_type() == RecordType::SOA)
}
