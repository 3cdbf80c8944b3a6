//! A DNS datagram into the request handler, over UDP and TCP, as the server passes it on.
//! The checks are in `meshdns::fuzzing::handler_datagram`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::handler_datagram(data));
