//! `safelb history`, `safelb diff A B`, `safelb status`: read-only views of the change record.

use std::process::ExitCode;

use serde_json::Value;

use crate::client::{block_on, message, AdminArgs, AdminClient};

#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// How many versions, newest first.
    #[arg(long, default_value_t = 30)]
    limit: usize,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    from: u64,
    to: u64,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

pub fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let status = client.get("/status").await?;
        let running = status.body["running"]["id"].as_u64();
        let r = client.get(&format!("/versions?limit={}", args.limit)).await?;
        if r.status != 200 {
            anyhow::bail!("{}", message(&r.body));
        }
        println!(
            "{:>4}  {:<24} {:<12} {:<9} {:<12} reason",
            "ver", "time (UTC)", "fate", "origin", "author"
        );
        for v in r.body.as_array().into_iter().flatten() {
            let id = v["id"].as_u64().unwrap_or(0);
            let time = safelb_proxy::clock::rfc3339(v["created_ms"].as_i64().unwrap_or(0) / 1000, 0);
            let mut flags = String::new();
            if v["skip_preflight"] == Value::Bool(true) {
                flags.push_str(" [preflight skipped]");
            }
            if v["emergency"] == Value::Bool(true) {
                flags.push_str(" [emergency]");
            }
            println!(
                "{}{id:>3}  {:<24} {:<12} {:<9} {:<12} {}{flags}",
                if Some(id) == running { "*" } else { " " },
                time,
                v["fate"].as_str().unwrap_or(""),
                v["origin"].as_str().unwrap_or(""),
                v["author"].as_str().unwrap_or(""),
                v["reason"].as_str().unwrap_or("")
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn diff(args: DiffArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let r = client.get(&format!("/diff?from={}&to={}", args.from, args.to)).await?;
        if r.status != 200 {
            eprintln!("{}", message(&r.body));
            return Ok(ExitCode::from(1));
        }
        let d = r.body["diff"].as_str().unwrap_or("");
        print!("{}", if d.is_empty() { "(no difference)\n" } else { d });
        Ok(ExitCode::SUCCESS)
    })
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let r = client.get("/status").await?;
        if r.status != 200 {
            anyhow::bail!("{}", message(&r.body));
        }
        let s = &r.body;
        if args.json {
            println!("{}", serde_json::to_string_pretty(s)?);
            return Ok(ExitCode::SUCCESS);
        }
        let v = &s["running"];
        println!(
            "running version {} ({}, by {}: {})",
            v["id"],
            v["fate"].as_str().unwrap_or(""),
            v["author"].as_str().unwrap_or(""),
            v["reason"].as_str().unwrap_or("")
        );
        match s["rollout"].as_object() {
            Some(r) => println!(
                "rollout of version {}: {} at {}% ({} requests, {} errors on the candidate)",
                r["id"],
                r["phase"].as_str().unwrap_or(""),
                r["percent"],
                r["candidate"]["requests"],
                r["candidate"]["errors"]
            ),
            None => println!("no rollout in progress"),
        }
        for p in s["pools"].as_array().into_iter().flatten() {
            println!(
                "pool {}{}",
                p["name"].as_str().unwrap_or(""),
                if p["in_panic"] == Value::Bool(true) {
                    " [PANIC]"
                } else {
                    ""
                }
            );
            for b in p["backends"].as_array().into_iter().flatten() {
                let ramp = b["slow_start_percent"]
                    .as_u64()
                    .map_or(String::new(), |p| format!(" slow-start {p}%"));
                println!(
                    "  {:<22} {:<5} {}{}{ramp} in_flight={}",
                    b["addr"].as_str().unwrap_or(""),
                    if b["available"] == Value::Bool(true) {
                        "up"
                    } else {
                        "DOWN"
                    },
                    b["state"].as_str().unwrap_or(""),
                    if b["draining"] == Value::Bool(true) {
                        " draining"
                    } else {
                        ""
                    },
                    b["in_flight"]
                );
            }
        }
        if let Some(f) = s["fleet"].as_object() {
            print_fleet(f);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The fleet section of `safelb status`: one line per instance.
fn print_fleet(f: &serde_json::Map<String, Value>) {
    println!(
        "fleet {} (seen from instance {}): leader {}, running version {}, etcd {}",
        f["cluster"].as_str().unwrap_or(""),
        f["instance"].as_str().unwrap_or(""),
        f["leader"].as_str().unwrap_or("none"),
        f["running"],
        if f["etcd_reachable"] == Value::Bool(true) {
            "reachable"
        } else {
            "UNREACHABLE (serving the running version on its own)"
        }
    );
    if let Some(r) = f["rollout"].as_object().filter(|r| r["finished_ms"].is_null()) {
        println!(
            "  fleet rollout of version {}: {}, stage {} of {}",
            r["version"],
            r["phase"].as_str().unwrap_or(""),
            r["stage"].as_u64().unwrap_or(0) + 1,
            r["stages"].as_array().map_or(0, Vec::len)
        );
    }
    for i in f["instances"].as_array().into_iter().flatten() {
        let candidate = i["candidate"]
            .as_u64()
            .map_or(String::new(), |c| format!(" + version {c} at {}%", i["percent"]));
        let refused = i["refused"][0]
            .as_u64()
            .map_or(String::new(), |v| format!(" REFUSED version {v}"));
        println!(
            "  {:<12}{} serving {}{candidate}{refused}  admin {}  heartbeat {:.1}s ago",
            i["name"].as_str().unwrap_or(""),
            if i["leader"] == Value::Bool(true) { "*" } else { " " },
            i["serving"],
            i["admin"].as_str().unwrap_or(""),
            i["heartbeat_age_ms"].as_i64().unwrap_or(0) as f64 / 1000.0
        );
    }
}
