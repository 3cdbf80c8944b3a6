//! Text as a kubeconfig, trusted and untrusted (the remote-secret rules).
//! The checks are in `meshdns::fuzzing::kubeconfig`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshdns::fuzzing::kubeconfig(data));
