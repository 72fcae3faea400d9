//! TLS termination on a real `safelb serve`: certificates by SNI, h2 by ALPN (curl), rotation
//! under load without a failed request, a bad new certificate refused while the old one serves.
//! Certificates are generated at run time (rcgen).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use safelb_testkit::TestBackend;

use crate::lifecycle::{free_port, spawn_serve, tempdir, wait_for_log, Process};

/// A self-signed certificate for `name`: (cert PEM, key PEM, cert DER).
pub(crate) fn certificate(name: &str) -> (String, String, Vec<u8>) {
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (cert.pem(), key_pair.serialize_pem(), cert.der().to_vec())
}

pub(crate) fn write(dir: &Path, file: &str, text: &str) {
    // Write then rename, as deployment tools do, so a reload never sees half a file.
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

struct TlsSite {
    dir: std::path::PathBuf,
    port: u16,
    roots: Vec<Vec<u8>>,
    process: Process,
}

async fn start(backend: &TestBackend) -> TlsSite {
    let dir = tempdir();
    let (a_cert, a_key, a_der) = certificate("a.example");
    let (b_cert, b_key, b_der) = certificate("b.example");
    write(&dir, "a.pem", &a_cert);
    write(&dir, "a.key", &a_key);
    write(&dir, "b.pem", &b_cert);
    write(&dir, "b.key", &b_key);
    let port = free_port();
    let d = dir.display();
    std::fs::write(
        dir.join("safelb.toml"),
        format!(
            "[listener.secure]\nbind = \"127.0.0.1:{port}\"\ntls = [{{ cert = \"{d}/a.pem\", key = \"{d}/a.key\", names = [\"a.example\"] }}, {{ cert = \"{d}/b.pem\", key = \"{d}/b.key\", names = [\"b.example\"] }}]\n[admin]\nbind = \"127.0.0.1:{}\"\n[access_log]\nenabled = false\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"{}\"]\n",
            free_port(),
            backend.addr
        ),
    )
    .unwrap();
    let mut process = spawn_serve(&dir.join("safelb.toml"));
    wait_for_log(&mut process, "admin API listening", Duration::from_secs(10));
    TlsSite {
        dir,
        port,
        roots: vec![a_der, b_der],
        process,
    }
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A TLS connection with SNI `name`, trusting `roots`; returns the sender and the server's leaf.
pub(crate) async fn connect(port: u16, name: &str, roots: &[Vec<u8>]) -> Result<(Sender, Vec<u8>), String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(CertificateDer::from(r.clone())).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(safelb_proxy::tls::crypto()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, leaf))
}

async fn get(sender: &mut Sender, host: &str, path: &str) -> Result<(u16, String), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_gives_h2() {
    let be = TestBackend::start("be").await;
    let site = start(&be).await;
    let (mut a, a_leaf) = connect(site.port, "a.example", &site.roots).await.unwrap();
    assert_eq!(a_leaf, site.roots[0], "a.example gets its own certificate");
    let (status, seen) = get(&mut a, "a.example", "/headers").await.unwrap();
    assert_eq!(status, 200);
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    let (_, b_leaf) = connect(site.port, "b.example", &site.roots).await.unwrap();
    assert_eq!(b_leaf, site.roots[1], "b.example gets its own certificate");
    // An unknown name gets the first (default) certificate, which the client rejects as a mismatch.
    assert!(connect(site.port, "c.example", &site.roots).await.is_err());

    let port = site.port;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sk",
                "--http2",
                "--resolve",
                &format!("a.example:{port}:127.0.0.1"),
                "-w",
                "\n%{http_version}",
            ])
            .arg(format!("https://a.example:{port}/"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n2"), "curl over TLS negotiated h2: {text}");
    assert!(text.starts_with("backend be"), "{text}");
}

/// curl over TLS to `a.example` with `args`; what it printed (body, then the HTTP version).
async fn curl(port: u16, args: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sk",
        "--resolve",
        &format!("a.example:{port}:127.0.0.1"),
        "-w",
        "\n%{http_version}",
    ])
    .args(args)
    .arg(format!("https://a.example:{port}/"));
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_alpn_http1_and_h2_are_both_served_and_the_server_picks_the_suite() {
    let be = TestBackend::start("be").await;
    let site = start(&be).await;
    // rustls offers AES-256-GCM first; the server's order puts AES-128-GCM first.
    let mut store = rustls::RootCertStore::empty();
    store.add(CertificateDer::from(site.roots[0].clone())).unwrap();
    let provider = safelb_proxy::tls::crypto();
    assert_eq!(
        provider.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", site.port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("a.example").unwrap(), tcp)
        .await
        .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    drop(tls);

    // No ALPN: HTTP/1.1 requests, several on one connection, and an h2 client that starts with
    // the preface without asking (safelb's own HTTP/1 loop declines it, hyper serves h2).
    let h1 = curl(site.port, &["--no-alpn", "-o", "/dev/null"]).await;
    assert_eq!(h1.trim(), "1.1", "{h1}");
    let (mut a, _) = connect(site.port, "a.example", &site.roots).await.unwrap();
    for _ in 0..3 {
        let (status, body) = get(&mut a, "a.example", "/").await.unwrap();
        assert_eq!((status, body.starts_with("backend be")), (200, true), "{body}");
    }
    let h2 = curl(site.port, &["--no-alpn", "--http2-prior-knowledge"]).await;
    assert!(h2.starts_with("backend be") && h2.ends_with("\n2"), "{h2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_and_a_bad_one_is_refused() {
    let be = TestBackend::start("be").await;
    let mut site = start(&be).await;
    let (new_cert, new_key, new_der) = certificate("a.example");
    let mut roots = site.roots.clone();
    roots.push(new_der.clone());

    let port = site.port;
    let load_roots = roots.clone();
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // New connections keep handshaking while the certificate changes.
            match connect(port, "a.example", &load_roots).await {
                Ok((mut s, _)) => {
                    for _ in 0..20 {
                        match get(&mut s, "a.example", "/").await {
                            Ok((200, _)) => ok += 1,
                            _ => failed += 1,
                        }
                    }
                }
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    write(&site.dir, "a.key", &new_key);
    write(&site.dir, "a.pem", &new_cert);
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (_, leaf) = connect(site.port, "a.example", &roots).await.unwrap();
        if leaf == new_der {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, failed) = load.await.unwrap();
    println!("certificate rotation under load: {ok} requests, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 100);

    // A broken certificate file: refused with a log line, the rotated one keeps serving.
    write(
        &site.dir,
        "a.pem",
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    );
    crate::lifecycle::signal(&site.process, 1);
    wait_for_log(
        &mut site.process,
        "new TLS certificate refused",
        Duration::from_secs(10),
    );
    let (mut s, leaf) = connect(site.port, "a.example", &roots).await.unwrap();
    assert_eq!(leaf, new_der);
    assert_eq!(get(&mut s, "a.example", "/").await.unwrap().0, 200);
}
