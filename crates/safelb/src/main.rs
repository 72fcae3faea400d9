//! The `safelb` binary: command line, process wiring, signals.
//!
//! Each subcommand lives in its own file under `cli/`. Library crates do the work:
//! `safelb-config` decides what a config means, `safelb-proxy` serves traffic.
#![forbid(unsafe_code)]

mod admin;
mod cli;
mod client;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("safelb: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
