//! A sequence of Service and EndpointSlice watch events folded into cluster state, checked against a fresh list.
//! The checks are in `meshdns::fuzzing::watch_events`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::watch_events(data));
