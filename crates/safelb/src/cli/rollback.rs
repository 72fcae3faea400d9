//! `safelb rollback [VERSION] -m REASON`: back to the known-good version before the running one
//! (or the one named) for all traffic at once; during a rollout, abort it instead.

use std::process::ExitCode;

use serde_json::json;

use crate::client::{block_on, message, AdminArgs, AdminClient};

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    /// The version whose content to serve (default: the known-good version before the running one).
    version: Option<u64>,
    /// Same as VERSION.
    #[arg(long = "to", conflicts_with = "version")]
    to: Option<u64>,
    /// Why (recorded with the new version).
    #[arg(short = 'm', long = "message")]
    reason: String,
    #[arg(long)]
    author: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

pub fn run(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let body = json!({ "to": args.version.or(args.to), "reason": args.reason, "author": super::apply::author(args.author) });
        let r = client.post("/rollback", &body).await?;
        if r.status != 200 {
            eprintln!("rollback refused: {}", message(&r.body));
            return Ok(ExitCode::from(1));
        }
        let b = &r.body;
        match b["aborted_rollout"].as_u64() {
            Some(id) => println!(
                "rollout of version {id} aborted: version {} serves all traffic",
                b["target"]
            ),
            None => println!(
                "rolled back: version {} (the content of version {}) serves all traffic, in {} ms",
                b["version"], b["target"], b["took_ms"]
            ),
        }
        Ok(ExitCode::SUCCESS)
    })
}
