//! `safelb apply FILE -m REASON`: submit a candidate and follow its rollout.
//! Exit 0 promoted, 3 rejected before serving traffic, 4 rolled back.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::client::{block_on, message, AdminArgs, AdminClient};

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// The candidate config file.
    file: PathBuf,
    /// Why this change is made (recorded with the version).
    #[arg(short = 'm', long = "message")]
    reason: String,
    /// Who makes it (default: $USER).
    #[arg(long)]
    author: Option<String>,
    /// Skip the preflight probes (emergencies only; recorded as such). The canary still runs.
    #[arg(long)]
    skip_preflight: bool,
    /// Skip the shadow stage (recorded as such): the candidate's first answers are then to clients.
    #[arg(long)]
    skip_shadow: bool,
    /// Accept a traffic shift above rollout.max_traffic_shift.
    #[arg(long)]
    confirm: bool,
    /// Apply during a change freeze.
    #[arg(long)]
    emergency: bool,
    /// Return once the rollout has started instead of following it.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

pub fn author(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub fn run(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let source = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let body = json!({
            "source": source,
            "file": args.file.display().to_string(),
            "reason": args.reason,
            "author": author(args.author),
            "skip_preflight": args.skip_preflight,
            "skip_shadow": args.skip_shadow,
            "confirm": args.confirm,
            "emergency": args.emergency,
        });
        let reply = client.post("/apply", &body).await?;
        match reply.status {
            202 => {}
            422 => {
                match reply.body.get("rendered").and_then(Value::as_str) {
                    Some(r) => eprint!("{r}"),
                    None => eprintln!("{}", message(&reply.body)),
                }
                eprintln!("rejected: {} (nothing was served)", message(&reply.body));
                return Ok(ExitCode::from(3));
            }
            409 | 423 => {
                eprintln!("refused: {}", message(&reply.body));
                return Ok(ExitCode::from(3));
            }
            _ => anyhow::bail!("apply failed ({}): {}", reply.status, message(&reply.body)),
        }
        let id = reply.body["rollout"].as_u64().unwrap_or(0);
        println!(
            "version {id} submitted{}",
            if args.skip_preflight {
                " (preflight SKIPPED)"
            } else {
                ""
            }
        );
        if args.skip_shadow {
            println!("  shadow stage SKIPPED: the candidate's first answers go to clients");
        }
        if args.no_wait {
            println!("follow it with: safelb status (rollout {id})");
            return Ok(ExitCode::SUCCESS);
        }
        follow(&client, id).await
    })
}

/// Prints a rollout's progress until it ends; returns the exit code for its outcome.
pub async fn follow(client: &AdminClient, id: u64) -> anyhow::Result<ExitCode> {
    let mut printed = 0;
    loop {
        let r = client.get(&format!("/rollouts/{id}")).await?;
        if r.status != 200 {
            anyhow::bail!("cannot follow rollout {id}: {}", message(&r.body));
        }
        let s = &r.body;
        if let Some(lines) = s["progress"].as_array() {
            for line in &lines[printed.min(lines.len())..] {
                println!("  {}", line.as_str().unwrap_or(""));
            }
            printed = lines.len();
        }
        let phase = s["phase"].as_str().unwrap_or("");
        if phase == "canary" {
            let c = &s["candidate"];
            eprint!(
                "\r  {}% on candidate: {} requests, {} errors ({:.1}%)      ",
                s["percent"],
                c["requests"],
                c["errors"],
                c["error_rate"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
        let code = match phase {
            "promoted" => Some(0),
            "rejected" => Some(3),
            "rolled_back" => Some(4),
            _ => None,
        };
        if let Some(code) = code {
            eprintln!();
            let took = s["finished_ms"].as_i64().unwrap_or(0) - s["started_ms"].as_i64().unwrap_or(0);
            println!(
                "{} ({:.1}s)",
                s["verdict"].as_str().unwrap_or(phase),
                took as f64 / 1000.0
            );
            return Ok(ExitCode::from(code));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
