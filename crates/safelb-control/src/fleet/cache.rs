//! The last version the fleet ran, on this instance's disk: what it serves when it starts while
//! etcd cannot be reached. Written atomically (a temporary file, fsync, rename) each time the
//! instance serves a version the fleet runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cached {
    pub cluster: String,
    pub version: u64,
    pub source: String,
    pub saved_ms: i64,
}

fn path(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(format!("fleet-{cluster}.json"))
}

pub fn load(dir: &Path, cluster: &str) -> Result<Option<Cached>, String> {
    let p = path(dir, cluster);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a safelb version cache: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", p.display())),
    }
}

pub fn save(dir: &Path, cached: &Cached) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let p = path(dir, &cached.cluster);
    let tmp = p.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(cached).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_version_loads_back_and_a_damaged_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("safelb-cache-test-{}", fastrand::u64(..)));
        assert_eq!(load(&dir, "c").unwrap(), None);
        let c = Cached {
            cluster: "c".into(),
            version: 7,
            source: "[listener.a]\n".into(),
            saved_ms: 1,
        };
        save(&dir, &c).unwrap();
        assert_eq!(load(&dir, "c").unwrap(), Some(c));
        std::fs::write(dir.join("fleet-c.json"), "{").unwrap();
        assert!(load(&dir, "c").unwrap_err().contains("fleet-c.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
