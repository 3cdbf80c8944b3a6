//! A TCP byte stream, in chunks the input chooses, into the server's length-prefix framing.
//! The checks are in `meshdns::fuzzing::tcp_framing`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::tcp_framing(data));
