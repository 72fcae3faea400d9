//! Alert notifications: Alertmanager's v2 API and a generic JSON webhook.
//!
//! The evaluator hands notices to a bounded queue and moves on; one task sends them, retrying
//! with back-off. A full queue drops the notice (counted and logged): a slow receiver must never
//! slow down alert evaluation, let alone traffic. Firing alerts are re-sent every minute, as
//! Alertmanager expects from a client, so they stay active there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use safelb_config::{Notify, NotifyKind};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 4;
const RESEND_FIRING: Duration = Duration::from_secs(60);

/// One alert transition to tell the world about.
#[derive(Clone, Debug)]
pub struct Notice {
    pub alert: String,
    pub firing: bool,
    pub severity: String,
    pub labels: Vec<(String, String)>,
    pub summary: String,
    pub starts_at: String,
    /// Set when resolved.
    pub ends_at: Option<String>,
}

#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<(Vec<Notify>, Notice)>,
}

impl Notifier {
    /// Starts the sending task; it ends when every `Notifier` clone is dropped.
    pub fn start() -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx));
        Notifier { tx }
    }

    pub fn send(&self, targets: &[Notify], notice: Notice) {
        if targets.is_empty() {
            return;
        }
        if self.tx.try_send((targets.to_vec(), notice)).is_err() {
            tracing::warn!("alert notification queue full: notice dropped");
        }
    }
}

async fn run(mut rx: mpsc::Receiver<(Vec<Notify>, Notice)>) {
    let mut firing: BTreeMap<String, (Vec<Notify>, Notice)> = BTreeMap::new();
    let mut resend = tokio::time::interval(RESEND_FIRING);
    resend.tick().await;
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some((targets, notice)) = next else { break };
                if notice.firing {
                    firing.insert(notice.alert.clone(), (targets.clone(), notice.clone()));
                } else {
                    firing.remove(&notice.alert);
                }
                deliver(&targets, &notice).await;
            }
            _ = resend.tick() => {
                for (targets, notice) in firing.values() {
                    deliver(targets, notice).await;
                }
            }
        }
    }
}

async fn deliver(targets: &[Notify], notice: &Notice) {
    for target in targets {
        let (path, body) = match target.kind {
            NotifyKind::Alertmanager => ("/api/v2/alerts", alertmanager_body(notice)),
            NotifyKind::Webhook => ("", webhook_body(notice)),
        };
        let mut delay = Duration::from_millis(250);
        for attempt in 1..=ATTEMPTS {
            match post(target, path, &body).await {
                Ok(()) => break,
                Err(e) if attempt == ATTEMPTS => {
                    tracing::error!(url = %target.url, alert = %notice.alert, error = %e, "alert notification failed; giving up");
                }
                Err(e) => {
                    tracing::warn!(url = %target.url, alert = %notice.alert, attempt, error = %e, "alert notification failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

/// Alertmanager v2 `postableAlerts`: an array of alerts with labels, annotations and times.
pub fn alertmanager_body(n: &Notice) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), json!(n.alert));
    labels.insert("severity".into(), json!(n.severity));
    labels.insert("service".into(), json!("safelb"));
    for (k, v) in &n.labels {
        labels.insert(k.clone(), json!(v));
    }
    let mut alert = json!({
        "labels": labels,
        "annotations": { "summary": n.summary },
        "startsAt": n.starts_at,
    });
    if let Some(end) = &n.ends_at {
        alert["endsAt"] = json!(end);
    }
    json!([alert])
}

pub fn webhook_body(n: &Notice) -> Value {
    json!({
        "alert": n.alert,
        "state": if n.firing { "firing" } else { "resolved" },
        "severity": n.severity,
        "labels": n.labels.iter().cloned().collect::<BTreeMap<String, String>>(),
        "summary": n.summary,
        "starts_at": n.starts_at,
        "ends_at": n.ends_at,
    })
}

async fn post(target: &Notify, path: &str, body: &Value) -> Result<(), String> {
    let rest = target.url.strip_prefix("http://").ok_or("url is not http://")?;
    let (authority, base) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let addr: SocketAddr = authority.parse().map_err(|_| format!("`{authority}` is not IP:port"))?;
    let uri = format!("/{}{}", base.trim_end_matches('/'), path).replace("//", "/");
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = http::Request::post(uri.as_str())
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "status {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&text).trim()
            ))
        }
    };
    tokio::time::timeout(target.timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {:?}", target.timeout))?
}
