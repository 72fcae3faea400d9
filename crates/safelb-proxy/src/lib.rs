//! safelb's data plane: listeners, the request path, balancing, health and upstream pools.
//!
//! Where to start: [`server::serve`] accepts connections and hands each request to
//! [`Proxy::serve`](proxy::Proxy::serve), which reads the routing [`Snapshot`] published by the
//! [`ProxyHandle`]. Backend state (health, ejection, load, idle connections) lives in
//! [`backend`] and outlives snapshots; policies are in [`balance`]; active checks in [`health`].
//!
//! Architecture Invariant: this crate never imports the control plane. The control plane acts
//! on traffic only through [`ProxyHandle`]; a request never waits on it.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod actions;
pub mod backend;
pub mod balance;
mod body;
mod client_io;
pub mod clock;
pub mod error;
pub mod exposition;
pub mod failures;
#[doc(hidden)]
pub mod fuzzing;
mod h1;
mod handle;
pub mod headers;
pub mod health;
pub mod hedge;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
mod registry;
pub mod role;
pub mod samples;
pub mod server;
pub mod shadow;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod transport;
mod upstream;
pub mod worker;

pub use access_log::AccessLog;
pub use handle::{Canary, Probed, ProxyHandle, Routing, SwapError};
pub use proxy::Proxy;
pub use role::Role;
pub use snapshot::Snapshot;
