//! Command-line definitions and dispatch: one file per subcommand.

mod apply;
mod check;
mod demo;
mod history;
mod incidents;
mod plan;
mod rollback;
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
    /// Run the proxy, the admin API and the change pipeline.
    Serve(serve::ServeArgs),
    /// Validate a config offline: syntax, meaning, route tests. Exit 0 when valid, 1 otherwise.
    Check {
        /// The config file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show what applying a config would do: diff, preflight, traffic impact. Changes nothing.
    Plan(plan::PlanArgs),
    /// Submit a config through preflight, canary and bake. Exit 0 promoted, 3 rejected, 4 rolled back.
    Apply(apply::ApplyArgs),
    /// Back to the last known-good (or a named) version at once; aborts a running rollout.
    Rollback(rollback::RollbackArgs),
    /// List config versions, newest first (* marks the running one).
    History(history::HistoryArgs),
    /// Show the difference between two versions.
    Diff(history::DiffArgs),
    /// Show the running version, the rollout in progress and backend health.
    Status(history::StatusArgs),
    /// List incidents (alerts that fired, rollbacks), newest first.
    Incidents(incidents::IncidentsArgs),
    /// Print the postmortem safelb wrote for an incident.
    Postmortem(incidents::PostmortemArgs),
    /// The incident drill: a bad change on a local setup, caught, rolled back, written up.
    Demo(demo::DemoArgs),
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
        Command::Plan(args) => plan::run(args),
        Command::Apply(args) => apply::run(args),
        Command::Rollback(args) => rollback::run(args),
        Command::History(args) => history::history(args),
        Command::Diff(args) => history::diff(args),
        Command::Status(args) => history::status(args),
        Command::Incidents(args) => incidents::list(args),
        Command::Postmortem(args) => incidents::postmortem(args),
        Command::Demo(args) => demo::run(args),
    }
}
