//! The dashboard's server side against a real `safelb serve`: login and sessions, the cookie's
//! flags, the cross-site refusal, the security headers, the live stream, and that the token is
//! in no page.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::change_control::{addrs, backends, Deployment};

const QUICK_ROLLOUT: &str = "canary_steps = [10, 50, 100]\nstep_bake = \"1s\"\nmin_requests = 10";

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

async fn send(addr: std::net::SocketAddr, req: http::Request<Full<Bytes>>) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn request(method: &str, path: &str, host: &str, headers: &[(&str, &str)], body: &str) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// A signed-in browser: its session cookie and the admin address it talks to.
struct Session {
    host: String,
    cookie: String,
}

impl Session {
    fn request(&self, method: &str, path: &str, extra: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
        let mut headers = vec![("cookie", self.cookie.as_str())];
        headers.extend_from_slice(extra);
        request(method, path, &self.host, &headers, "")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_reads_writes_same_origin_only_and_streams_live() {
    let good = backends(1).await;
    let d = Deployment::start_with(&addrs(&good), "", "").await;
    let admin = d.admin();
    let host = admin.to_string();
    let origin = format!("http://{host}");
    let token = std::fs::read_to_string(d.dir.join("store/admin.token")).unwrap();
    let token = token.trim();

    // No session: the page sends to the login, the API says 401, the login page has no token.
    let r = send(admin, request("GET", "/", &host, &[], "")).await;
    assert_eq!((r.status, r.headers["location"].to_str().unwrap()), (303, "/login"));
    let r = send(admin, request("GET", "/api/v1/status", &host, &[], "")).await;
    assert_eq!(r.status, 401);
    let login = send(admin, request("GET", "/login", &host, &[], "")).await;
    assert_eq!(login.status, 200);
    let csp = login.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // A wrong token, then a cross-site login form, are refused.
    let form = [
        ("origin", origin.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let r = send(admin, request("POST", "/login", &host, &form, "token=not-the-token")).await;
    assert_eq!(r.status, 401);
    assert!(
        r.body.contains("That is not one of this safelb's admin tokens."),
        "{}",
        r.body
    );
    assert!(!r.body.contains("not-the-token"), "what was typed is not echoed");
    assert!(r.headers.get("set-cookie").is_none());
    let evil = [
        ("origin", "http://evil.example"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let r = send(
        admin,
        request("POST", "/login", &host, &evil, &format!("token={token}")),
    )
    .await;
    assert_eq!(r.status, 403);

    // The right token: a session cookie with the flags, and the page.
    let r = send(
        admin,
        request("POST", "/login", &host, &form, &format!("token={token}")),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let set = r.headers["set-cookie"].to_str().unwrap().to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Max-Age=43200", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP admin: no Secure flag ({set})");
    let cookie = set.split(';').next().unwrap().to_owned();
    assert!(!cookie.contains(token), "the cookie is a session id, not the token");
    let s = Session {
        host: host.clone(),
        cookie: cookie.clone(),
    };
    let call = |method: &str, path: &str, extra: &[(&str, &str)]| s.request(method, path, extra);
    for path in ["/", "/login", "/assets/app.js", "/assets/style.css"] {
        let r = send(admin, call("GET", path, &[])).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(!r.body.contains(token), "the token is in {path}");
    }
    assert_eq!(send(admin, call("GET", "/api/v1/status", &[])).await.status, 200);

    // Writes with the cookie need the dashboard's own Origin.
    let backend = good[0].addr.to_string();
    let drain = format!("/api/v1/backends/{backend}/drain");
    let r = send(admin, call("POST", &drain, &[("origin", "http://evil.example")])).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("cross-site request refused"), "{}", r.body);
    assert_eq!(
        send(admin, call("POST", &drain, &[])).await.status,
        403,
        "no Origin: refused"
    );
    let r = send(admin, call("POST", &drain, &[("origin", &origin)])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let undrain = format!("/api/v1/backends/{backend}/undrain");
    assert_eq!(
        send(admin, call("POST", &undrain, &[("origin", &origin)])).await.status,
        200
    );

    // The live stream sends a stats frame within a couple of seconds.
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(call("GET", "/api/v1/stream", &[])).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut seen = String::new();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
                if seen.contains("event: stats") && seen.contains("\"requests\"") {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "stream said: {seen}");
    let history = send(admin, call("GET", "/api/v1/stats", &[])).await;
    assert!(
        history.body.starts_with('[') && history.body.contains("\"time_ms\""),
        "{}",
        history.body
    );

    // Logout ends the session.
    let r = send(admin, call("POST", "/logout", &[("origin", &origin)])).await;
    assert_eq!(r.status, 303);
    assert!(r.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(send(admin, call("GET", "/api/v1/status", &[])).await.status, 401);
    // The bearer token still works for the CLI.
    let bearer = format!("Bearer {token}");
    let r = send(
        admin,
        request("GET", "/api/v1/status", &host, &[("authorization", &bearer)], ""),
    )
    .await;
    assert_eq!(r.status, 200);
}

/// The dashboard in headless Chromium (tests/browser/dashboard.mjs): sign in, the live stream,
/// every section (screenshots under target/browser-screenshots), a drain and undrain seen
/// without a reload, the cookie unreadable by scripts, the token in no page; then a bad change
/// forced from the CLI shows its rollback and incident live, the postmortem opens, and a
/// rollback from the Changes page changes the running version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    use std::io::{BufRead, Write};
    let good = backends(2).await;
    let d = Deployment::start_with(&addrs(&good), QUICK_ROLLOUT, "").await;
    let load = crate::common::SteadyLoad::start(d.addr(), 2);
    // An alert on rollbacks, applied like any change (held 2 s, so the incident resolves soon).
    let alert = "[[alert]]\nname = \"RolledBack\"\nkind = \"rollback\"\nhold = \"2s\"\n";
    let with_alert = d.write("alert.toml", &addrs(&good), alert);
    let (code, out, err, _) = d
        .cli_async(&["apply", with_alert.to_str().unwrap(), "-m", "alert on rollbacks"])
        .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let token = std::fs::read_to_string(d.dir.join("store/admin.token")).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shots = root.join("target/browser-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut child = std::process::Command::new("timeout")
        .arg("120")
        .arg("node")
        .arg(root.join("tests/browser/dashboard.mjs"))
        .env("SAFELB_ADMIN", format!("http://{}", d.admin()))
        .env("SAFELB_TOKEN", token.trim())
        .env("SCREENSHOTS", &shots)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node is installed by scripts/install-test-deps");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (ready, stdout) = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while stdout.read_line(&mut line).unwrap_or(0) > 0 && line.trim() != "READY" {
            line.clear();
        }
        (line.trim() == "READY", stdout)
    })
    .await
    .unwrap();
    assert!(
        ready,
        "the browser script ended before it was ready: {:?}",
        child.wait()
    );
    let bad = d.write("dead.toml", &[safelb_testkit::closed_port().to_string()], alert);
    let (code, out, err, _) = d.force(&bad, "forced from the CLI while the dashboard watches").await;
    assert_eq!(code, 4, "{out}\n{err}");
    writeln!(stdin, "FORCED").unwrap();
    let output = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        let mut stdout = stdout;
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        (child.wait().unwrap(), rest)
    })
    .await
    .unwrap();
    let report = load.finish().await;
    println!("browser: {}", output.1);
    assert!(
        output.0.success(),
        "the browser test failed ({:?}):\n{}",
        output.0,
        output.1
    );
    let result: serde_json::Value =
        serde_json::from_str(output.1.trim().lines().last().unwrap_or("")).expect("a JSON line");
    assert_eq!(result["drained"], true);
    assert_eq!(result["reloaded"], false);
    for shot in result["screenshots"].as_array().unwrap() {
        let path = shot.as_str().unwrap();
        assert!(std::fs::metadata(path).unwrap().len() > 1000, "{path}");
    }
    assert!(result["first_load_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report.failed(), 0, "{report:?}");
}
