//! The CLI's client for the admin API: one HTTP/1.1 request per call, JSON in and out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the admin API is and how to authenticate, shared by every client subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, env = "SAFELB_ADMIN", default_value = "http://127.0.0.1:9090", global = true)]
    admin: String,
    /// File holding the admin token (SAFELB_TOKEN, if set, wins).
    #[arg(
        long,
        env = "SAFELB_TOKEN_FILE",
        default_value = "safelb-data/admin.token",
        global = true
    )]
    token_file: PathBuf,
    /// PEM certificate(s) to trust for an `https://` admin API (its own, or its CA's).
    #[arg(long, env = "SAFELB_ADMIN_CA", global = true)]
    ca_file: Option<PathBuf>,
}

pub struct AdminClient {
    addr: SocketAddr,
    authority: String,
    token: Option<String>,
    /// For `https://`: the connector and the name the certificate must carry.
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> anyhow::Result<AdminClient> {
        let (https, rest) = match (args.admin.strip_prefix("http://"), args.admin.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => bail!("--admin must be an http:// or https:// URL, got `{}`", args.admin),
        };
        let authority = rest.trim_end_matches('/').to_string();
        let addr: SocketAddr = authority
            .replace("localhost", "127.0.0.1")
            .parse()
            .with_context(|| format!("--admin `{}` must be http(s)://IP:port or localhost:port", args.admin))?;
        let tls = if https {
            let host = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Some((
                connector(args.ca_file.as_deref())?,
                rustls::pki_types::ServerName::try_from(host.to_string())?,
            ))
        } else {
            None
        };
        let token = match std::env::var("SAFELB_TOKEN") {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => std::fs::read_to_string(&args.token_file)
                .ok()
                .map(|t| t.trim().to_string()),
        };
        Ok(AdminClient {
            addr,
            authority,
            token,
            tls,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        self.call("POST", path, Some(body)).await
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Reply> {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(self.addr).await.with_context(|| {
                format!(
                    "cannot reach the admin API at {} (is `safelb serve` running?)",
                    self.addr
                )
            })?;
            let mut sender = match &self.tls {
                None => handshake(stream).await?,
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), stream)
                        .await
                        .with_context(|| format!("TLS with the admin API at {}", self.addr))?;
                    handshake(tls).await?
                }
            };
            let mut req = http::Request::builder()
                .method(method)
                .uri(format!("/api/v1{path}"))
                .header(http::header::HOST, &self.authority)
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
            let resp = sender.send_request(req.body(Full::new(payload))?).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            anyhow::Ok(Reply { status, body })
        };
        let reply = tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .map_err(|_| anyhow!("the admin API did not answer within 60 s"))??;
        match reply.status {
            401 => bail!(
                "the admin API wants a token: {} (use --token-file or SAFELB_TOKEN)",
                message(&reply.body)
            ),
            403 => bail!("the admin API refused the token: {}", message(&reply.body)),
            _ => Ok(reply),
        }
    }
}

/// An HTTP/1.1 connection over `io`, driven in the background.
async fn handshake<T>(io: T) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A TLS client trusting the certificates of `ca_file` (required: an admin API's certificate is
/// most often its own, which no public authority signed).
fn connector(ca_file: Option<&std::path::Path>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let path = ca_file.ok_or_else(|| {
        anyhow!("an https:// admin API needs --ca-file (or SAFELB_ADMIN_CA): the PEM certificate to trust")
    })?;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&pem, path)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable certificate", path.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(safelb_proxy::tls::crypto()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)))
}

fn pem_certs(pem: &[u8], path: &std::path::Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// The `error` text of a JSON error body.
pub fn message(body: &Value) -> String {
    body.get("error")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_string)
}

/// Runs a client future on a small runtime of its own.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?
        .block_on(f)
}
