//! A small client of etcd's v3 JSON gateway: ranges, puts, transactions, leases and watches.
//!
//! JSON with base64 keys and values over plain HTTP/1.1 on blocking sockets: every call already
//! runs on tokio's blocking pool or a thread of its own, and a handful of unary calls plus one
//! streaming watch need no gRPC stack. Several endpoints may be named; a call tries the one that
//! answered last, then the others.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::store::{StoreError, StoreResult};

/// How long one call to etcd may take (connect, write, read).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

pub fn err(what: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(format!("etcd: {what}"))
}

struct Endpoint {
    addr: SocketAddr,
    host: String,
}

pub struct Gateway {
    endpoints: Vec<Endpoint>,
    /// The endpoint that answered last.
    preferred: AtomicUsize,
}

/// One key as etcd holds it.
#[derive(Clone, Debug)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
}

impl Kv {
    fn from_json(kv: &Value) -> StoreResult<Kv> {
        Ok(Kv {
            key: String::from_utf8_lossy(&unb64(kv["key"].as_str().unwrap_or(""))?).into_owned(),
            value: unb64(kv["value"].as_str().unwrap_or(""))?,
            mod_revision: int(&kv["mod_revision"]),
            create_revision: int(&kv["create_revision"]),
        })
    }
}

/// What a watch reports.
#[derive(Debug)]
pub enum WatchEvent {
    /// Keys changed; the revision of the change.
    Changed(i64),
    /// The revision asked for was compacted away: read everything again.
    Compacted(i64),
}

impl Gateway {
    /// `urls`: comma-separated `http://host:port` endpoints.
    pub fn new(urls: &str) -> StoreResult<Gateway> {
        let mut endpoints = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let host = url
                .strip_prefix("http://")
                .ok_or_else(|| {
                    err(format!(
                        "`{url}`: only http:// endpoints are supported (put etcd's TLS behind a local proxy, see docs/fleet.md)"
                    ))
                })?
                .trim_end_matches('/')
                .to_string();
            let addr = host
                .to_socket_addrs()
                .map_err(|e| err(format!("`{url}`: {e}")))?
                .next()
                .ok_or_else(|| err(format!("`{url}` resolves to no address")))?;
            endpoints.push(Endpoint { addr, host });
        }
        if endpoints.is_empty() {
            return Err(err("no endpoint given"));
        }
        Ok(Gateway {
            endpoints,
            preferred: AtomicUsize::new(0),
        })
    }

    /// A connection to the first endpoint that accepts one, starting with the preferred one.
    fn connect(&self) -> StoreResult<(TcpStream, &Endpoint)> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.endpoints.len() {
            let n = (first + i) % self.endpoints.len();
            let e = &self.endpoints[n];
            match TcpStream::connect_timeout(&e.addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    self.preferred.store(n, Ordering::Relaxed);
                    return Ok((s, e));
                }
                Err(error) => last = Some(format!("{}: {error}", e.addr)),
            }
        }
        Err(err(last.unwrap_or_default()))
    }

    fn send(&self, path: &str, body: &Value, read_timeout: Option<Duration>) -> StoreResult<TcpStream> {
        let (mut stream, e) = self.connect()?;
        stream.set_read_timeout(read_timeout).map_err(err)?;
        stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(err)?;
        let _ = stream.set_nodelay(true);
        let body = body.to_string();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            e.host,
            body.len()
        )
        .map_err(err)?;
        Ok(stream)
    }

    /// One JSON call.
    pub fn call(&self, path: &str, body: &Value) -> StoreResult<Value> {
        let mut stream = self.send(path, body, Some(CALL_TIMEOUT))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(err)?;
        let text = String::from_utf8(raw).map_err(|_| err("a response that is not UTF-8"))?;
        let (head, payload) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| err("a response without a body"))?;
        let status = head.split(' ').nth(1).unwrap_or("");
        let payload = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(payload)?
        } else {
            payload.to_string()
        };
        if status != "200" {
            return Err(err(format!("{path} answered {status}: {}", payload.trim())));
        }
        serde_json::from_str(&payload).map_err(|e| err(format!("{path}: {e}")))
    }

    pub fn get(&self, key: &str) -> StoreResult<Option<Kv>> {
        let answer = self.call("/v3/kv/range", &json!({ "key": b64(key.as_bytes()) }))?;
        match answer["kvs"].as_array().and_then(|kvs| kvs.first()) {
            Some(kv) => Kv::from_json(kv).map(Some),
            None => Ok(None),
        }
    }

    /// Keys in `[from, to)` in key order (descending if asked), at most `limit` (0: all), and
    /// the store's revision they were read at.
    pub fn range(&self, from: &str, to: &str, descending: bool, limit: usize) -> StoreResult<(Vec<Kv>, i64)> {
        let mut request = json!({
            "key": b64(from.as_bytes()),
            "range_end": b64(to.as_bytes()),
            "sort_target": "KEY",
            "sort_order": if descending { "DESCEND" } else { "ASCEND" },
        });
        if limit > 0 {
            request["limit"] = json!(limit);
        }
        let answer = self.call("/v3/kv/range", &request)?;
        let kvs = answer["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(Kv::from_json)
            .collect::<StoreResult<Vec<Kv>>>()?;
        Ok((kvs, int(&answer["header"]["revision"])))
    }

    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> StoreResult<()> {
        self.call("/v3/kv/put", &put(key, value, lease)["request_put"])
            .map(|_| ())
    }

    /// A transaction: if every comparison holds, the `success` operations run; whether they did.
    pub fn txn(&self, compare: Vec<Value>, success: Vec<Value>) -> StoreResult<bool> {
        let answer = self.call("/v3/kv/txn", &json!({ "compare": compare, "success": success }))?;
        Ok(answer["succeeded"].as_bool().unwrap_or(false))
    }

    /// A lease of `ttl_s` seconds; its id.
    pub fn lease_grant(&self, ttl_s: u64) -> StoreResult<i64> {
        let answer = self.call("/v3/lease/grant", &json!({ "TTL": ttl_s.to_string() }))?;
        match int(&answer["ID"]) {
            0 => Err(err(format!("lease grant answered {answer}"))),
            id => Ok(id),
        }
    }

    /// Renews a lease; false when it has already expired.
    pub fn lease_keepalive(&self, id: i64) -> StoreResult<bool> {
        let answer = self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        Ok(int(&answer["result"]["TTL"]) > 0)
    }

    pub fn lease_revoke(&self, id: i64) -> StoreResult<()> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .map(|_| ())
    }

    /// Watches the keys under `prefix` from `start_revision` (0: from now), calling `on` for each
    /// report until it returns false or the stream ends (an error: etcd went away).
    pub fn watch(&self, prefix: &str, start_revision: i64, mut on: impl FnMut(WatchEvent) -> bool) -> StoreResult<()> {
        let mut request = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(prefix_end(prefix).as_bytes()) });
        if start_revision > 0 {
            request["start_revision"] = json!(start_revision.to_string());
        }
        // No read timeout: a quiet watch is the normal case. A dead etcd resets the connection;
        // one that hangs is noticed by the heartbeat's calls, which have timeouts.
        let stream = self.send("/v3/watch", &json!({ "create_request": request }), None)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(err)? == 0 {
                return Err(err("the watch stream ended"));
            }
            if line.trim().is_empty() || line.starts_with("HTTP/") || !line.trim_start().starts_with('{') {
                // The response head, and the chunk-size lines between messages.
                continue;
            }
            let message: Value = serde_json::from_str(line.trim()).map_err(|e| err(format!("watch: {e}")))?;
            let result = &message["result"];
            let compacted = int(&result["compact_revision"]);
            let report = if compacted > 0 {
                WatchEvent::Compacted(compacted)
            } else if result["events"].as_array().is_some_and(|e| !e.is_empty()) {
                WatchEvent::Changed(int(&result["header"]["revision"]))
            } else if result["canceled"].as_bool() == Some(true) {
                return Err(err(format!("watch canceled: {result}")));
            } else {
                continue;
            };
            let stop = matches!(report, WatchEvent::Compacted(_));
            if !on(report) || stop {
                return Ok(());
            }
        }
    }
}

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    String::from_utf8(end).expect("the prefix is ASCII")
}

/// A put operation, for [`Gateway::txn`].
pub fn put(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut op = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
    if let Some(lease) = lease {
        op["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": op })
}

/// A comparison of a key's modification revision (0: the key does not exist).
pub fn mod_is(key: &str, revision: i64) -> Value {
    json!({ "key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": revision.to_string() })
}

/// A comparison of a key's creation revision (0: the key does not exist).
pub fn created_at(key: &str, revision: i64) -> Value {
    json!({ "key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": revision.to_string() })
}

/// etcd's JSON carries 64-bit integers as strings.
pub fn int(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
        .unwrap_or(0)
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut text: &str) -> StoreResult<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = text.split_once("\r\n").ok_or_else(|| err("a bad chunk"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).map_err(err)?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| err("a short chunk"))?;
        out.push_str(chunk);
        text = rest
            .get(size + 2..)
            .ok_or_else(|| err("a chunk without its line end"))?;
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4), as etcd's gateway expects bytes.
pub fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = (u32::from(group[0]) << 16)
            | (u32::from(*group.get(1).unwrap_or(&0)) << 8)
            | u32::from(*group.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= group.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unb64(text: &str) -> StoreResult<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64
            .iter()
            .position(|&b| b == c)
            .ok_or_else(|| err("a value that is not base64"))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_chunks_round_trip() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "/safelb/x/versions/00000000000000000001",
        ] {
            assert_eq!(unb64(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(dechunk("4\r\nab\"c\r\n2\r\n}{\r\n0\r\n\r\n").unwrap(), "ab\"c}{");
        assert_eq!(prefix_end("/safelb/a/"), "/safelb/a0");
    }

    /// Leases expire, transactions compare, and a watch sees changes and reports compaction.
    #[test]
    fn leases_transactions_and_watches_against_a_real_etcd() {
        let etcd = crate::testing::Etcd::start();
        let g = Gateway::new(&format!("http://127.0.0.1:1,{}", etcd.url)).unwrap();
        // The first endpoint refuses; the call goes on to the second.
        assert!(g.get("/t/a").unwrap().is_none());
        assert!(g
            .txn(vec![created_at("/t/a", 0)], vec![put("/t/a", b"1", None)])
            .unwrap());
        assert!(
            !g.txn(vec![created_at("/t/a", 0)], vec![put("/t/a", b"2", None)])
                .unwrap(),
            "a second create loses"
        );
        let lease = g.lease_grant(1).unwrap();
        g.put("/t/leased", b"x", Some(lease)).unwrap();
        assert!(g.lease_keepalive(lease).unwrap());
        std::thread::sleep(Duration::from_millis(2_500));
        assert!(
            !g.lease_keepalive(lease).unwrap(),
            "an expired lease is reported as such"
        );
        assert!(g.get("/t/leased").unwrap().is_none(), "its keys went with it");

        let (_, rev) = g.range("/t/", &prefix_end("/t/"), false, 0).unwrap();
        let watcher = {
            let url = etcd.url.clone();
            std::thread::spawn(move || {
                let g = Gateway::new(&url).unwrap();
                // etcd may report both puts in one message: stop at the first report.
                let mut seen = Vec::new();
                let _ = g.watch("/t/", rev + 1, |e| {
                    seen.push(format!("{e:?}"));
                    false
                });
                seen
            })
        };
        g.put("/t/b", b"1", None).unwrap();
        g.put("/t/c", b"1", None).unwrap();
        let seen = watcher.join().unwrap();
        assert!(seen.len() == 1 && seen[0].starts_with("Changed"), "{seen:?}");
        // Compact past the revision a resuming watch would ask for.
        let (_, now) = g.range("/t/", &prefix_end("/t/"), false, 0).unwrap();
        g.call("/v3/kv/compaction", &json!({ "revision": now.to_string() }))
            .unwrap();
        let mut compacted = None;
        g.watch("/t/", rev, |e| {
            compacted = Some(format!("{e:?}"));
            true
        })
        .unwrap();
        assert_eq!(compacted, Some(format!("Compacted({now})")));
    }
}
