//! The upstream response cache: replies to forwarded queries, kept for as long as their records
//! allow, so a pod that asks the same outside name again does not wait for the network.
//!
//! [`ResponseCache`] is pure and synchronous (no I/O, time passed in as `now`), so its rules are
//! tested without sockets or sleeps; [`Cache`] puts it behind a mutex and counts what it does in
//! the metrics. The handler consults it only for queries it would forward and for its own alias
//! chases; table answers never go through it.
//!
//! What is kept, and for how long:
//! - a positive answer (NOERROR with answers): the smallest TTL of its records, capped at
//!   `maxTtl`;
//! - a negative answer (NXDOMAIN, or NOERROR without answers): per RFC 2308, the smaller of the
//!   SOA's TTL and its MINIMUM field, capped at `negativeMaxTtl`. Without an SOA in the authority
//!   section the answer is not cached (RFC 2308 section 5: such answers "SHOULD NOT be cached");
//! - SERVFAIL from the upstream: `servfailTtl` (seconds, never more than [`MAX_SERVFAIL_TTL`]),
//!   so a failing name is not hammered, yet recovers fast;
//! - nothing else: truncated replies, REFUSED, FORMERR, NOTIMP and other rcodes, and any reply
//!   whose lifetime comes out as 0 (a record with TTL 0 means "do not cache").
//!
//! Every record's TTL is capped on the way in. On the way out each TTL is lowered by the time
//! spent in the cache, counted in whole seconds rounded down: a served TTL is at most 1 s longer
//! than exact (the upstream's own TTLs are no more exact than that) and never 0, since an entry
//! is dropped the moment its lifetime, the smallest capped TTL, has passed. Owner names equal to
//! the question are served in the asking client's case (0x20), as a case-preserving upstream
//! would answer it; the handler puts the client's ID and question on top.
//!
//! Keys are the lowercased question name, type and class plus the query bits that change the
//! answer: RD, CD, AD and DNSSEC OK. Queries with an EDNS Client Subnet option are neither
//! answered from nor stored in the cache: their answers are meant for one subnet. The OPT record
//! is never stored (RFC 6891: OPT RRs "MUST NOT be cached"); a cached answer gets its EDNS from
//! the client's query, as meshdns's own answers do.
//!
//! Replies are stored as wire bytes, several times smaller than decoded messages, and decoded
//! on a hit (about a microsecond for a typical answer). The cache holds at most `maxEntries`
//! replies and at most [`MAX_CACHE_BYTES`] of them; past either bound the least recently used
//! entry goes. So a flood of unique names, or of huge answers, cannot grow the sidecar.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};
use hickory_proto::op::{Edns, Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsCode;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::metrics::Metrics;
use crate::name_key::{KeyBuf, MAX_KEY_LEN};
use crate::wire;

/// Enough for the working set of one pod's outside names many times over; at a few hundred
/// bytes per typical entry the full cache stays a few MiB.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// Longest a positive answer is kept: five minutes, so a changed outside record is seen soon
/// even when its zone hands out long TTLs.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);
/// Longest a negative answer is kept. The search-path walk of a pod (ndots:5) sends most of
/// them; 30 s matches the `cache 30` of CoreDNS's default Corefile, so a name created
/// elsewhere is not hidden longer than the cluster's DNS would hide it.
pub const DEFAULT_NEGATIVE_MAX_TTL: Duration = Duration::from_secs(30);
/// How long an upstream's SERVFAIL is repeated without asking again (RFC 9520 asks resolvers to
/// cache failures briefly, so a broken name does not multiply the upstream's load).
pub const DEFAULT_SERVFAIL_TTL: Duration = Duration::from_secs(2);
/// Upper bound for `servfailTtl`: a failure is often transient, and a client that heard
/// SERVFAIL retries soon.
pub const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(30);
/// Upper bound for the bytes of all stored replies and their keys, whatever `maxEntries` says:
/// a sidecar's memory limit is small (128 MiB in the manifests) and a reply can be 64 KiB.
pub const MAX_CACHE_BYTES: usize = 8 << 20;
/// What one entry costs besides its key and reply bytes (hash-map slot, LRU node, reference
/// counts), counted against [`MAX_CACHE_BYTES`].
const ENTRY_OVERHEAD: usize = 128;
/// Type, class and flag bytes after the name in a key.
const KEY_SUFFIX_LEN: usize = 5;
/// Type and class after a question's name.
const QUESTION_FIXED: usize = 4;

/// How the cache behaves; `cache:` in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    /// At most this many replies are kept; 0 turns the cache off.
    pub max_entries: usize,
    /// Cap on the TTLs of a positive answer (whole seconds).
    pub max_ttl: Duration,
    /// Cap on the TTLs of a negative answer (whole seconds).
    pub negative_max_ttl: Duration,
    /// How long an upstream SERVFAIL is kept; zero: not at all.
    pub servfail_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_ttl: DEFAULT_MAX_TTL,
            negative_max_ttl: DEFAULT_NEGATIVE_MAX_TTL,
            servfail_ttl: DEFAULT_SERVFAIL_TTL,
        }
    }
}

impl CacheSettings {
    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }
}

/// The query bits that change an upstream's answer, and so split cache entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryFlags {
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// AD in a query asks a validating resolver to report AD (RFC 6840 section 5.7).
    pub authentic_data: bool,
    pub dnssec_ok: bool,
}

impl QueryFlags {
    /// The flags of a query with this header and EDNS section.
    pub fn of(metadata: &Metadata, edns: Option<&Edns>) -> Self {
        Self {
            recursion_desired: metadata.recursion_desired,
            checking_disabled: metadata.checking_disabled,
            authentic_data: metadata.authentic_data,
            dnssec_ok: edns.is_some_and(|e| e.flags().dnssec_ok),
        }
    }

    fn bits(self) -> u8 {
        u8::from(self.recursion_desired)
            | u8::from(self.checking_disabled) << 1
            | u8::from(self.authentic_data) << 2
            | u8::from(self.dnssec_ok) << 3
    }
}

/// Which cache entry answers a question: built on the stack, so a lookup allocates nothing.
#[derive(Clone)]
pub struct CacheKey {
    len: usize,
    buf: [u8; MAX_KEY_LEN + KEY_SUFFIX_LEN],
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CacheKey").field(&self.as_bytes()).finish()
    }
}

impl CacheKey {
    /// The key of a question; `None` for a name longer than DNS allows.
    pub fn new(name: &Name, qtype: RecordType, qclass: DNSClass, flags: QueryFlags) -> Option<Self> {
        Self::from_key(KeyBuf::from_name(name)?.as_bytes(), qtype, qclass, flags)
    }

    /// The key of a question whose name is already a table key (lowercase wire form).
    pub fn from_key(name: &[u8], qtype: RecordType, qclass: DNSClass, flags: QueryFlags) -> Option<Self> {
        let mut buf = [0; MAX_KEY_LEN + KEY_SUFFIX_LEN];
        // The suffix has a fixed length, so no two (name, suffix) pairs share a key.
        let mut suffix = [0; KEY_SUFFIX_LEN];
        suffix[..2].copy_from_slice(&u16::from(qtype).to_be_bytes());
        suffix[2..4].copy_from_slice(&u16::from(qclass).to_be_bytes());
        suffix[4] = flags.bits();
        let len = name.len() + KEY_SUFFIX_LEN;
        buf.get_mut(..name.len())?.copy_from_slice(name);
        buf.get_mut(name.len()..len)?.copy_from_slice(&suffix);
        Some(Self { len, buf })
    }

    /// The key of a query, or `None` when its answer must not be shared (EDNS Client Subnet).
    pub fn for_query(
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
        metadata: &Metadata,
        edns: Option<&Edns>,
    ) -> Option<Self> {
        if edns.is_some_and(|e| e.option(EdnsCode::Subnet).is_some()) {
            return None;
        }
        Self::new(name, qtype, qclass, QueryFlags::of(metadata, edns))
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// What [`ResponseCache::write_hit`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// This many bytes were written.
    Written(usize),
    /// A live entry that does not fit the buffer: whoever answers from the cache must truncate.
    TooLarge,
    Miss,
}

/// What an entry counts against [`MAX_CACHE_BYTES`].
fn cost(key: &[u8], wire: &[u8], ttls: &[u16]) -> usize {
    key.len() + wire.len() + std::mem::size_of_val(ttls) + ENTRY_OVERHEAD
}

/// Why a reply was or was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored; this many live entries were evicted to make room.
    Yes { evicted: usize },
    /// The cache is off.
    Disabled,
    /// The reply is not cacheable (rcode, TC, no SOA, TTL 0, too large).
    Uncacheable,
}

struct Entry {
    /// The reply without its OPT record, TTLs capped.
    wire: Box<[u8]>,
    /// Where each record's TTL sits in `wire`, for [`ResponseCache::write_hit`].
    ttls: Box<[u16]>,
    stored: Instant,
    /// Gone once this much time has passed since `stored`.
    lifetime: Duration,
    /// The entry's position in the LRU order.
    tick: u64,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored) >= self.lifetime
    }

    fn cost(&self, key: &[u8]) -> usize {
        cost(key, &self.wire, &self.ttls)
    }
}

/// A bounded, least-recently-used cache of upstream replies. Not synchronised: see [`Cache`].
pub struct ResponseCache {
    settings: CacheSettings,
    entries: HashMap<Arc<[u8]>, Entry>,
    /// Last use → key; the first entry is the least recently used. Exact LRU in O(log n)
    /// without unsafe code or another dependency.
    order: BTreeMap<u64, Arc<[u8]>>,
    next_tick: u64,
    /// What the entries cost, counted against [`MAX_CACHE_BYTES`].
    bytes: usize,
}

impl ResponseCache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            settings,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_tick: 0,
            bytes: 0,
        }
    }

    pub fn settings(&self) -> CacheSettings {
        self.settings
    }

    /// Entries held, expired ones included until they are looked up or evicted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Empties the cache and applies `settings`.
    pub fn reset(&mut self, settings: CacheSettings) {
        *self = Self::new(settings);
    }

    /// The reply stored under `key` as it stands at `now`: TTLs lowered by the time it spent
    /// here, owner names equal to `qname` in `qname`'s case. An expired entry is dropped.
    pub fn lookup(&mut self, key: &CacheKey, qname: &Name, now: Instant) -> Option<Message> {
        let key = key.as_bytes();
        let entry = self.entries.get(key)?;
        if entry.expired(now) {
            self.remove(key);
            return None;
        }
        let elapsed = now.saturating_duration_since(entry.stored).as_secs();
        let Ok(mut reply) = Message::from_vec(&entry.wire) else {
            // Only meshdns's own encoding is stored; a failure is a bug, not a reason to fail.
            self.remove(key);
            return None;
        };
        self.touch(key);
        let spent = u32::try_from(elapsed).unwrap_or(u32::MAX);
        for record in records_mut(&mut reply) {
            // Never below 1: every record's TTL is at least the entry's lifetime, which has not
            // passed, and the elapsed seconds are rounded down.
            record.ttl = record.ttl.saturating_sub(spent);
            if record.name == *qname {
                record.name = qname.clone();
            }
        }
        Some(reply)
    }

    /// Stores `reply` under `key` if the rules above allow, evicting the least recently used
    /// entries past the bounds.
    pub fn insert(&mut self, key: &CacheKey, reply: &Message, now: Instant) -> Stored {
        if !self.settings.enabled() {
            return Stored::Disabled;
        }
        let Some(Prepared { wire, ttls, lifetime }) = prepare(reply, &self.settings) else {
            return Stored::Uncacheable;
        };
        let key = key.as_bytes();
        let cost = cost(key, &wire, &ttls);
        if cost > MAX_CACHE_BYTES {
            return Stored::Uncacheable;
        }
        // A newer reply replaces the old one; that is no eviction.
        self.remove(key);
        let mut evicted = 0;
        while self.entries.len() >= self.settings.max_entries || self.bytes + cost > MAX_CACHE_BYTES {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.cost(&oldest);
                // An entry past its lifetime was dead already; only live ones show a cache
                // that is too small.
                if !entry.expired(now) {
                    evicted += 1;
                }
            }
        }
        let tick = self.tick();
        let owned: Arc<[u8]> = key.into();
        self.order.insert(tick, Arc::clone(&owned));
        self.bytes += cost;
        let entry = Entry {
            wire,
            ttls,
            stored: now,
            lifetime,
            tick,
        };
        self.entries.insert(owned, entry);
        Stored::Yes { evicted }
    }

    /// Writes the reply stored under `key` as it stands at `now` (TTLs lowered by the time it
    /// spent here, as [`ResponseCache::lookup`] lowers them) into `out`, when it fits; the ID
    /// and the question are the first asker's, for the caller to replace.
    pub fn write_hit(&mut self, key: &CacheKey, now: Instant, out: &mut [u8]) -> Hit {
        let key = key.as_bytes();
        let Some(entry) = self.entries.get_mut(key) else {
            return Hit::Miss;
        };
        if entry.expired(now) {
            self.remove(key);
            return Hit::Miss;
        }
        let Some(out) = out.get_mut(..entry.wire.len()) else {
            return Hit::TooLarge;
        };
        out.copy_from_slice(&entry.wire);
        let spent = u32::try_from(now.saturating_duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        for &at in &entry.ttls {
            let at = usize::from(at);
            if let Some(field) = out.get_mut(at..at + 4) {
                let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                field.copy_from_slice(&ttl.saturating_sub(spent).to_be_bytes());
            }
        }
        let len = entry.wire.len();
        self.touch(key);
        Hit::Written(len)
    }

    /// Makes `key` the most recently used entry.
    fn touch(&mut self, key: &[u8]) {
        let tick = self.tick();
        if let Some(entry) = self.entries.get_mut(key)
            && let Some(owned) = self.order.remove(&entry.tick)
        {
            entry.tick = tick;
            self.order.insert(tick, owned);
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&entry.tick);
            self.bytes -= entry.cost(key);
        }
    }

    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
}

/// The records of every section, whose TTLs the cache caps and lowers.
fn records_mut(reply: &mut Message) -> impl Iterator<Item = &mut Record> {
    reply
        .answers
        .iter_mut()
        .chain(reply.authorities.iter_mut())
        .chain(reply.additionals.iter_mut())
}

/// The wire form to store and how long it may be served, or `None` when the reply must not be
/// cached.
fn prepare(reply: &Message, settings: &CacheSettings) -> Option<Prepared> {
    if reply.metadata.truncation {
        return None;
    }
    let negative = match reply.metadata.response_code {
        ResponseCode::NoError if !reply.answers.is_empty() => false,
        ResponseCode::NoError | ResponseCode::NXDomain => true,
        ResponseCode::ServFail => {
            return store(reply, settings.servfail_ttl, whole_seconds_up(settings.servfail_ttl));
        }
        _ => return None,
    };
    if negative {
        // RFC 2308 section 5: the negative TTL is the SOA's own TTL (a record TTL below)
        // bounded by its MINIMUM field.
        let minimum = reply
            .authorities
            .iter()
            .filter_map(|r| match &r.data {
                RData::SOA(soa) => Some(soa.minimum),
                _ => None,
            })
            .min()?;
        let cap = whole_seconds(settings.negative_max_ttl);
        store(reply, Duration::from_secs(u64::from(minimum.min(cap))), cap)
    } else {
        let cap = whole_seconds(settings.max_ttl);
        store(reply, Duration::from_secs(u64::from(cap)), cap)
    }
}

/// Caps every TTL at `cap` and encodes the reply without OPT, noting where each TTL sits; the
/// lifetime is `base` or the smallest capped TTL, whichever is less.
fn store(reply: &Message, base: Duration, cap: u32) -> Option<Prepared> {
    let mut kept = reply.clone();
    kept.edns = None;
    kept.signature = None;
    let mut smallest = cap;
    for record in records_mut(&mut kept) {
        record.ttl = record.ttl.min(cap);
        smallest = smallest.min(record.ttl);
    }
    let lifetime = base.min(Duration::from_secs(u64::from(smallest)));
    if lifetime.is_zero() {
        return None;
    }
    let wire = kept.to_vec().ok()?;
    // One question (checked when the reply was accepted), written first and uncompressed.
    let question_len = wire::skip_name(&wire, wire::HEADER_LEN)? + QUESTION_FIXED - wire::HEADER_LEN;
    let mut ttls = Vec::with_capacity(kept.answers.len() + kept.authorities.len() + kept.additionals.len());
    wire::walk(&wire, question_len, |record| {
        ttls.push(u16::try_from(record.ttl).ok()?);
        Some(())
    })?;
    Some(Prepared {
        wire: wire.into_boxed_slice(),
        ttls: ttls.into_boxed_slice(),
        lifetime,
    })
}

/// A reply made ready for an [`Entry`].
struct Prepared {
    wire: Box<[u8]>,
    ttls: Box<[u16]>,
    lifetime: Duration,
}

fn whole_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn whole_seconds_up(d: Duration) -> u32 {
    let up = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(up).unwrap_or(u32::MAX)
}

/// The response cache shared by the handler's tasks, counted in the metrics.
pub struct Cache {
    inner: Mutex<ResponseCache>,
    metrics: Option<Arc<Metrics>>,
}

impl Cache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            inner: Mutex::new(ResponseCache::new(settings)),
            metrics: None,
        }
    }

    /// A cache that is never used.
    pub fn disabled() -> Self {
        Self::new(CacheSettings {
            max_entries: 0,
            ..CacheSettings::default()
        })
    }

    /// Like [`Cache::new`], counting hits, misses, evictions and entries in `metrics`.
    pub fn with_metrics(settings: CacheSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(ResponseCache::new(settings)),
            metrics: Some(metrics),
        }
    }

    /// Short critical sections only (a hash lookup and a small decode or encode), never
    /// across an await, so a poisoned lock can only mean a panic in that code: the data is
    /// still a valid cache.
    fn lock(&self) -> MutexGuard<'_, ResponseCache> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.lock().settings().enabled()
    }

    /// [`ResponseCache::write_hit`], counted as a hit or a miss; an entry too large for `out`
    /// is left to a [`Cache::get`], which counts it.
    pub fn write_hit(&self, key: &CacheKey, now: Instant, out: &mut [u8]) -> Hit {
        let mut cache = self.lock();
        if !cache.settings().enabled() {
            return Hit::Miss;
        }
        let hit = cache.write_hit(key, now, out);
        let entries = cache.len();
        drop(cache);
        if let Some(metrics) = &self.metrics {
            match hit {
                Hit::Written(_) => metrics.cache_lookup(true, entries),
                Hit::Miss => metrics.cache_lookup(false, entries),
                Hit::TooLarge => {}
            }
        }
        hit
    }

    /// The cached reply for `key` at `now`, counted as a hit or a miss.
    pub fn get(&self, key: &CacheKey, qname: &Name, now: Instant) -> Option<Message> {
        let mut cache = self.lock();
        if !cache.settings().enabled() {
            return None;
        }
        let hit = cache.lookup(key, qname, now);
        let entries = cache.len();
        drop(cache);
        if let Some(metrics) = &self.metrics {
            metrics.cache_lookup(hit.is_some(), entries);
        }
        hit
    }

    /// Offers an upstream's reply to the cache.
    pub fn put(&self, key: &CacheKey, reply: &Message, now: Instant) -> Stored {
        let mut cache = self.lock();
        let stored = cache.insert(key, reply, now);
        let entries = cache.len();
        drop(cache);
        if let (Some(metrics), Stored::Yes { evicted }) = (&self.metrics, stored) {
            metrics.cache_stored(evicted, entries);
        }
        stored
    }

    /// Empties the cache and applies `settings` (a config reload).
    pub fn reset(&self, settings: CacheSettings) {
        self.lock().reset(settings);
        if let Some(metrics) = &self.metrics {
            metrics.cache_stored(0, 0);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, CNAME, SOA, TXT};

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    fn key(qname: &str, qtype: RecordType, flags: QueryFlags) -> CacheKey {
        CacheKey::new(&name(qname), qtype, DNSClass::IN, flags).expect("key")
    }

    fn rd() -> QueryFlags {
        QueryFlags {
            recursion_desired: true,
            ..QueryFlags::default()
        }
    }

    fn reply(qname: &str, rcode: ResponseCode) -> Message {
        let mut msg = Message::response(7, OpCode::Query);
        msg.metadata.message_type = MessageType::Response;
        msg.metadata.recursion_desired = true;
        msg.metadata.recursion_available = true;
        msg.metadata.response_code = rcode;
        msg.add_query(Query::query(name(qname), RecordType::A));
        msg
    }

    fn a(owner: &str, ttl: u32, last: u8) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::new(192, 0, 2, last))))
    }

    fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
        let data = SOA::new(
            name("ns.example."),
            name("hostmaster.example."),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        Record::from_rdata(name(zone), ttl, RData::SOA(data))
    }

    fn positive(qname: &str, ttls: &[u32]) -> Message {
        let mut msg = reply(qname, ResponseCode::NoError);
        for (i, ttl) in ttls.iter().enumerate() {
            msg.add_answer(a(qname, *ttl, u8::try_from(i).unwrap_or(0)));
        }
        msg
    }

    fn ttls(msg: &Message) -> Vec<u32> {
        msg.answers
            .iter()
            .chain(&msg.authorities)
            .chain(&msg.additionals)
            .map(|r| r.ttl)
            .collect()
    }

    fn settings() -> CacheSettings {
        CacheSettings::default()
    }

    /// Stores `msg` at `t0` and looks it up at each offset: the TTLs served, `None` for a miss.
    fn served(settings: CacheSettings, msg: &Message, offsets: &[Duration]) -> Vec<Option<Vec<u32>>> {
        let mut cache = ResponseCache::new(settings);
        let t0 = Instant::now();
        let qname = msg.queries[0].name().clone();
        let k = key(&qname.to_ascii(), RecordType::A, rd());
        cache.insert(&k, msg, t0);
        offsets
            .iter()
            .map(|d| cache.lookup(&k, &qname, t0 + *d).map(|m| ttls(&m)))
            .collect()
    }

    #[test]
    fn lifetimes_follow_the_rules() {
        let mut nx_with_soa = reply("gone.example.", ResponseCode::NXDomain);
        nx_with_soa.add_authority(soa("example.", 600, 20));
        let mut nx_soa_ttl_smaller = reply("gone.example.", ResponseCode::NXDomain);
        nx_soa_ttl_smaller.add_authority(soa("example.", 10, 900));
        let mut nodata = reply("v4only.example.", ResponseCode::NoError);
        nodata.add_authority(soa("example.", 3600, 3600));
        let nx_without_soa = reply("gone.example.", ResponseCode::NXDomain);
        let nodata_without_soa = reply("v4only.example.", ResponseCode::NoError);
        let mut truncated = positive("big.example.", &[60]);
        truncated.metadata.truncation = true;
        let mut with_glue = positive("www.example.", &[60]);
        with_glue.add_additional(a("ns.example.", 5, 9));
        let mut cname_to_nx = reply("alias.example.", ResponseCode::NXDomain);
        cname_to_nx.add_answer(Record::from_rdata(
            name("alias.example."),
            3,
            RData::CNAME(CNAME(name("gone.example."))),
        ));
        cname_to_nx.add_authority(soa("example.", 60, 60));

        let s = |secs| Duration::from_secs(secs);
        // (case, reply, how long it is served: `Some(n)` = a hit at n-1 s and a miss at n s)
        let cases: Vec<(&str, Message, Option<u64>)> = vec![
            ("smallest answer TTL", positive("www.example.", &[60, 40]), Some(40)),
            ("capped at maxTtl", positive("www.example.", &[86_400]), Some(300)),
            ("TTL 0 is not cached", positive("www.example.", &[60, 0]), None),
            ("a short glue TTL bounds the entry", with_glue, Some(5)),
            ("NXDOMAIN: SOA minimum", nx_with_soa, Some(20)),
            ("NXDOMAIN: SOA TTL when smaller", nx_soa_ttl_smaller, Some(10)),
            ("NODATA capped at negativeMaxTtl", nodata, Some(30)),
            ("NXDOMAIN without SOA", nx_without_soa, None),
            ("NODATA without SOA", nodata_without_soa, None),
            ("a CNAME before NXDOMAIN bounds it", cname_to_nx, Some(3)),
            (
                "SERVFAIL: servfailTtl",
                reply("broken.example.", ResponseCode::ServFail),
                Some(2),
            ),
            ("REFUSED", reply("www.example.", ResponseCode::Refused), None),
            ("FORMERR", reply("www.example.", ResponseCode::FormErr), None),
            ("NOTIMP", reply("www.example.", ResponseCode::NotImp), None),
            ("truncated", truncated, None),
        ];
        for (case, msg, lifetime) in cases {
            let got = match lifetime {
                Some(n) => served(settings(), &msg, &[s(n) - SECOND, s(n)]),
                None => served(settings(), &msg, &[Duration::ZERO]),
            };
            let hits: Vec<bool> = got.iter().map(Option::is_some).collect();
            let want = if lifetime.is_some() {
                vec![true, false]
            } else {
                vec![false]
            };
            assert_eq!(hits, want, "{case}");
        }
    }

    #[test]
    fn ttls_are_capped_then_lowered_by_whole_seconds() {
        let msg = positive("www.example.", &[30, 45, 1000]);
        let at = |ms: u64| Duration::from_millis(ms);
        let got = served(
            settings(),
            &msg,
            &[at(0), at(999), at(1000), at(12_500), at(29_999), at(30_000)],
        );
        assert_eq!(
            got,
            vec![
                Some(vec![30, 45, 300]),
                Some(vec![30, 45, 300]),
                Some(vec![29, 44, 299]),
                Some(vec![18, 33, 288]),
                // Never 0: the entry is gone at the smallest TTL.
                Some(vec![1, 16, 271]),
                None,
            ]
        );
    }

    #[test]
    fn negative_answers_keep_their_soa() {
        let mut msg = reply("gone.example.", ResponseCode::NXDomain);
        msg.add_authority(soa("example.", 3600, 20));
        let mut cache = ResponseCache::new(settings());
        let t0 = Instant::now();
        let k = key("gone.example.", RecordType::A, rd());
        assert_eq!(cache.insert(&k, &msg, t0), Stored::Yes { evicted: 0 });
        let hit = cache.lookup(&k, &name("gone.example."), t0 + 5 * SECOND).expect("hit");
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain);
        assert!(hit.answers.is_empty());
        let [soa] = hit.authorities.as_slice() else {
            panic!("one SOA: {:?}", hit.authorities)
        };
        // Capped at negativeMaxTtl (30), then 5 s spent.
        assert_eq!((soa.record_type(), soa.ttl), (RecordType::SOA, 25));
        assert!(cache.lookup(&k, &name("gone.example."), t0 + 20 * SECOND).is_none());
    }

    #[test]
    fn servfail_is_kept_only_briefly() {
        let msg = reply("broken.example.", ResponseCode::ServFail);
        let at = |ms: u64| Duration::from_millis(ms);
        let short = CacheSettings {
            servfail_ttl: at(500),
            ..settings()
        };
        assert_eq!(served(short, &msg, &[at(499), at(500)]), vec![Some(vec![]), None]);
        let off = CacheSettings {
            servfail_ttl: Duration::ZERO,
            ..settings()
        };
        assert_eq!(served(off, &msg, &[at(0)]), vec![None]);
    }

    #[test]
    fn keys_ignore_case_and_split_on_query_bits() {
        let mut cache = ResponseCache::new(settings());
        let t0 = Instant::now();
        cache.insert(
            &key("WWW.Example.", RecordType::A, rd()),
            &positive("WWW.Example.", &[60]),
            t0,
        );
        let lookup = |cache: &mut ResponseCache, qname: &str, qtype, flags| {
            let qname = name(qname);
            cache.lookup(
                &CacheKey::new(&qname, qtype, DNSClass::IN, flags).expect("key"),
                &qname,
                t0,
            )
        };
        let mut with = |f: fn(&mut QueryFlags)| {
            let mut flags = rd();
            f(&mut flags);
            lookup(&mut cache, "www.example.", RecordType::A, flags).is_some()
        };
        assert!(with(|_| {}), "same question, other case");
        assert!(!with(|f| f.dnssec_ok = true), "DO");
        assert!(!with(|f| f.checking_disabled = true), "CD");
        assert!(!with(|f| f.authentic_data = true), "AD");
        assert!(!with(|f| f.recursion_desired = false), "RD");
        assert!(
            lookup(&mut cache, "www.example.", RecordType::AAAA, rd()).is_none(),
            "type"
        );
        let chaos = CacheKey::new(&name("www.example."), RecordType::A, DNSClass::CH, rd()).expect("key");
        assert!(cache.lookup(&chaos, &name("www.example."), t0).is_none(), "class");
    }

    #[test]
    fn owner_names_take_the_askers_case() {
        let mut cache = ResponseCache::new(settings());
        let t0 = Instant::now();
        let mut msg = positive("www.example.", &[60]);
        msg.add_additional(a("ns.example.", 60, 9));
        cache.insert(&key("www.example.", RecordType::A, rd()), &msg, t0);
        let asked = name("wWw.ExAmple.");
        let hit = cache
            .lookup(&key("wWw.ExAmple.", RecordType::A, rd()), &asked, t0)
            .expect("hit");
        assert!(hit.answers[0].name.eq_case(&asked), "{}", hit.answers[0].name);
        assert!(hit.additionals[0].name.eq_case(&name("ns.example.")));
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted_at_the_bound() {
        let bounded = CacheSettings {
            max_entries: 3,
            ..settings()
        };
        let mut cache = ResponseCache::new(bounded);
        let t0 = Instant::now();
        let names = ["a.example.", "b.example.", "c.example.", "d.example.", "e.example."];
        for n in &names[..3] {
            assert_eq!(
                cache.insert(&key(n, RecordType::A, rd()), &positive(n, &[60]), t0),
                Stored::Yes { evicted: 0 }
            );
        }
        // `a` is used, so `b` is now the least recently used.
        assert!(
            cache
                .lookup(&key("a.example.", RecordType::A, rd()), &name("a.example."), t0)
                .is_some()
        );
        assert_eq!(
            cache.insert(
                &key("d.example.", RecordType::A, rd()),
                &positive("d.example.", &[60]),
                t0
            ),
            Stored::Yes { evicted: 1 }
        );
        assert_eq!(cache.len(), 3);
        let present = |cache: &mut ResponseCache, n: &str| cache.lookup(&key(n, RecordType::A, rd()), &name(n), t0);
        assert!(present(&mut cache, "b.example.").is_none());
        for n in ["a.example.", "c.example.", "d.example."] {
            assert!(present(&mut cache, n).is_some(), "{n}");
        }
        // An expired entry making room is no eviction.
        let later = t0 + 120 * SECOND;
        let stored = cache.insert(
            &key("e.example.", RecordType::A, rd()),
            &positive("e.example.", &[600]),
            later,
        );
        assert_eq!(stored, Stored::Yes { evicted: 0 });
        // Replacing an entry evicts nothing either.
        let again = cache.insert(
            &key("e.example.", RecordType::A, rd()),
            &positive("e.example.", &[600]),
            later,
        );
        assert_eq!(again, Stored::Yes { evicted: 0 });
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn zero_entries_disables_the_cache() {
        let off = CacheSettings {
            max_entries: 0,
            ..settings()
        };
        let mut cache = ResponseCache::new(off);
        let k = key("www.example.", RecordType::A, rd());
        let t0 = Instant::now();
        assert_eq!(cache.insert(&k, &positive("www.example.", &[60]), t0), Stored::Disabled);
        assert!(cache.lookup(&k, &name("www.example."), t0).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn opt_is_not_stored_and_client_subnet_queries_bypass() {
        let mut msg = positive("www.example.", &[60]);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        msg.set_edns(edns.clone());
        let mut cache = ResponseCache::new(settings());
        let t0 = Instant::now();
        let k = key("www.example.", RecordType::A, rd());
        cache.insert(&k, &msg, t0);
        let hit = cache.lookup(&k, &name("www.example."), t0).expect("hit");
        assert!(hit.edns.is_none());

        let query = Message::query();
        let plain = CacheKey::for_query(
            &name("www.example."),
            RecordType::A,
            DNSClass::IN,
            &query.metadata,
            Some(&edns),
        );
        assert!(plain.is_some());
        let subnet = hickory_proto::rr::rdata::opt::ClientSubnet::new("192.0.2.0".parse().unwrap(), 24, 0);
        edns.options_mut()
            .insert(hickory_proto::rr::rdata::opt::EdnsOption::Subnet(subnet));
        let ecs = CacheKey::for_query(
            &name("www.example."),
            RecordType::A,
            DNSClass::IN,
            &query.metadata,
            Some(&edns),
        );
        assert!(ecs.is_none());
    }

    #[test]
    fn stored_bytes_stay_under_the_budget() {
        let many = CacheSettings {
            max_entries: usize::MAX,
            ..settings()
        };
        let mut cache = ResponseCache::new(many);
        let t0 = Instant::now();
        // Four TXT records of 15 000 bytes each: about 60 KiB per reply, near the largest.
        let text = vec!["x".repeat(250); 60];
        for i in 0..200 {
            let n = format!("n{i}.example.");
            let mut msg = reply(&n, ResponseCode::NoError);
            for _ in 0..4 {
                msg.add_answer(Record::from_rdata(name(&n), 60, RData::TXT(TXT::new(text.clone()))));
            }
            cache.insert(&key(&n, RecordType::TXT, rd()), &msg, t0);
        }
        assert!(cache.bytes <= MAX_CACHE_BYTES, "{}", cache.bytes);
        assert!(cache.len() < 200 && cache.len() > 100, "{}", cache.len());
        let counted: usize = cache.entries.iter().map(|(k, e)| e.cost(k)).sum();
        assert_eq!(counted, cache.bytes);
        assert_eq!(cache.order.len(), cache.len());
    }

    #[test]
    fn shared_cache_counts_in_metrics() {
        let metrics = Arc::new(Metrics::new());
        let cache = Cache::with_metrics(
            CacheSettings {
                max_entries: 1,
                ..settings()
            },
            Arc::clone(&metrics),
        );
        let t0 = Instant::now();
        let (a, b) = (
            key("a.example.", RecordType::A, rd()),
            key("b.example.", RecordType::A, rd()),
        );
        assert!(cache.get(&a, &name("a.example."), t0).is_none());
        cache.put(&a, &positive("a.example.", &[60]), t0);
        assert!(cache.get(&a, &name("a.example."), t0).is_some());
        cache.put(&b, &positive("b.example.", &[60]), t0);
        let text = metrics.render(Vec::new(), true);
        for line in [
            "meshdns_cache_hits_total 1",
            "meshdns_cache_misses_total 1",
            "meshdns_cache_evictions_total 1",
            "meshdns_cache_entries 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        cache.reset(settings());
        assert!(cache.is_empty());
        assert!(
            metrics
                .render(Vec::new(), true)
                .lines()
                .any(|l| l == "meshdns_cache_entries 0")
        );
    }
}
