//! The strict reply check every test runs on the bytes it receives: the reply reads whole
//! ([`meshdns::strict::check`]: nothing after the counted records, at most one OPT, names and
//! record data well-formed), it answers the query (ID, QR, the question as spelled), it fits
//! the client's UDP buffer, and it carries an OPT record exactly when the query had one.
//!
//! hickory-proto cannot be this check: it decodes replies with trailing bytes without a word.

use meshdns::strict::{self, Layout, Opt};

/// The largest `maxUdpPayload` meshdns accepts: no UDP reply may be larger than this or than
/// the client's own size, whatever the server's setting.
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// meshdns's default `maxUdpPayload`.
pub const DEFAULT_UDP_PAYLOAD: u16 = 1232;

const QR: u16 = 0x8000;
const TC: u16 = 0x0200;
const RCODE_FORMERR: u16 = 1;
const RCODE_NOTIMP: u16 = 4;

/// What a query asked for, as far as the checks need it.
#[derive(Clone, Copy, Debug)]
pub struct Asked {
    pub id: u16,
    /// The EDNS payload size the query advertised, `None` without OPT.
    pub payload: Option<u16>,
}

impl Asked {
    pub fn of(query: &[u8]) -> Asked {
        let layout = strict::check(query).expect("the test's own query is well-formed");
        Asked {
            id: layout.id,
            payload: layout.opt.map(|opt| opt.payload),
        }
    }

    /// The largest UDP reply a server capped at `cap` may send for this query.
    pub fn udp_limit(&self, cap: u16) -> usize {
        usize::from(self.payload.map_or(512, |p| p.clamp(512, cap)))
    }
}

/// Checks `reply` strictly as the answer to `query` over UDP (`udp`) or TCP, from a server
/// whose `maxUdpPayload` is at most `cap`; returns its layout or says what is wrong.
pub fn reply(query: &[u8], reply: &[u8], udp: bool, cap: u16) -> Result<Layout, String> {
    let asked = Asked::of(query);
    let layout = strict::check(reply).map_err(|e| e.to_string())?;
    if layout.id != asked.id {
        return Err(format!("ID {} for a query with ID {}", layout.id, asked.id));
    }
    if layout.flags & QR == 0 {
        return Err("QR not set".into());
    }
    let header_only = matches!(layout.rcode, RCODE_FORMERR | RCODE_NOTIMP) && layout.questions == 0;
    if !header_only {
        let question_end = 12 + question_len(query);
        if layout.questions != 1 || reply.get(12..question_end) != query.get(12..question_end) {
            return Err("the question is not the query's, byte for byte".into());
        }
    }
    if udp && reply.len() > asked.udp_limit(cap) {
        return Err(format!(
            "{} bytes over UDP for a client that takes {}",
            reply.len(),
            asked.udp_limit(cap)
        ));
    }
    if !udp && layout.flags & TC != 0 {
        return Err("TC set over TCP".into());
    }
    match (asked.payload, layout.opt) {
        (None, Some(_)) => return Err("an OPT record for a query without one".into()),
        (Some(_), None) if !header_only => return Err("no OPT record for a query with one".into()),
        (Some(_), Some(Opt { version, .. })) if version != 0 => return Err(format!("OPT version {version}")),
        (Some(_), Some(Opt { payload, .. })) if payload < 512 || payload > cap => {
            return Err(format!("advertised payload {payload}, outside 512..={cap}"));
        }
        _ => {}
    }
    Ok(layout)
}

/// Panics with the reason when [`reply`] refuses the reply.
pub fn assert_reply(query: &[u8], bytes: &[u8], udp: bool) -> Layout {
    reply(query, bytes, udp, MAX_UDP_PAYLOAD).unwrap_or_else(|why| panic!("malformed reply ({why}): {bytes:02x?}"))
}

/// A reply in a form that compares two encodings byte for byte except where encodings may
/// legitimately differ: name compression (names are expanded) and the order of records within
/// a section. The header (ID, every flag, the counts) and the question bytes are compared as
/// sent.
pub fn wire_form(bytes: &[u8]) -> String {
    let layout = strict::check(bytes).unwrap_or_else(|e| panic!("{e}: {bytes:02x?}"));
    let mut records = layout.records.clone();
    records.sort();
    let question_end = 12 + question_len(bytes);
    let mut out = format!(
        "header {:02x?}\nquestion {:02x?}\n",
        &bytes[..12],
        &bytes[12..question_end]
    );
    for r in records {
        out.push_str(&format!(
            "{:?} owner {:02x?} type {} class {} ttl {} data {:02x?}\n",
            r.section, r.owner, r.rtype, r.class, r.ttl, r.data
        ));
    }
    out
}

/// The length of the first question of a message whose question section is well-formed
/// (0 when it has none).
fn question_len(message: &[u8]) -> usize {
    if message.get(4..6) == Some(&[0, 0]) {
        return 0;
    }
    meshdns::wire::skip_name(message, 12).map_or(0, |end| end + 4 - 12)
}
