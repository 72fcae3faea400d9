//! The embedded version store on SQLite: WAL journal, `synchronous = FULL`, one writer.
//!
//! A version or event whose append returned is in a committed transaction, which survives
//! `kill -9` (and with FULL, power loss); WAL recovery on open never leaves the file unreadable.
//! Operators can inspect it with the `sqlite3` shell.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::clock::unix_ms;
use crate::store::*;

pub struct SqliteStore {
    conn: Connection,
}

fn err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
        _ => StoreError::Failed(e.to_string()),
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS versions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    parent         INTEGER,
    author         TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_ms     INTEGER NOT NULL,
    source         TEXT NOT NULL,
    hash           TEXT NOT NULL,
    origin         TEXT NOT NULL,
    skip_preflight INTEGER NOT NULL,
    emergency      INTEGER NOT NULL,
    fate           TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    version INTEGER,
    message TEXT NOT NULL,
    data    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS incidents (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    opened_ms   INTEGER NOT NULL,
    resolved_ms INTEGER,
    title       TEXT NOT NULL,
    report      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (time_ms);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

impl SqliteStore {
    /// Opens (creating if needed) `dir/safelb.db`. A file that is not a SQLite database, or
    /// one whose pages fail SQLite's quick check, is refused with its path: serving from a
    /// history that may have lost versions would break the promise that it has them all.
    pub fn open(dir: &Path) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Failed(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("safelb.db");
        let damaged = |e: rusqlite::Error| {
            match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => StoreError::Failed(format!(
                "{} is not a safelb version store, or it is damaged ({e}); restore it from a backup, or move it aside to start with an empty history",
                path.display()
            )),
            _ => err(e),
        }
        };
        let conn = Connection::open(&path).map_err(damaged)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(damaged)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(damaged)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(damaged)?;
        // Reads every page once (milliseconds for a store of thousands of versions).
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(damaged)?;
        if check != "ok" {
            return Err(StoreError::Failed(format!(
                "{} is damaged (SQLite's quick check: {check}); restore it from a backup, or move it aside to start with an empty history",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA).map_err(damaged)?;
        Ok(SqliteStore { conn })
    }

    fn record(row: &rusqlite::Row<'_>, with_source: bool) -> rusqlite::Result<VersionRecord> {
        Ok(VersionRecord {
            id: row.get::<_, i64>(0)? as u64,
            parent: row.get::<_, Option<i64>>(1)?.map(|p| p as u64),
            author: row.get(2)?,
            reason: row.get(3)?,
            created_ms: row.get(4)?,
            hash: row.get(5)?,
            origin: row.get(6)?,
            skip_preflight: row.get::<_, i64>(7)? != 0,
            emergency: row.get::<_, i64>(8)? != 0,
            fate: Fate::parse(&row.get::<_, String>(9)?),
            source: if with_source { Some(row.get(10)?) } else { None },
        })
    }
}

const COLUMNS: &str = "id, parent, author, reason, created_ms, hash, origin, skip_preflight, emergency, fate";

impl VersionStore for SqliteStore {
    fn append_version(&mut self, v: NewVersion) -> StoreResult<u64> {
        self.conn
            .execute(
                "INSERT INTO versions (parent, author, reason, created_ms, source, hash, origin, skip_preflight, emergency, fate)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    v.parent.map(|p| p as i64),
                    v.author,
                    v.reason,
                    unix_ms(),
                    v.source,
                    content_hash(&v.source),
                    v.origin,
                    v.skip_preflight as i64,
                    v.emergency as i64,
                    v.fate.as_str()
                ],
            )
            .map_err(err)?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn set_fate(&mut self, id: u64, fate: Fate) -> StoreResult<()> {
        self.conn
            .execute(
                "UPDATE versions SET fate = ?1 WHERE id = ?2",
                params![fate.as_str(), id as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    fn set_running(&mut self, id: u64) -> StoreResult<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('running', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![id.to_string()],
            )
            .map_err(err)?;
        Ok(())
    }

    fn settle(&mut self, id: u64, fate: Fate, running: u64) -> StoreResult<()> {
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "UPDATE versions SET fate = ?1 WHERE id = ?2",
            params![fate.as_str(), id as i64],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('running', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![running.to_string()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    fn running(&self) -> StoreResult<Option<u64>> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'running'", [], |r| r.get(0))
            .optional()
            .map_err(err)?;
        Ok(v.and_then(|s| s.parse().ok()))
    }

    fn version(&self, id: u64) -> StoreResult<Option<VersionRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS}, source FROM versions WHERE id = ?1"),
                params![id as i64],
                |r| Self::record(r, true),
            )
            .optional()
            .map_err(err)
    }

    fn versions(&self, limit: usize) -> StoreResult<Vec<VersionRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM versions ORDER BY id DESC LIMIT ?1"))
            .map_err(err)?;
        let rows = stmt
            .query_map(params![limit as i64], |r| Self::record(r, false))
            .map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    fn known_good_before(&self, before: u64) -> StoreResult<Option<u64>> {
        self.conn
            .query_row(
                "SELECT id FROM versions WHERE fate = 'known_good' AND id < ?1 ORDER BY id DESC LIMIT 1",
                params![before as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|o| o.map(|i| i as u64))
            .map_err(err)
    }

    fn append_event(&mut self, e: NewEvent) -> StoreResult<u64> {
        self.conn
            .execute(
                "INSERT INTO events (time_ms, kind, version, message, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    unix_ms(),
                    e.kind,
                    e.version.map(|v| v as i64),
                    e.message,
                    e.data.to_string()
                ],
            )
            .map_err(err)?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn events(&self, after: u64, limit: usize) -> StoreResult<Vec<EventRecord>> {
        self.query_events(
            "SELECT id, time_ms, kind, version, message, data FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            params![after as i64, limit as i64],
        )
    }

    fn events_between(&self, from_ms: i64, to_ms: i64) -> StoreResult<Vec<EventRecord>> {
        self.query_events(
            "SELECT id, time_ms, kind, version, message, data FROM events WHERE time_ms >= ?1 AND time_ms <= ?2 ORDER BY id",
            params![from_ms, to_ms],
        )
    }

    fn open_incident(&mut self, opened_ms: i64, title: &str) -> StoreResult<u64> {
        self.conn
            .execute(
                "INSERT INTO incidents (opened_ms, title, report) VALUES (?1, ?2, '{}')",
                params![opened_ms, title],
            )
            .map_err(err)?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn resolve_incident(&mut self, id: u64, resolved_ms: i64, report: &serde_json::Value) -> StoreResult<()> {
        self.conn
            .execute(
                "UPDATE incidents SET resolved_ms = ?1, report = ?2 WHERE id = ?3",
                params![resolved_ms, report.to_string(), id as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    fn incidents(&self, limit: usize) -> StoreResult<Vec<IncidentRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, opened_ms, resolved_ms, title, report FROM incidents ORDER BY id DESC LIMIT ?1")
            .map_err(err)?;
        let rows = stmt.query_map(params![limit as i64], incident_row).map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    fn incident(&self, id: u64) -> StoreResult<Option<IncidentRecord>> {
        self.conn
            .query_row(
                "SELECT id, opened_ms, resolved_ms, title, report FROM incidents WHERE id = ?1",
                params![id as i64],
                incident_row,
            )
            .optional()
            .map_err(err)
    }
}

fn incident_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<IncidentRecord> {
    Ok(IncidentRecord {
        id: r.get::<_, i64>(0)? as u64,
        opened_ms: r.get(1)?,
        resolved_ms: r.get(2)?,
        title: r.get(3)?,
        report: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or(serde_json::Value::Null),
    })
}

impl SqliteStore {
    fn query_events(&self, sql: &str, params: impl rusqlite::Params) -> StoreResult<Vec<EventRecord>> {
        let mut stmt = self.conn.prepare(sql).map_err(err)?;
        let rows = stmt
            .query_map(params, |r| {
                Ok(EventRecord {
                    id: r.get::<_, i64>(0)? as u64,
                    time_ms: r.get(1)?,
                    kind: r.get(2)?,
                    version: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    message: r.get(4)?,
                    data: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract every store meets (`testing::store_contract`), through reopens of one file.
    #[test]
    fn the_store_contract_holds() {
        let (_, dir) = crate::testing::store("contract");
        let path = dir.0.clone();
        crate::testing::store_contract(&|| Box::new(SqliteStore::open(&path).expect("the store opens")));
    }
}
