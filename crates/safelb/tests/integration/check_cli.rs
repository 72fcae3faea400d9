//! `safelb check` as a user runs it: exit codes, located messages, JSON, and every example
//! config in `examples/` (so the docs cannot rot).

use std::process::Command;

use crate::common::safelb_bin;
use crate::lifecycle::tempdir;

fn check(source: &str, json: bool) -> (i32, String, String) {
    let dir = tempdir();
    let file = dir.join("safelb.toml");
    std::fs::write(&file, source).unwrap();
    let mut cmd = Command::new(safelb_bin());
    cmd.arg("check").arg(&file);
    if json {
        cmd.args(["--format", "json"]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = "[listener.public]\nbind = \"127.0.0.1:8080\"\n[pool.api]\nbackends = [\"127.0.0.1:9001\"]\n[[route]]\nname = \"api\"\npath_prefix = \"/api\"\npool = \"api\"\n";

#[test]
fn valid_config_exits_0() {
    let (code, stdout, _) = check(VALID, false);
    assert_eq!(code, 0);
    assert!(stdout.contains("valid"), "{stdout}");
}

#[test]
fn failing_route_test_exits_1_with_location() {
    let src = format!("{VALID}[[test]]\nrequest = \"GET http://shop.example/web\"\nexpect_pool = \"api\"\n");
    let (code, _, stderr) = check(&src, false);
    assert_eq!(code, 1);
    assert!(stderr.contains("error[test-failed]: route test failed: GET http://shop.example/web expected pool `api`, got no route (404)"), "{stderr}");
    assert!(stderr.contains("safelb.toml:10:11"), "{stderr}");
}

#[test]
fn json_format_lists_every_diagnostic() {
    let src = VALID
        .replace("backends = [", "balanse = 1\nbackends = [")
        .replace("pool = \"api\"\n", "pool = \"apj\"\n");
    let (code, stdout, _) = check(&src, true);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(v["valid"], false);
    let rules: Vec<&str> = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, vec!["unknown-key", "undefined-pool"]);
    assert_eq!(v["diagnostics"][0]["line"], 4);
    assert_eq!(v["diagnostics"][0]["hint"], "did you mean `balance`?");
}

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(safelb_bin()).arg("check").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1);
}
