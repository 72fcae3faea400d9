//! The admin API's access control on a real `safelb serve` over HTTPS: named tokens with roles,
//! the token's name as the author of every change, and failed authentications limited per
//! address and counted.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use safelb_testkit::TestBackend;
use serde_json::{json, Value};

use crate::lifecycle::{free_port, spawn_serve, tempdir, wait_for_log};
use crate::tls::{certificate, connect, write, Sender};

const OPS: &str = "0p5-0p5-0p5-0p5-0p5-0p5";
const VIEWER: &str = "v1ewer-v1ewer-v1ewer-v1";

async fn call(sender: &mut Sender, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value, String) {
    sender.ready().await.expect("the admin connection is open");
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("/api/v1{path}"))
        .header("host", "localhost")
        .header("content-type", "application/json");
    if !token.is_empty() {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map_or(Bytes::new(), |b| Bytes::from(b.to_string()));
    let resp = sender.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tokens_have_roles_author_changes_and_guessing_is_limited() {
    let backend = TestBackend::start("b").await;
    let dir = tempdir();
    let (cert, key, der) = certificate("localhost");
    write(&dir, "admin.pem", &cert);
    write(&dir, "admin.key", &key);
    write(
        &dir,
        "tokens",
        &format!("# name role secret\nops operate {OPS}\nviewer read {VIEWER}\n"),
    );
    let (port, admin_port) = (free_port(), free_port());
    let d = dir.display();
    let config = format!(
        "[listener.public]\nbind = \"127.0.0.1:{port}\"\n[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntokens_file = \"{d}/tokens\"\ntls = {{ cert = \"{d}/admin.pem\", key = \"{d}/admin.key\" }}\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"{}\"]\n",
        backend.addr
    );
    std::fs::write(dir.join("safelb.toml"), &config).unwrap();
    let mut serve = spawn_serve(&dir.join("safelb.toml"));
    wait_for_log(&mut serve, "admin API listening", Duration::from_secs(20));
    let (mut admin, _) = connect(admin_port, "localhost", &[der])
        .await
        .expect("the admin API speaks TLS");

    // Plain HTTP on the TLS port gets no answer.
    let plain = crate::common::raw(
        format!("127.0.0.1:{admin_port}").parse().unwrap(),
        b"GET /api/v1/status HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");

    let (status, st, _) = call(&mut admin, "GET", "/status", VIEWER, None).await;
    assert_eq!(status, 200, "{st}");
    let candidate = config.replace("[pool.p]", "[pool.p]\nhedge = false");
    let plan = json!({ "source": candidate });
    assert_eq!(
        call(&mut admin, "POST", "/plan", VIEWER, Some(plan)).await.0,
        200,
        "a plan changes nothing: read may"
    );
    let apply = json!({ "source": candidate, "reason": "turn hedging off", "author": "ana" });
    let (status, body, _) = call(&mut admin, "POST", "/apply", VIEWER, Some(apply.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("token `viewer` has role `read`"),
        "{body}"
    );
    let (status, body, _) = call(&mut admin, "POST", "/apply", OPS, Some(apply)).await;
    assert_eq!(status, 202, "{body}");
    let (_, versions, _) = call(&mut admin, "GET", "/versions", VIEWER, None).await;
    let newest = &versions.as_array().unwrap()[0];
    assert_eq!(newest["author"], "ops (ana)", "{newest}");
    let (_, body, _) = call(
        &mut admin,
        "POST",
        "/rollback",
        OPS,
        Some(json!({ "reason": "enough" })),
    )
    .await;
    assert!(body["aborted_rollout"].is_u64(), "{body}");

    // The CLI over HTTPS, trusting the admin API's own certificate.
    let cli = |token: &str, args: &[&str]| {
        let out = std::process::Command::new(crate::common::safelb_bin())
            .args(args)
            .args(["--admin", &format!("https://localhost:{admin_port}")])
            .arg("--ca-file")
            .arg(dir.join("admin.pem"))
            .env("SAFELB_TOKEN", token)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = cli(VIEWER, &["history"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ops (ana)"), "{text}");
    let (code, text) = cli(VIEWER, &["rollback", "-m", "not allowed"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("has role `read`"), "{text}");

    // Ten wrong or missing tokens from this address, then even the right one waits.
    for i in 0..10 {
        let token = if i % 2 == 0 { "wrong-wrong-wrong-wrong" } else { "" };
        let (status, _, _) = call(&mut admin, "GET", "/status", token, None).await;
        assert!(status == 401 || status == 403, "attempt {i}: {status}");
    }
    let (status, body, retry) = call(&mut admin, "GET", "/status", OPS, None).await;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = retry.parse().expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    // /metrics needs no token and counts both.
    admin.ready().await.unwrap();
    let req = http::Request::get("/metrics")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let metrics = admin
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let metrics = String::from_utf8_lossy(&metrics);
    let sample = |result: &str| -> f64 {
        let line = format!("safelb_admin_auth_failures_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(sample("failed"), 10.0);
    assert_eq!(sample("limited"), 1.0);
}
