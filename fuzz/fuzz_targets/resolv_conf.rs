//! Bytes as resolv.conf.
//! The checks are in `meshdns::fuzzing::resolv_conf`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::resolv_conf(data));
