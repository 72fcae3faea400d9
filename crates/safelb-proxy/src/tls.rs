//! TLS termination with rustls: certificates chosen by SNI, reloaded without a restart.
//!
//! A listener's [`CertResolver`] holds the loaded certificates behind an `ArcSwap`; the rustls
//! config is built once around it, so a reload is one pointer store and handshakes in progress
//! keep the certificate they started with. A reload that fails (unreadable file, bad PEM, a key
//! that does not match its certificate, a name the certificate does not cover) is refused with a
//! log line naming the file, and the certificates already loaded keep serving.
//!
//! Defaults: TLS 1.2 and 1.3 only, the provider's default cipher suites (AEAD only, no CBC, no
//! RSA key exchange) in the server's order, ALPN `h2` then `http/1.1`. The provider is aws-lc-rs
//! ([`crypto`]), for every TLS safelb speaks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use safelb_config::TlsCert;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

struct Loaded {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

pub struct CertResolver {
    listener: String,
    specs: Vec<TlsCert>,
    current: ArcSwap<Loaded>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("listener", &self.listener)
            .field("certs", &self.specs.len())
            .finish()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.current.load();
        let by_name = hello
            .server_name()
            .and_then(|n| loaded.by_name.get(&n.to_ascii_lowercase()));
        Some(by_name.unwrap_or(&loaded.default).clone())
    }
}

fn load_one(spec: &TlsCert) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&spec.cert)
        .map_err(|e| format!("{}: {e}", spec.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", spec.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", spec.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&spec.key).map_err(|e| format!("{}: {e}", spec.key.display()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: {e}", spec.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} does not belong to {}: {e}", spec.key.display(), spec.cert.display()))?;
    // rustls checks that the certificate covers each name.
    let mut check = ResolvesServerCertUsingSni::new();
    for name in &spec.names {
        check
            .add(name, certified.clone())
            .map_err(|e| format!("{} is not valid for `{name}`: {e}", spec.cert.display()))?;
    }
    Ok(Arc::new(certified))
}

fn load_all(specs: &[TlsCert]) -> Result<Loaded, String> {
    let mut by_name = HashMap::new();
    let mut default = None;
    for spec in specs {
        let ck = load_one(spec)?;
        for name in &spec.names {
            by_name.entry(name.clone()).or_insert_with(|| ck.clone());
        }
        default.get_or_insert(ck);
    }
    Ok(Loaded {
        by_name,
        default: default.ok_or("no certificate configured")?,
    })
}

fn stamps(specs: &[TlsCert]) -> Vec<Option<SystemTime>> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    specs.iter().flat_map(|s| [mtime(&s.cert), mtime(&s.key)]).collect()
}

impl CertResolver {
    /// Loads every certificate of a listener; an error names the file and what is wrong.
    pub fn load(listener: &str, specs: &[TlsCert]) -> Result<Arc<CertResolver>, String> {
        let loaded = load_all(specs).map_err(|e| format!("listener `{listener}`: {e}"))?;
        Ok(Arc::new(CertResolver {
            listener: listener.to_owned(),
            specs: specs.to_vec(),
            current: ArcSwap::from_pointee(loaded),
            stamps: Mutex::new(stamps(specs)),
        }))
    }

    /// Re-reads the files. On success the new certificates serve the next handshakes; on error
    /// nothing changes and the error is returned (and logged).
    pub fn reload(&self) -> Result<(), String> {
        *self.stamps.lock().expect("stamps lock") = stamps(&self.specs);
        match load_all(&self.specs) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                tracing::info!(listener = %self.listener, "TLS certificates reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(listener = %self.listener, error = %e, "new TLS certificate refused; the previous one keeps serving");
                Err(e)
            }
        }
    }

    /// Reloads when a certificate or key file changed since the last (attempted) load.
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.specs);
        let changed = *self.stamps.lock().expect("stamps lock") != now;
        if changed {
            let _ = self.reload();
        }
    }

    /// Polls the files every `every` until `cancel`.
    pub fn watch(self: &Arc<Self>, every: Duration, cancel: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    // File metadata and reads block: on the blocking pool, never on a worker
                    // that serves requests.
                    _ = tokio::time::sleep(every) => {
                        let me = me.clone();
                        let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
                    }
                }
            }
        });
    }

    /// The acceptor for this listener: TLS 1.2+, ALPN h2 and http/1.1.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        self.acceptor_for(&[b"h2", b"http/1.1"])
    }

    /// An acceptor offering only the `alpn` protocols (the admin API speaks HTTP/1.1 only).
    pub fn acceptor_for(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<TlsAcceptor, String> {
        let mut provider = crypto();
        // SHA-256 suites first (see `by_cost`), in the server's order.
        provider.cipher_suites.sort_by_key(by_cost);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.ignore_client_order = true;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The cryptography behind every TLS connection safelb makes or accepts (listeners, the admin
/// API, the CLI's client) and its secrets (tokens, session ids): aws-lc-rs, rustls's own default
/// provider. Beside *ring* it also offers the hybrid post-quantum key exchange X25519MLKEM768 to
/// clients that ask for it; measured against *ring* (docs/performance.md) a full TLS 1.3 handshake
/// costs about 3% less CPU and throughput is the same.
pub fn crypto() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// The server's preference among the provider's cipher suites: AES-128-GCM, then
/// ChaCha20-Poly1305, then AES-256-GCM, each protocol version apart (a stable sort keeps TLS 1.3
/// before 1.2). All three are AEADs with no known weakness; AES-128 runs 10 rounds against
/// AES-256's 14 and SHA-256 costs less than SHA-384, so the cheapest suite the client offers wins.
fn by_cost(suite: &rustls::SupportedCipherSuite) -> (bool, u8) {
    use rustls::CipherSuite::*;
    let rank = match suite.suite() {
        TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        TLS13_CHACHA20_POLY1305_SHA256
        | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    };
    (suite.tls13().is_none(), rank)
}
