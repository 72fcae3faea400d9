//! safelb's configuration: TOML text in, a validated immutable model or a list of diagnostics out.
//!
//! Start at [`check`]: it parses the source ([`parse`]), reads every section while collecting
//! problems ([`decode`]), cross-checks routes, pools and `[[test]]`s ([`validate`]) and returns a
//! [`ValidConfig`] only when there is no error. [`routing`] holds the route table used by both the
//! route tests and the data plane.
//!
//! Architecture Invariant: no I/O and no async here. This crate decides what a config *means*;
//! it never opens a socket or reads a file, so `safelb check` and the server agree by construction.
#![forbid(unsafe_code)]

mod decode;
pub mod diagnostic;
pub mod duration;
pub mod model;
mod parse;
pub mod routing;
mod validate;

pub use diagnostic::{Diagnostic, Diagnostics, Rule, Severity};
pub use model::*;
pub use parse::{check, Checked};
pub use routing::{HostMatch, RouteMatch};
