//! Walking the records of a DNS message in wire form without decoding it: where each record
//! starts, its type, where its TTL sits and where it ends. The relay and the cache use it on
//! messages hickory-proto has already accepted, to patch bytes in place (the client's ID and
//! case, lowered TTLs, the EDNS size) instead of decoding and encoding again. Every read is
//! bounds-checked, so a message that does not walk yields `None`, never a panic.
//!
//! It is also meshdns's one DNS vocabulary for the wire: the limits, rcodes and flag bits, the
//! UDP payload rule ([`UdpPayload`]), how meshdns writes its OPT record ([`opt_record`]), the
//! bare FORMERR/NOTIMP reply ([`bare_reply`]) and truncation to whole records ([`truncate`]).

/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Without EDNS, a UDP message is at most this long (RFC 1035).
pub const MIN_UDP_PAYLOAD: u16 = 512;
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SIG: u16 = 24;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const CLASS_IN: u16 = 1;
/// Header flag bits (RFC 1035 4.1.1, RFC 4035 for AD and CD), as they sit in bytes 2 and 3.
pub const FLAG_QR: u8 = 0x80;
pub const FLAG_AA: u8 = 0x04;
pub const FLAG_TC: u8 = 0x02;
pub const FLAG_RD: u8 = 0x01;
pub const FLAG_RA: u8 = 0x80;
pub const FLAG_AD: u8 = 0x20;
pub const FLAG_CD: u8 = 0x10;
pub const OPCODE_MASK: u8 = 0x78;
/// The DO bit in the flags half of an OPT record's TTL (RFC 3225).
pub const EDNS_DO: u16 = 0x8000;
/// An OPT record without options.
pub const OPT_LEN: usize = 11;
/// Fixed part of a resource record after its owner name: type, class, TTL, data length.
pub const RR_FIXED: usize = 10;
/// Fixed part of a question after its name: type and class.
pub const QUESTION_FIXED: usize = 4;
/// Longest name in wire form, root byte included (RFC 1035 3.1).
pub const MAX_NAME_WIRE: usize = 255;
/// Offset of the TTL within that fixed part.
const TTL_AT: usize = 4;
/// From the TTL to the data: the TTL and the data length.
const DATA_AFTER_TTL: usize = 6;
/// Longest label; longer length bytes are compression pointers or reserved label types.
pub const MAX_LABEL: u8 = 63;
/// The top two bits of a compression pointer's first byte.
pub const POINTER_BITS: u8 = 0xC0;

/// Where one record sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordAt {
    /// Its first byte (the owner name).
    pub start: usize,
    /// Its type.
    pub rtype: u16,
    /// Its TTL field (4 bytes).
    pub ttl: usize,
    /// Its data.
    pub data: usize,
    /// The byte after its data.
    pub end: usize,
    /// Whether it is in the additional section.
    pub additional: bool,
}

/// The largest `maxUdpPayload` meshdns accepts; beyond it UDP replies fragment on most paths.
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// The default `maxUdpPayload`: the DNS flag day 2020 size that BIND and unbound default to,
/// which avoids IP fragmentation on every common path.
pub const DEFAULT_UDP_PAYLOAD: u16 = 1232;
/// Query types meshdns never answers: zone transfers (RFC 5936, RFC 1995). A sidecar holds no
/// zone to transfer, and a transfer relayed for an external name would be a stream of
/// unbounded size through every pod.
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;
/// Header rcodes (RFC 1035 4.1.1) and the extended BADVERS (RFC 6891 6.1.3: its upper 8 bits
/// travel in the OPT record, its lower 4 in the header).
pub const RCODE_NO_ERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NX_DOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_BADVERS: u16 = 16;
/// The only EDNS version meshdns implements.
pub const EDNS_VERSION: u8 = 0;

/// How large meshdns's UDP replies may be, and what it advertises in its own OPT records
/// (RFC 6891 6.2.3-6.2.5): never more than the client offered, never more than
/// `maxUdpPayload`, never less than the 512 bytes every client takes. Every path (the fast
/// path, the relay, cache hits, the handler's encoder) asks this one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPayload(u16);

impl UdpPayload {
    /// `max` if it is within 512..=4096.
    pub fn new(max: u16) -> Option<Self> {
        (MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&max).then_some(Self(max))
    }

    /// The payload size meshdns advertises: its own limit, whatever the client offered.
    pub fn advertised(self) -> u16 {
        self.0
    }

    /// The largest UDP reply for a client that advertised `client` (`None`: no EDNS).
    pub fn limit(self, client: Option<u16>) -> u16 {
        client.map_or(MIN_UDP_PAYLOAD, |size| size.clamp(MIN_UDP_PAYLOAD, self.0))
    }
}

impl Default for UdpPayload {
    fn default() -> Self {
        Self(DEFAULT_UDP_PAYLOAD)
    }
}

/// An OPT record as meshdns writes its own: root owner, the advertised payload size, no
/// extended rcode, version 0, DO as given, no options.
pub fn opt_record(payload: UdpPayload, dnssec_ok: bool) -> [u8; OPT_LEN] {
    let [p0, p1] = payload.advertised().to_be_bytes();
    let [f0, f1] = if dnssec_ok { EDNS_DO } else { 0 }.to_be_bytes();
    let [t0, t1] = TYPE_OPT.to_be_bytes();
    [0, t0, t1, p0, p1, 0, EDNS_VERSION, f0, f1, 0, 0]
}

/// The reply to a query that meshdns cannot or will not read (FORMERR, NOTIMP): the query's ID
/// and opcode, QR and `rcode`, no other flag and no section, as BIND answers them. Nothing
/// else of such a query can be trusted to mean what it says.
pub fn bare_reply(query: &[u8], rcode: u8) -> Option<[u8; HEADER_LEN]> {
    let &[id_hi, id_lo, flags_hi, ..] = query else {
        return None;
    };
    let mut reply = [0; HEADER_LEN];
    reply[..3].copy_from_slice(&[id_hi, id_lo, FLAG_QR | (flags_hi & OPCODE_MASK)]);
    reply[3] = rcode & 0x0F;
    Some(reply)
}

/// Cuts a reply longer than `limit` down to whole records (RFC 2181 9, RFC 6891 7): the header
/// and the question, then as many records as fit in their order (answers, authority,
/// additional), then the OPT record if the reply has one, so that the client still sees the
/// EDNS rcode, DO and size; TC set and the counts rewritten. The kept records are a prefix of
/// the message, so a compression pointer in them can only point at bytes that are kept.
/// `None` when the records do not walk or not even the question and the OPT record fit.
pub fn truncate(wire: &mut Vec<u8>, limit: usize) -> Option<()> {
    if wire.len() <= limit {
        return Some(());
    }
    let mut at = HEADER_LEN;
    for _ in 0..count(wire, 4)? {
        at = skip_name(wire, at)?.checked_add(4)?;
    }
    let question_end = at;
    let sections = [count(wire, 6)?, count(wire, 8)?, count(wire, 10)?];
    let mut records = Vec::with_capacity(sections.iter().map(|&n| usize::from(n)).sum());
    for (section, &n) in sections.iter().enumerate() {
        for _ in 0..n {
            let start = at;
            at = skip_name(wire, at)?;
            let fixed = wire.get(at..at + RR_FIXED)?;
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            at = at.checked_add(RR_FIXED + rdlen).filter(|&end| end <= wire.len())?;
            records.push((section, rtype, start, at));
        }
    }
    let opt = records
        .iter()
        .position(|&(section, rtype, ..)| section == 2 && rtype == TYPE_OPT);
    let opt_bytes = opt
        .map(|i| wire[records[i].2..records[i].3].to_vec())
        .unwrap_or_default();
    let room = limit.checked_sub(opt_bytes.len())?;
    if question_end > room {
        return None;
    }
    // Records after the OPT record (a signature) would lose what they sign: stop there.
    let candidates = &records[..opt.unwrap_or(records.len())];
    let kept = candidates.iter().take_while(|&&(.., end)| end <= room).count();
    let cut = candidates[..kept].last().map_or(question_end, |&(.., end)| end);
    let mut counts = [0u16; 3];
    for &(section, ..) in &candidates[..kept] {
        counts[section] += 1;
    }
    counts[2] += u16::from(opt.is_some());
    wire.truncate(cut);
    wire.extend_from_slice(&opt_bytes);
    wire[2] |= FLAG_TC;
    for (i, n) in counts.into_iter().enumerate() {
        wire[6 + 2 * i..8 + 2 * i].copy_from_slice(&n.to_be_bytes());
    }
    Some(())
}

/// The 16-bit count at `at` of the header.
pub fn count(wire: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*wire.get(at)?, *wire.get(at + 1)?]))
}

/// The position after the name at `at`: its labels up to the root, or a compression pointer.
pub fn skip_name(wire: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *wire.get(at)?;
        match len {
            0 => return Some(at + 1),
            1..=MAX_LABEL => at += 1 + usize::from(len),
            _ if len & POINTER_BITS == POINTER_BITS => {
                wire.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// Where the compression pointer that ends the name at `at` points, if the name ends in one.
pub fn final_pointer(wire: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *wire.get(at)?;
        match len {
            0 => return None,
            1..=MAX_LABEL => at += 1 + usize::from(len),
            _ if len & POINTER_BITS == POINTER_BITS => {
                return Some(usize::from(len & !POINTER_BITS) << 8 | usize::from(*wire.get(at + 1)?));
            }
            _ => return None,
        }
    }
}

/// Calls `each` for every record of a message with one question of `question_len` bytes, in
/// order; returns where the last record ends. `None` when the records the header counts do not
/// walk, or when `each` says so.
pub fn walk(wire: &[u8], question_len: usize, mut each: impl FnMut(RecordAt) -> Option<()>) -> Option<usize> {
    if count(wire, 4)? != 1 {
        return None;
    }
    let (answers, authorities, additionals) = (count(wire, 6)?, count(wire, 8)?, count(wire, 10)?);
    let before_additional = usize::from(answers) + usize::from(authorities);
    let mut at = HEADER_LEN.checked_add(question_len)?;
    for index in 0..before_additional + usize::from(additionals) {
        let start = at;
        at = skip_name(wire, at)?;
        let fixed = wire.get(at..at + RR_FIXED)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let ttl = at + TTL_AT;
        at = at.checked_add(RR_FIXED + rdlen).filter(|&end| end <= wire.len())?;
        each(RecordAt {
            start,
            rtype,
            ttl,
            data: ttl + DATA_AFTER_TTL,
            end: at,
            additional: index >= before_additional,
        })?;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, Query};
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    #[test]
    fn every_record_is_found_with_its_ttl() {
        let name = Name::from_ascii("www.example.test.").unwrap();
        let target = Name::from_ascii("edge.example.test.").unwrap();
        let mut msg = Message::new(7, MessageType::Response, hickory_proto::op::OpCode::Query);
        msg.add_query(Query::query(name.clone(), RecordType::A));
        msg.add_answer(Record::from_rdata(name, 11, RData::CNAME(CNAME(target.clone()))));
        msg.add_answer(Record::from_rdata(target, 22, RData::A(A::new(192, 0, 2, 1))));
        msg.set_edns(Edns::new());
        let wire = msg.to_vec().unwrap();
        let question_len = "www.example.test.".len() + 1 + 4;
        let mut seen = Vec::new();
        let end = walk(&wire, question_len, |r| {
            let ttl = u32::from_be_bytes(wire[r.ttl..r.ttl + 4].try_into().unwrap());
            seen.push((r.rtype, ttl, r.additional));
            Some(())
        });
        assert_eq!(end, Some(wire.len()));
        assert_eq!(seen[..2], [(5, 11, false), (1, 22, false)]);
        assert_eq!((seen[2].0, seen[2].2), (41, true));
        // Cut anywhere inside the records: no walk, no panic.
        for cut in HEADER_LEN + question_len..wire.len() {
            assert_eq!(walk(&wire[..cut], question_len, |_| Some(())), None, "cut at {cut}");
        }
    }
}
