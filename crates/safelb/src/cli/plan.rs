//! `safelb plan FILE`: what applying FILE would do — validation, the diff against the running
//! version, preflight results and the share of recent traffic that would move. Changes nothing.
//! Exit 0 when it would pass validation and preflight, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Value};

use crate::client::{block_on, message, AdminArgs, AdminClient};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    file: PathBuf,
    /// Evaluate the traffic shift as if --confirm were given to apply.
    #[arg(long)]
    confirm: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let source = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let r = client
            .post(
                "/plan",
                &json!({ "source": source, "file": args.file.display().to_string(), "confirm": args.confirm }),
            )
            .await?;
        if r.status != 200 {
            anyhow::bail!("plan failed ({}): {}", r.status, message(&r.body));
        }
        let p = &r.body;
        if let Some(rendered) = p["rendered"].as_str().filter(|s| !s.is_empty()) {
            eprint!("{rendered}");
        }
        if p["valid"] != Value::Bool(true) {
            println!("plan: {} is not valid; nothing would change", args.file.display());
            return Ok(ExitCode::from(1));
        }
        let diff = p["diff"].as_str().unwrap_or("");
        println!("== change against running version {}", p["running_version"]);
        print!("{}", if diff.is_empty() { "(no difference)\n" } else { diff });
        let impact = &p["impact"];
        println!("== traffic impact ({} recent requests replayed)", impact["samples"]);
        match impact["moves"].as_array().filter(|m| !m.is_empty()) {
            None => println!("  no request would change pool"),
            Some(moves) => {
                for m in moves {
                    println!(
                        "  {:5.1}%  {} -> {}  ({} requests)",
                        m["percent"].as_f64().unwrap_or(0.0),
                        m["from"].as_str().unwrap_or(""),
                        m["to"].as_str().unwrap_or(""),
                        m["requests"]
                    );
                }
            }
        }
        let count = |key: &str| impact[key].as_u64().unwrap_or(0);
        for (key, what) in [
            ("redirected", "would be redirected (new redirect routes)"),
            ("answered", "would be answered by safelb itself (new `respond` routes)"),
            ("rewritten", "would reach their backend with another path"),
            (
                "rate_limited",
                "would have been refused by a `key = \"route\"` rate limit at the recent rate",
            ),
        ] {
            if count(key) > 0 {
                println!("  {} of {} sampled requests {what}", count(key), impact["samples"]);
            }
        }
        for route in impact["rate_limited_unknown"].as_array().into_iter().flatten() {
            println!(
                "  route {route} gets a per-client or per-header rate limit: what it refuses depends on the clients"
            );
        }
        let pre = &p["preflight"];
        println!("== preflight");
        for pool in pre["pools"].as_array().into_iter().flatten() {
            println!(
                "  pool {}: {} of {} healthy (min_healthy {})",
                pool["pool"].as_str().unwrap_or(""),
                pool["healthy"],
                pool["backends"].as_array().map_or(0, Vec::len),
                pool["min_healthy"]
            );
            for b in pool["backends"].as_array().into_iter().flatten() {
                let mark = if b["healthy"] == Value::Bool(true) {
                    "ok  "
                } else {
                    "FAIL"
                };
                println!(
                    "    {mark} {}  {}",
                    b["addr"].as_str().unwrap_or(""),
                    b["detail"].as_str().unwrap_or("")
                );
            }
        }
        for problem in pre["problems"].as_array().into_iter().flatten() {
            println!("  problem: {}", problem.as_str().unwrap_or(""));
        }
        let passed = pre["passed"] == Value::Bool(true);
        println!(
            "plan: {}",
            if passed {
                "would pass preflight and start a canary"
            } else {
                "would be REJECTED at preflight"
            }
        );
        Ok(if passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}
