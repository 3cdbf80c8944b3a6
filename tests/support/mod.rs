//! Shared helpers for the integration tests. Each test binary uses a
//! different subset, hence the blanket `dead_code` allowance.
#![allow(dead_code)]

pub mod apiserver;
pub mod compare;
pub mod dns;
pub mod process;
pub mod proxy;
pub mod strict;
pub mod upstream;
