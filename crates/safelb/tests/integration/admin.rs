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

/// An admin answer given before the request body is read (415: a body without a JSON content
/// type) reaches the client while it is still sending megabytes: the admin listener closes
/// lingering, reading what is left, rather than resetting the connection over unread bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_read_reaches_a_client_still_sending() {
    use crate::change_control::{addrs, backends, Deployment};
    let b = backends(1).await;
    let d = Deployment::start_with(&addrs(&b), "", "").await;
    let token = std::fs::read_to_string(d.dir.join("store/admin.token")).unwrap();
    let body = Bytes::from(vec![b'x'; 4 << 20]);
    for i in 0..20 {
        let req = http::Request::post("/api/v1/plan")
            .header("host", "admin")
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(http_body_util::Full::new(body.clone()))
            .unwrap();
        let reply = crate::common::Client::connect(d.admin())
            .await
            .send(req)
            .await
            .unwrap_or_else(|e| panic!("attempt {i}: no answer: {e}"));
        assert_eq!(reply.status, 415, "attempt {i}: {}", reply.body);
    }
}

/// The admin API's JSON bodies, mangled: 400 seeded variants of valid `apply`, `plan`,
/// `rollback` and `drain` calls (fields of the wrong type, cut short, deeply nested, not UTF-8,
/// a megabyte of junk, no content type). Each gets a 4xx with a JSON `error`, none a 5xx or a
/// success, and afterwards the history and the running version are what they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_admin_bodies_get_a_clear_4xx_and_change_nothing() {
    use crate::change_control::{addrs, backends, Deployment};
    let b = backends(1).await;
    let d = Deployment::start_with(&addrs(&b), "", "").await;
    let token = std::fs::read_to_string(d.dir.join("store/admin.token")).unwrap();
    let before = crate::common::admin_call(d.admin(), &token, "GET", "/versions", None)
        .await
        .unwrap()
        .1;
    let valid_source = std::fs::read_to_string(d.dir.join("safelb.toml")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut by_status = std::collections::BTreeMap::<u16, u32>::new();
    for i in 0..400u64 {
        let pick = next();
        let (path, valid): (&str, Value) = match pick % 4 {
            // A valid config with a reason would be a real change: the reason is always empty
            // or of the wrong type here, so every variant must be refused.
            0 => ("/apply", json!({ "source": valid_source, "reason": "" })),
            1 => ("/plan", json!({ "source": valid_source, "confirm": "yes" })),
            2 => ("/rollback", json!({ "to": 1, "reason": 7 })),
            _ => ("/backends/not-an-address/drain", json!({})),
        };
        let text = valid.to_string();
        let mut body: Vec<u8> = match (pick >> 8) % 7 {
            0 => text.as_bytes()[..(next() as usize % text.len())].to_vec(),
            1 => text.replace(':', ": [").into_bytes(),
            2 => format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            3 => {
                let mut v = text.into_bytes();
                let at = next() as usize % v.len();
                v.insert(at, 0xff);
                v
            }
            4 => json!({ "source": "x".repeat(1 << 20), "reason": null })
                .to_string()
                .into_bytes(),
            5 => text.replace("\"source\"", "\"source\": 1, \"dup\"").into_bytes(),
            _ => (0..(next() % 200)).map(|_| next() as u8).collect(),
        };
        let typed = (pick >> 16) % 5 != 0;
        if body.is_empty() {
            body.push(b'{');
        }
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("/api/v1{path}"))
            .header("host", "admin")
            .header("authorization", format!("Bearer {}", token.trim()));
        if typed {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(http_body_util::Full::new(Bytes::from(body))).unwrap();
        let reply = crate::common::Client::connect(d.admin())
            .await
            .send(req)
            .await
            .unwrap_or_else(|e| panic!("variant {i} ({path}): no answer: {e}"));
        *by_status.entry(reply.status).or_default() += 1;
        let said: String = reply.body.chars().take(300).collect();
        // A plan of a well-formed body whose source is not a config is an answer, not an error:
        // 200 with `valid: false` and the diagnostics (their snippets bounded in size).
        let plan_of_junk = path == "/plan"
            && reply.status == 200
            && serde_json::from_str::<Value>(&reply.body)
                .is_ok_and(|v| v["valid"] == false && v["rendered"].as_str().is_some_and(|r| r.len() < 20_000));
        assert!(
            (400..500).contains(&reply.status) || plan_of_junk,
            "variant {i} ({path}) got {} ({} bytes): {said}",
            reply.status,
            reply.body.len()
        );
        assert!(!reply.body.is_empty(), "variant {i}: a 4xx says why");
    }
    eprintln!("400 mangled admin bodies: answers by status {by_status:?}");
    let after = crate::common::admin_call(d.admin(), &token, "GET", "/versions", None)
        .await
        .unwrap()
        .1;
    assert_eq!(before, after, "the history changed");
    let st = crate::common::admin_call(d.admin(), &token, "GET", "/status", None)
        .await
        .unwrap()
        .1;
    assert_eq!(st["running"]["id"], 1);
    assert!(st["rollout"].is_null(), "{st}");
}
