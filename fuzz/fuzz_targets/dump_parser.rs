//! Bytes as an object dump; a parsed dump must also build a table and answer its names.
//! The checks are in `meshdns::fuzzing::dump_parser`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::dump_parser(data));
