//! safelb's integration tests: one binary, one module per invariant area. Everything runs on
//! loopback with real sockets, real backends (safelb-testkit) and, where the process matters,
//! the real `safelb` binary.

mod common;

mod actions;
mod admin;
mod change_control;
mod check_cli;
mod crash;
mod dashboard;
mod deploy;
mod failures;
mod fleet;
mod hostile;
mod hostile_h2;
mod http1;
pub mod lifecycle;
mod observability;
pub mod protocols;
mod proxying;
mod safety;
mod swap;
pub mod tls;
