//! The version store in etcd, for fleet mode: the same [`VersionStore`] contract as SQLite, with
//! the cluster's history under `/safelb/<cluster>/`.
//!
//! It talks to etcd through [`super::gateway`]; the store's calls already run on tokio's blocking
//! pool. Ids are allocated in a transaction that compares the counter key's revision, so two
//! instances appending at once get two different ids, never one twice.
//!
//! Layout, with ids zero-padded so that key order is id order:
//! `versions/<id>` (a `VersionRecord` with its source), `events/<id>`, `incidents/<id>`,
//! `next/<kind>` (the last id given out) and `state/running` (watched by every instance, with the
//! rest of `state/`, see [`super`]).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::gateway::{self, err, Gateway};
use crate::clock::unix_ms;
use crate::store::*;

/// Attempts at a compare-and-set before giving up (others kept winning the race).
const CAS_ATTEMPTS: usize = 50;

pub struct EtcdStore {
    gateway: std::sync::Arc<Gateway>,
    /// `/safelb/<cluster>/`.
    prefix: String,
}

impl EtcdStore {
    /// A store for `cluster` at the etcd endpoints `urls` (`http://host:port`, comma-separated);
    /// checks that etcd answers.
    pub fn connect(urls: &str, cluster: &str) -> StoreResult<EtcdStore> {
        let store = EtcdStore::on(std::sync::Arc::new(Gateway::new(urls)?), cluster);
        store.get_raw(super::RUNNING)?;
        Ok(store)
    }

    /// A store on an existing gateway, without checking that etcd answers.
    pub fn on(gateway: std::sync::Arc<Gateway>, cluster: &str) -> EtcdStore {
        EtcdStore {
            gateway,
            prefix: super::prefix(cluster),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The value and modification revision of a key (revision 0 when it does not exist).
    fn get_raw(&self, rest: &str) -> StoreResult<(Option<Vec<u8>>, i64)> {
        Ok(match self.gateway.get(&self.key(rest))? {
            Some(kv) => (Some(kv.value), kv.mod_revision),
            None => (None, 0),
        })
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
        let (kvs, _) = self.gateway.range(&self.key(from), &self.key(to), descending, limit)?;
        kvs.iter()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(err))
            .collect()
    }

    /// Puts `key = value` if the key's modification revision is still `rev` (0: absent), with
    /// `also` written in the same transaction. Whether it won.
    fn put_if(&self, rest: &str, rev: i64, value: &[u8], also: &[(String, Vec<u8>)]) -> StoreResult<bool> {
        let key = self.key(rest);
        let mut success = vec![gateway::put(&key, value, None)];
        for (k, v) in also {
            success.push(gateway::put(&self.key(k), v, None));
        }
        self.gateway.txn(vec![gateway::mod_is(&key, rev)], success)
    }

    /// Gives out the next id of `kind` and writes `record(id)` under `<kind>/<id>` with it.
    fn append<T: Serialize>(&self, kind: &str, record: impl Fn(u64) -> T) -> StoreResult<u64> {
        let counter = format!("next/{kind}");
        for _ in 0..CAS_ATTEMPTS {
            let (id, rev) = next_id(&self.gateway, &self.key(&counter))?;
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

/// The next id its counter key (absolute) gives out, and the counter's revision, which the
/// transaction that takes the id must compare (0: no id given out yet).
pub(super) fn next_id(gateway: &Gateway, counter: &str) -> StoreResult<(u64, i64)> {
    Ok(match gateway.get(counter)? {
        Some(kv) => (
            String::from_utf8_lossy(&kv.value).parse::<u64>().map_err(err)? + 1,
            kv.mod_revision,
        ),
        None => (1, 0),
    })
}

pub(super) fn id_key(kind: &str, id: u64) -> String {
    format!("{kind}/{id:020}")
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
        let (_, rev) = self.get_raw(super::RUNNING)?;
        if self.put_if(super::RUNNING, rev, id.to_string().as_bytes(), &[])? {
            Ok(())
        } else {
            // Another writer moved it in between: the last writer wins, as with SQLite.
            self.gateway
                .put(&self.key(super::RUNNING), id.to_string().as_bytes(), None)
        }
    }

    fn running(&self) -> StoreResult<Option<u64>> {
        match self.get_raw(super::RUNNING)? {
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
}
