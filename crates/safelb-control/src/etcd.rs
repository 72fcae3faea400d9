//! The version store in etcd, for fleet mode: the same [`VersionStore`] contract as SQLite, with
//! the cluster's history under `/safelb/<cluster>/`.
//!
//! It speaks etcd's v3 JSON gateway (`POST /v3/kv/range`, `/put`, `/txn`: JSON with base64 keys
//! and values) over plain HTTP/1.1 on a blocking socket: the store's calls already run on tokio's
//! blocking pool, and no gRPC stack is needed for a handful of unary calls. Ids are allocated in a
//! transaction that compares the counter key's revision, so two instances appending at once get
//! two different ids, never one twice.
//!
//! Layout, with ids zero-padded so that key order is id order:
//! `versions/<id>` (a `VersionRecord` with its source), `events/<id>`, `incidents/<id>`,
//! `next/<kind>` (the last id given out) and `running`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::clock::unix_ms;
use crate::store::*;

/// How long one call to etcd may take (connect, write, read).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at a compare-and-set before giving up (others kept winning the race).
const CAS_ATTEMPTS: usize = 50;

pub struct EtcdStore {
    addr: SocketAddr,
    host: String,
    /// `/safelb/<cluster>/`.
    prefix: String,
}

fn err(what: impl std::fmt::Display) -> StoreError {
    StoreError(format!("etcd: {what}"))
}

impl EtcdStore {
    /// A store for `cluster` at the etcd endpoint `url` (`http://host:port`); checks that etcd
    /// answers.
    pub fn connect(url: &str, cluster: &str) -> StoreResult<EtcdStore> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| err(format!("`{url}`: only http:// endpoints are supported so far")))?
            .trim_end_matches('/')
            .to_string();
        let addr = host
            .to_socket_addrs()
            .map_err(|e| err(format!("`{url}`: {e}")))?
            .next()
            .ok_or_else(|| err(format!("`{url}` resolves to no address")))?;
        let store = EtcdStore {
            addr,
            host,
            prefix: format!("/safelb/{cluster}/"),
        };
        store.get_raw("running")?;
        Ok(store)
    }

    /// One JSON call to the gateway.
    fn call(&self, path: &str, body: &Value) -> StoreResult<Value> {
        let body = body.to_string();
        let mut stream =
            TcpStream::connect_timeout(&self.addr, CALL_TIMEOUT).map_err(|e| err(format!("{}: {e}", self.addr)))?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(err)?;
        stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(err)?;
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host,
            body.len()
        )
        .map_err(err)?;
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

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The value and modification revision of a key (revision 0 when it does not exist).
    fn get_raw(&self, rest: &str) -> StoreResult<(Option<Vec<u8>>, i64)> {
        let answer = self.call("/v3/kv/range", &json!({ "key": b64(self.key(rest).as_bytes()) }))?;
        match answer["kvs"].as_array().and_then(|kvs| kvs.first()) {
            Some(kv) => Ok((
                Some(unb64(kv["value"].as_str().unwrap_or(""))?),
                revision(&kv["mod_revision"]),
            )),
            None => Ok((None, 0)),
        }
    }

    fn get<T: DeserializeOwned>(&self, rest: &str) -> StoreResult<Option<(T, i64)>> {
        match self.get_raw(rest)? {
            (Some(bytes), rev) => Ok(Some((serde_json::from_slice(&bytes).map_err(err)?, rev))),
            (None, _) => Ok(None),
        }
    }

    /// Values of the keys in `[from, to)` (relative), in key order (descending if asked), at most
    /// `limit` (0: all).
    fn range<T: DeserializeOwned>(&self, from: &str, to: &str, descending: bool, limit: usize) -> StoreResult<Vec<T>> {
        let mut request = json!({
            "key": b64(self.key(from).as_bytes()),
            "range_end": b64(self.key(to).as_bytes()),
            "sort_target": "KEY",
            "sort_order": if descending { "DESCEND" } else { "ASCEND" },
        });
        if limit > 0 {
            request["limit"] = json!(limit);
        }
        let answer = self.call("/v3/kv/range", &request)?;
        answer["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|kv| {
                let bytes = unb64(kv["value"].as_str().unwrap_or(""))?;
                serde_json::from_slice(&bytes).map_err(err)
            })
            .collect()
    }

    /// Puts `key = value` if the key's modification revision is still `rev` (0: absent), with
    /// `also` written in the same transaction. Whether it won.
    fn put_if(&self, rest: &str, rev: i64, value: &[u8], also: &[(String, Vec<u8>)]) -> StoreResult<bool> {
        let key = b64(self.key(rest).as_bytes());
        let mut success = vec![json!({ "request_put": { "key": key, "value": b64(value) } })];
        for (k, v) in also {
            success.push(json!({ "request_put": { "key": b64(self.key(k).as_bytes()), "value": b64(v) } }));
        }
        let compare = json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string() });
        let answer = self.call("/v3/kv/txn", &json!({ "compare": [compare], "success": success }))?;
        Ok(answer["succeeded"].as_bool().unwrap_or(false))
    }

    /// Gives out the next id of `kind` and writes `record(id)` under `<kind>/<id>` with it.
    fn append<T: Serialize>(&self, kind: &str, record: impl Fn(u64) -> T) -> StoreResult<u64> {
        let counter = format!("next/{kind}");
        for _ in 0..CAS_ATTEMPTS {
            let (last, rev) = match self.get_raw(&counter)? {
                (Some(bytes), rev) => (String::from_utf8_lossy(&bytes).parse::<u64>().map_err(err)?, rev),
                (None, _) => (0, 0),
            };
            let id = last + 1;
            let body = serde_json::to_vec(&record(id)).map_err(err)?;
            if self.put_if(&counter, rev, id.to_string().as_bytes(), &[(id_key(kind, id), body)])? {
                return Ok(id);
            }
        }
        Err(err(format!(
            "could not allocate a {kind} id: {CAS_ATTEMPTS} attempts lost the race"
        )))
    }

    /// Reads, changes and writes back one record, retrying if another writer got there first.
    fn update<T: Serialize + DeserializeOwned>(&self, rest: &str, change: impl Fn(&mut T)) -> StoreResult<()> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut value, rev)) = self.get::<T>(rest)? else {
                return Err(err(format!("{rest} does not exist")));
            };
            change(&mut value);
            if self.put_if(rest, rev, &serde_json::to_vec(&value).map_err(err)?, &[])? {
                return Ok(());
            }
        }
        Err(err(format!(
            "could not update {rest}: {CAS_ATTEMPTS} attempts lost the race"
        )))
    }
}

fn id_key(kind: &str, id: u64) -> String {
    format!("{kind}/{id:020}")
}

fn revision(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
        .unwrap_or(0)
}

impl VersionStore for EtcdStore {
    fn append_version(&mut self, v: NewVersion) -> StoreResult<u64> {
        let created_ms = unix_ms();
        self.append("versions", |id| VersionRecord {
            id,
            parent: v.parent,
            author: v.author.clone(),
            reason: v.reason.clone(),
            created_ms,
            hash: content_hash(&v.source),
            origin: v.origin.clone(),
            skip_preflight: v.skip_preflight,
            emergency: v.emergency,
            fate: v.fate,
            source: Some(v.source.clone()),
        })
    }

    fn set_fate(&mut self, id: u64, fate: Fate) -> StoreResult<()> {
        self.update(&id_key("versions", id), |v: &mut VersionRecord| v.fate = fate)
    }

    fn set_running(&mut self, id: u64) -> StoreResult<()> {
        let (_, rev) = self.get_raw("running")?;
        if self.put_if("running", rev, id.to_string().as_bytes(), &[])? {
            Ok(())
        } else {
            // Another writer moved it in between: the last writer wins, as with SQLite.
            self.call(
                "/v3/kv/put",
                &json!({ "key": b64(self.key("running").as_bytes()), "value": b64(id.to_string().as_bytes()) }),
            )
            .map(|_| ())
        }
    }

    fn running(&self) -> StoreResult<Option<u64>> {
        match self.get_raw("running")? {
            (Some(bytes), _) => Ok(Some(String::from_utf8_lossy(&bytes).parse().map_err(err)?)),
            (None, _) => Ok(None),
        }
    }

    fn version(&self, id: u64) -> StoreResult<Option<VersionRecord>> {
        Ok(self.get(&id_key("versions", id))?.map(|(v, _)| v))
    }

    fn versions(&self, limit: usize) -> StoreResult<Vec<VersionRecord>> {
        let mut all: Vec<VersionRecord> = self.range("versions/", "versions0", true, limit)?;
        for v in &mut all {
            v.source = None;
        }
        Ok(all)
    }

    fn known_good_before(&self, before: u64) -> StoreResult<Option<u64>> {
        let older: Vec<VersionRecord> = self.range("versions/", &id_key("versions", before), true, 0)?;
        Ok(older.iter().find(|v| v.fate == Fate::KnownGood).map(|v| v.id))
    }

    fn append_event(&mut self, e: NewEvent) -> StoreResult<u64> {
        let time_ms = unix_ms();
        self.append("events", |id| EventRecord {
            id,
            time_ms,
            kind: e.kind.to_string(),
            version: e.version,
            message: e.message.clone(),
            data: e.data.clone(),
        })
    }

    fn events(&self, after: u64, limit: usize) -> StoreResult<Vec<EventRecord>> {
        self.range(&id_key("events", after + 1), "events0", false, limit)
    }

    fn events_between(&self, from_ms: i64, to_ms: i64) -> StoreResult<Vec<EventRecord>> {
        let all: Vec<EventRecord> = self.range("events/", "events0", false, 0)?;
        Ok(all
            .into_iter()
            .filter(|e| e.time_ms >= from_ms && e.time_ms <= to_ms)
            .collect())
    }

    fn open_incident(&mut self, opened_ms: i64, title: &str) -> StoreResult<u64> {
        self.append("incidents", |id| IncidentRecord {
            id,
            opened_ms,
            resolved_ms: None,
            title: title.to_string(),
            report: Value::Null,
        })
    }

    fn resolve_incident(&mut self, id: u64, resolved_ms: i64, report: &Value) -> StoreResult<()> {
        self.update(&id_key("incidents", id), |i: &mut IncidentRecord| {
            i.resolved_ms = Some(resolved_ms);
            i.report = report.clone();
        })
    }

    fn incidents(&self, limit: usize) -> StoreResult<Vec<IncidentRecord>> {
        self.range("incidents/", "incidents0", true, limit)
    }

    fn incident(&self, id: u64) -> StoreResult<Option<IncidentRecord>> {
        Ok(self.get(&id_key("incidents", id))?.map(|(i, _)| i))
    }
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
fn b64(bytes: &[u8]) -> String {
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

fn unb64(text: &str) -> StoreResult<Vec<u8>> {
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

    /// The contract every store meets, against a real etcd.
    #[test]
    fn the_store_contract_holds() {
        let etcd = crate::testing::Etcd::start();
        let url = etcd.url.clone();
        crate::testing::store_contract(&|| Box::new(EtcdStore::connect(&url, "contract").expect("etcd answers")));
    }

    /// Two instances appending at once get distinct ids, one each, with none skipped.
    #[test]
    fn concurrent_appends_get_distinct_ids() {
        let etcd = crate::testing::Etcd::start();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let url = etcd.url.clone();
                std::thread::spawn(move || {
                    let mut s = EtcdStore::connect(&url, "race").unwrap();
                    (0..10)
                        .map(|i| {
                            s.append_event(NewEvent {
                                kind: "ChangeSubmitted",
                                version: None,
                                message: format!("{t}-{i}"),
                                data: Value::Null,
                            })
                            .unwrap()
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut ids: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, (1..=40).collect::<Vec<u64>>());
        let s = EtcdStore::connect(&etcd.url, "race").unwrap();
        assert_eq!(s.events(0, 100).unwrap().len(), 40);
        // Another cluster's history is its own.
        assert!(EtcdStore::connect(&etcd.url, "other")
            .unwrap()
            .events(0, 100)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn an_unreachable_etcd_is_a_clear_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = EtcdStore::connect(&format!("http://{closed}"), "x")
            .err()
            .expect("an error");
        assert!(e.to_string().starts_with("version store: etcd: 127.0.0.1:"), "{e}");
    }

    #[test]
    fn base64_round_trips() {
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
    }
}
