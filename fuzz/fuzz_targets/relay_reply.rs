//! A query (length-prefixed) and an upstream's reply to it, through the UDP relay and its
//! cache-hit path. The checks are in `meshdns::fuzzing::relay_reply`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::relay_reply(data));
