//! `safelb check FILE`: offline validation with every finding located.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use super::Format;

pub fn run(file: &Path, format: Format) -> anyhow::Result<ExitCode> {
    let source = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let checked = safelb_config::check(&file.display().to_string(), &source);
    let valid = checked.config.is_some();
    match format {
        Format::Json => {
            let out = serde_json::json!({
                "file": file.display().to_string(),
                "valid": valid,
                "diagnostics": checked.diagnostics.located(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => {
            if !checked.diagnostics.is_empty() {
                eprint!("{}", checked.diagnostics.render());
            }
            if let Some(config) = &checked.config {
                println!(
                    "{}: valid ({} listener(s), {} route(s), {} pool(s), {} route test(s) passed)",
                    file.display(),
                    config.listeners.len(),
                    config.routes.len(),
                    config.pools.len(),
                    config.tests.len()
                );
            }
        }
    }
    Ok(if valid { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
