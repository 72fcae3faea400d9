//! `safelb incidents` and `safelb postmortem ID [--format md|json]`.

use std::process::ExitCode;

use crate::client::{block_on, message, AdminArgs, AdminClient};

#[derive(clap::Args, Debug)]
pub struct IncidentsArgs {
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args, Debug)]
pub struct PostmortemArgs {
    id: u64,
    #[arg(long, value_parser = ["md", "json"], default_value = "md")]
    format: String,
    #[command(flatten)]
    admin: AdminArgs,
}

pub fn list(args: IncidentsArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let r = client.get(&format!("/incidents?limit={}", args.limit)).await?;
        if r.status != 200 {
            anyhow::bail!("{}", message(&r.body));
        }
        println!("{:>4}  {:<24} {:<10} title", "id", "opened (UTC)", "duration");
        for i in r.body.as_array().into_iter().flatten() {
            let opened = i["opened_ms"].as_i64().unwrap_or(0);
            let duration = match i["resolved_ms"].as_i64() {
                Some(end) => format!("{:.0}s", (end - opened) as f64 / 1000.0),
                None => "OPEN".into(),
            };
            println!(
                "{:>4}  {:<24} {:<10} {}",
                i["id"],
                safelb_proxy::clock::rfc3339(opened / 1000, 0),
                duration,
                i["title"].as_str().unwrap_or("")
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn postmortem(args: PostmortemArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let client = AdminClient::new(&args.admin)?;
        let r = client
            .get(&format!("/incidents/{}/postmortem?format={}", args.id, args.format))
            .await?;
        if r.status != 200 {
            eprintln!("{}", message(&r.body));
            return Ok(ExitCode::from(1));
        }
        match &r.body {
            serde_json::Value::String(md) => print!("{md}"),
            json => println!("{}", serde_json::to_string_pretty(json)?),
        }
        Ok(ExitCode::SUCCESS)
    })
}
