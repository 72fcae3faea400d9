//! Command-line definitions and dispatch: one file per subcommand.

mod check;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "safelb",
    version,
    about = "An HTTP load balancer whose configuration changes cannot take a website down"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy with a config file.
    Serve(serve::ServeArgs),
    /// Validate a config offline: syntax, meaning, route tests. Exit 0 when valid, 1 otherwise.
    Check {
        /// The config file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Check { file, format } => check::run(&file, format),
    }
}
