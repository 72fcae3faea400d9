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
/// without a reload, the cookie unreadable by scripts, the token in no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let good = backends(2).await;
    let d = Deployment::start_with(&addrs(&good), "", "").await;
    let load = crate::common::SteadyLoad::start(d.addr(), 2);
    let token = std::fs::read_to_string(d.dir.join("store/admin.token")).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shots = root.join("target/browser-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = root.join("tests/browser/dashboard.mjs");
    let admin = format!("http://{}", d.admin());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("90")
            .arg("node")
            .arg(&script)
            .env("SAFELB_ADMIN", admin)
            .env("SAFELB_TOKEN", token.trim())
            .env("SCREENSHOTS", &shots)
            .output()
            .expect("node is installed by scripts/install-test-deps")
    })
    .await
    .unwrap();
    let report = load.finish().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("browser: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(result["drained"], true);
    for shot in result["screenshots"].as_array().unwrap() {
        let path = shot.as_str().unwrap();
        assert!(std::fs::metadata(path).unwrap().len() > 1000, "{path}");
    }
    assert!(result["first_load_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report.failed(), 0, "{report:?}");
}
