//! meshdns: a per-pod DNS proxy that answers the Services of every cluster in a multicluster
//! mesh from an in-memory table and forwards everything else to the pod's own resolvers.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cache;
pub mod check;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod explain;
pub mod fast;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod hub;
pub mod iptables;
pub mod lookup;
pub mod metrics;
pub mod name_key;
pub mod relay;
pub mod resolv;
pub mod server;
pub mod source;
pub mod strict;
pub mod table;
pub mod upstream;
pub mod wire;
