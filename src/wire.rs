//! Walking the records of a DNS message in wire form without decoding it: where each record
//! starts, its type, where its TTL sits and where it ends. The relay and the cache use it on
//! messages hickory-proto has already accepted, to patch bytes in place (the client's ID and
//! case, lowered TTLs, the EDNS size) instead of decoding and encoding again. Every read is
//! bounds-checked, so a message that does not walk yields `None`, never a panic.

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
const RR_FIXED: usize = 10;
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

/// An OPT record as meshdns writes its own: root owner, the client's payload size (at least
/// 512), no extended rcode, version 0, DO as given, no options.
pub fn opt_record(payload: u16, dnssec_ok: bool) -> [u8; OPT_LEN] {
    let [p0, p1] = payload.max(MIN_UDP_PAYLOAD).to_be_bytes();
    let [f0, f1] = if dnssec_ok { EDNS_DO } else { 0 }.to_be_bytes();
    let [t0, t1] = TYPE_OPT.to_be_bytes();
    [0, t0, t1, p0, p1, 0, 0, f0, f1, 0, 0]
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
