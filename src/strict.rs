//! A strict reading of a DNS message in wire form, for checking what meshdns sends: every byte
//! accounted for, the header's counts exactly the records present, names well-formed with
//! compression pointers only backwards, each record's data the length its type allows, and at
//! most one OPT record, in the additional section, owned by the root.
//!
//! hickory-proto decodes a message that has bytes after its last counted record without
//! complaint, and so did every comparison test until strict clients (`kdig`, dnspython)
//! rejected meshdns's replies for exactly that. This reader is independent of hickory and of
//! the writers it checks ([`crate::fast`], [`crate::relay`], the handler's encoder): the test
//! suite and the fuzz targets run every reply they see through [`check`].

use std::fmt;

use crate::wire::{HEADER_LEN, MAX_LABEL, MAX_NAME_WIRE as MAX_NAME, POINTER_BITS, QUESTION_FIXED, RR_FIXED, TYPE_OPT};

/// What a strictly read message holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// ID, flags, the 4-bit header rcode.
    pub id: u16,
    pub flags: u16,
    /// The full rcode: the header's 4 bits and the OPT record's upper 8 (RFC 6891 6.1.3).
    pub rcode: u16,
    pub questions: u16,
    pub answers: u16,
    pub authorities: u16,
    pub additionals: u16,
    /// The OPT record's payload size, version and DO bit, if there is one.
    pub opt: Option<Opt>,
    /// Each record (owner expanded, lowercase), in order: section, type, TTL, data expanded.
    pub records: Vec<RecordView>,
}

/// An OPT record's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opt {
    pub payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// One record with its names expanded, so that two encodings of the same record compare
/// equal whatever their compression.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordView {
    pub section: Section,
    /// The owner in wire form without compression, lowercase.
    pub owner: Vec<u8>,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    /// The data, with the names of the types that hold names expanded (lowercase).
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// Why a message is not strictly well-formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Where reading stopped.
    pub at: usize,
    pub why: &'static str,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed at byte {}: {}", self.at, self.why)
    }
}

impl std::error::Error for Malformed {}

/// Reads `wire` strictly; see the module documentation for what is checked.
pub fn check(wire: &[u8]) -> Result<Layout, Malformed> {
    let mut r = Reader { wire, at: 0 };
    let header = r.take(HEADER_LEN, "shorter than a header")?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let mut layout = Layout {
        id: word(0),
        flags: word(2),
        rcode: word(2) & 0x000F,
        questions: word(4),
        answers: word(6),
        authorities: word(8),
        additionals: word(10),
        ..Layout::default()
    };
    for _ in 0..layout.questions {
        r.name()?;
        r.take(QUESTION_FIXED, "question cut short")?;
    }
    let sections = [
        (Section::Answer, layout.answers),
        (Section::Authority, layout.authorities),
        (Section::Additional, layout.additionals),
    ];
    for (section, count) in sections {
        for _ in 0..count {
            let start = r.at;
            let owner = r.name()?;
            let fixed = r.take(RR_FIXED, "record cut short")?;
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let class = u16::from_be_bytes([fixed[2], fixed[3]]);
            let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
            let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            let data_at = r.at;
            r.take(rdlen, "record data past the end")?;
            let data = rdata(wire, data_at, rdlen, rtype)?;
            if rtype == TYPE_OPT {
                let fail = |why| Err(Malformed { at: start, why });
                if section != Section::Additional {
                    return fail("OPT record outside the additional section");
                }
                if layout.opt.is_some() {
                    return fail("a second OPT record");
                }
                if owner != [0] {
                    return fail("OPT record not owned by the root");
                }
                let [ext_rcode, version, flags_hi, _] = ttl.to_be_bytes();
                layout.rcode |= u16::from(ext_rcode) << 4;
                layout.opt = Some(Opt {
                    payload: class,
                    version,
                    dnssec_ok: flags_hi & 0x80 != 0,
                });
            }
            layout.records.push(RecordView {
                section,
                owner,
                rtype,
                class,
                ttl,
                data,
            });
        }
    }
    if r.at != wire.len() {
        return Err(Malformed {
            at: r.at,
            why: "bytes after the last record the header counts",
        });
    }
    Ok(layout)
}

/// A record's data, checked against its type's shape; names in it expanded.
fn rdata(wire: &[u8], at: usize, len: usize, rtype: u16) -> Result<Vec<u8>, Malformed> {
    let end = at + len;
    let bad = |why| Malformed { at, why };
    let fixed = |n: usize| {
        if len == n {
            Ok(wire[at..end].to_vec())
        } else {
            Err(bad("address data of the wrong length"))
        }
    };
    // Names at `at + prefix`, then `suffix` fixed bytes, must fill the data exactly.
    let names = |prefix: usize, count: usize, suffix: usize| -> Result<Vec<u8>, Malformed> {
        let mut r = Reader {
            wire: &wire[..end],
            at: at + prefix,
        };
        if at + prefix > end {
            return Err(bad("record data too short for its type"));
        }
        let mut out = wire[at..at + prefix].to_vec();
        for _ in 0..count {
            out.extend(r.name()?);
        }
        out.extend_from_slice(r.take(suffix, "record data too short for its type")?);
        if r.at != end {
            return Err(bad("record data longer than its type holds"));
        }
        Ok(out)
    };
    match rtype {
        1 => fixed(4),
        28 => fixed(16),
        // CNAME, PTR, NS, DNAME: one name.
        5 | 12 | 2 | 39 => names(0, 1, 0),
        // MX: preference, exchange.
        15 => names(2, 1, 0),
        // SRV: priority, weight, port, target.
        33 => names(6, 1, 0),
        // SOA: two names and five 32-bit numbers.
        6 => names(0, 2, 20),
        16 => {
            // TXT: one or more character strings that fill the data.
            let mut p = at;
            if len == 0 {
                return Err(bad("TXT without a string"));
            }
            while p < end {
                p += 1 + usize::from(wire[p]);
            }
            if p != end {
                return Err(bad("TXT strings overrun the data"));
            }
            Ok(wire[at..end].to_vec())
        }
        TYPE_OPT => {
            // Options: code, length, data; they must fill the record.
            let mut p = at;
            while p < end {
                let Some(head) = wire.get(p..p + 4).filter(|_| p + 4 <= end) else {
                    return Err(bad("EDNS option cut short"));
                };
                p += 4 + usize::from(u16::from_be_bytes([head[2], head[3]]));
            }
            if p != end {
                return Err(bad("EDNS option overruns the OPT record"));
            }
            Ok(wire[at..end].to_vec())
        }
        _ => Ok(wire[at..end].to_vec()),
    }
}

struct Reader<'w> {
    wire: &'w [u8],
    at: usize,
}

impl<'w> Reader<'w> {
    fn take(&mut self, n: usize, why: &'static str) -> Result<&'w [u8], Malformed> {
        let bytes = self
            .at
            .checked_add(n)
            .and_then(|end| self.wire.get(self.at..end))
            .ok_or(Malformed { at: self.at, why })?;
        self.at += n;
        Ok(bytes)
    }

    /// Reads a name at the cursor and returns it expanded and lowercased. Pointers must point
    /// strictly before the name that holds them (so they cannot loop), at a label.
    fn name(&mut self) -> Result<Vec<u8>, Malformed> {
        let mut out = Vec::new();
        let mut pos = self.at;
        let mut jumped = false;
        // Every pointer must go further back than the one before.
        let mut floor = self.at;
        loop {
            let fail = |why| Malformed { at: pos, why };
            let len = *self.wire.get(pos).ok_or(fail("name cut short"))?;
            match len {
                0 => {
                    out.push(0);
                    if !jumped {
                        self.at = pos + 1;
                    }
                    break;
                }
                1..=MAX_LABEL => {
                    let label = self
                        .wire
                        .get(pos + 1..pos + 1 + usize::from(len))
                        .ok_or(fail("label cut short"))?;
                    out.push(len);
                    out.extend(label.iter().map(u8::to_ascii_lowercase));
                    pos += 1 + usize::from(len);
                }
                _ if len & POINTER_BITS == POINTER_BITS => {
                    let low = *self.wire.get(pos + 1).ok_or(fail("pointer cut short"))?;
                    let to = usize::from(len & !POINTER_BITS) << 8 | usize::from(low);
                    if to >= floor {
                        return Err(fail("compression pointer that does not point backwards"));
                    }
                    if to < HEADER_LEN {
                        return Err(fail("compression pointer into the header"));
                    }
                    if !jumped {
                        self.at = pos + 2;
                    }
                    jumped = true;
                    floor = to;
                    pos = to;
                }
                _ => return Err(fail("reserved label type")),
            }
            if out.len() > MAX_NAME {
                return Err(Malformed {
                    at: pos,
                    why: "name longer than 255 bytes",
                });
            }
        }
        // Again with the root byte, which the loop does not check.
        if out.len() > MAX_NAME {
            return Err(Malformed {
                at: pos,
                why: "name longer than 255 bytes",
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, CNAME, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn sample() -> Vec<u8> {
        let name = Name::from_ascii("www.example.test.").unwrap();
        let target = Name::from_ascii("edge.example.test.").unwrap();
        let zone = Name::from_ascii("example.test.").unwrap();
        let mut msg = Message::new(7, MessageType::Response, OpCode::Query);
        msg.add_query(Query::query(name.clone(), RecordType::A));
        msg.add_answer(Record::from_rdata(name, 11, RData::CNAME(CNAME(target.clone()))));
        msg.add_answer(Record::from_rdata(target, 22, RData::A(A::new(192, 0, 2, 1))));
        let soa = SOA::new(zone.clone(), zone.clone(), 1, 2, 3, 4, 5);
        msg.add_authority(Record::from_rdata(zone, 5, RData::SOA(soa)));
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.set_dnssec_ok(true);
        msg.set_edns(edns);
        msg.to_vec().unwrap()
    }

    #[test]
    fn a_well_formed_reply_reads_whole() {
        let wire = sample();
        let layout = check(&wire).unwrap();
        assert_eq!(
            (layout.questions, layout.answers, layout.authorities, layout.additionals),
            (1, 2, 1, 1)
        );
        assert_eq!(
            layout.opt,
            Some(Opt {
                payload: 1232,
                version: 0,
                dnssec_ok: true
            })
        );
        assert_eq!(layout.records[0].data, b"\x04edge\x07example\x04test\x00");
    }

    #[test]
    fn what_hickory_lets_through_is_refused() {
        let wire = sample();
        let opt: Vec<u8> = wire[wire.len() - 11..].to_vec();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("trailing bytes", [&wire[..], &[0u8][..]].concat(), "bytes after"),
            (
                "a second OPT after the counted one",
                [&wire[..], &opt[..]].concat(),
                "bytes after",
            ),
            (
                "two counted OPT records",
                {
                    let mut w = [&wire[..], &opt[..]].concat();
                    w[11] = 2;
                    w
                },
                "second OPT",
            ),
            ("cut in the last record", wire[..wire.len() - 3].to_vec(), "cut short"),
            (
                "a partial record after the counted ones",
                {
                    let mut w = wire.clone();
                    w[11] = 0;
                    w
                },
                "bytes after",
            ),
        ];
        for (name, bytes, want) in cases {
            if want == "bytes after" {
                assert!(Message::from_vec(&bytes).is_ok(), "{name}: hickory takes it");
            }
            let err = check(&bytes).expect_err(name);
            assert!(err.why.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn forward_and_looping_pointers_are_refused() {
        let mut header = vec![0u8; 12];
        header[5] = 1;
        let mut forward = header.clone();
        forward.extend_from_slice(&[0xC0, 14, 0, 0, 1, 0, 1]);
        assert!(check(&forward).unwrap_err().why.contains("backwards"));
        let mut into_header = header.clone();
        into_header.extend_from_slice(&[1, b'a', 0xC0, 2, 0, 1, 0, 1]);
        assert!(check(&into_header).unwrap_err().why.contains("header"));
        let mut itself = header;
        itself.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert!(check(&itself).is_err());
    }

    #[test]
    fn every_cut_is_an_error_not_a_panic() {
        let wire = sample();
        for cut in 0..wire.len() {
            assert!(check(&wire[..cut]).is_err(), "cut at {cut}");
        }
    }
}
