//! The access log: one JSON line per request, written off the request path.
//!
//! Request tasks format their line and hand it to a bounded channel; one writer thread owns
//! the output and flushes whenever the channel runs dry. When the writer cannot keep up, lines
//! are dropped and counted rather than slowing down traffic.

use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use serde::Serialize;

use crate::clock::rfc3339_now;

const QUEUE: usize = 64 * 1024;
/// How long a line may wait in the queue before it is written.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Clone, Default)]
pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    dropped: Arc<AtomicU64>,
}

/// One request as logged. Fields that do not apply are omitted.
#[derive(Serialize)]
pub struct LogEntry<'a> {
    pub time: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub request_id: &'a str,
    pub client: SocketAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'a str>,
    pub status: u16,
    pub bytes_sent: u64,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// False when the response body did not reach its end (client or backend went away).
    pub complete: bool,
    pub config_version: u64,
    /// Served by the stable version after failing on the candidate of a rollout.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fell_back: bool,
}

impl<'a> LogEntry<'a> {
    /// A request the HTTP parser rejected before it became a request.
    pub fn parser_error(client: SocketAddr, status: u16, error: &'a str, bytes_sent: u64, config_version: u64) -> Self {
        LogEntry {
            time: rfc3339_now(),
            request_id: "",
            client,
            method: "",
            host: "",
            path: "",
            route: None,
            pool: None,
            backend: None,
            status,
            bytes_sent,
            duration_ms: 0.0,
            upstream_ms: None,
            retries: 0,
            error: Some(error),
            complete: true,
            config_version,
            fell_back: false,
        }
    }
}

impl AccessLog {
    pub fn disabled() -> Self {
        AccessLog::default()
    }

    pub fn stdout() -> Self {
        Self::spawn(Box::new(io::stdout()))
    }

    pub fn file(path: &Path) -> io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::spawn(Box::new(f)))
    }

    fn spawn(out: Box<dyn Write + Send>) -> Self {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        // The thread ends when the last AccessLog clone (and so the sender) is dropped.
        std::thread::Builder::new()
            .name("safelb-access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(64 * 1024, out);
                // Drain in batches with a short sleep between them instead of blocking on the
                // channel: a blocked receiver costs every request a futex wake-up; this costs a
                // line at most FLUSH_EVERY of delay.
                loop {
                    let mut wrote = false;
                    loop {
                        match rx.try_recv() {
                            Ok(line) => {
                                let _ = out.write_all(line.as_bytes());
                                wrote = true;
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                                let _ = out.flush();
                                return;
                            }
                        }
                    }
                    if wrote {
                        let _ = out.flush();
                    }
                    std::thread::sleep(FLUSH_EVERY);
                }
            })
            .expect("spawning the access-log thread");
        AccessLog {
            tx: Some(tx),
            dropped: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, entry: &LogEntry<'_>) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_string(entry) else {
            return;
        };
        line.push('\n');
        if let Err(TrySendError::Full(_)) = tx.try_send(line) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Lines dropped because the writer fell behind: the counter every clone shares.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}
