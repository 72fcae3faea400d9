//! Start-up: which version serves (the store's running version, or the config file on a first
//! start), and what became of a rollout a crash interrupted.

use super::*;

/// Decides the version to serve at start: the store's running version if there is one (a
/// rollout interrupted by a crash is recorded as rolled back), else the config file, recorded
/// as the first version.
pub fn recover(store: &mut dyn VersionStore, file_name: &str, file_source: &str) -> Result<Startup, String> {
    for v in store.versions(10_000).map_err(|e| e.to_string())? {
        if v.fate == Fate::Pending {
            store.set_fate(v.id, Fate::RolledBack).map_err(|e| e.to_string())?;
            store
                .append_event(Event::RolloutInterrupted { version: v.id }.record())
                .map_err(|e| e.to_string())?;
        }
    }
    let (version, source) = match store.running().map_err(|e| e.to_string())? {
        Some(id) => {
            let v = store
                .version(id)
                .map_err(|e| e.to_string())?
                .ok_or(format!("running version {id} is missing"))?;
            (id, v.source.unwrap_or_default())
        }
        None => {
            let id = store
                .append_version(NewVersion {
                    parent: None,
                    author: "safelb".into(),
                    reason: format!("first start with {file_name}"),
                    source: file_source.to_owned(),
                    origin: "startup".into(),
                    skip_preflight: false,
                    emergency: false,
                    fate: Fate::KnownGood,
                })
                .map_err(|e| e.to_string())?;
            store.set_running(id).map_err(|e| e.to_string())?;
            (id, file_source.to_owned())
        }
    };
    let config = safelb_config::check(&format!("version {version}"), &source)
        .into_result()
        .map_err(|d| format!("running version {version} no longer passes check:\n{}", d.render()))?;
    store
        .append_event(Event::VersionStarted { version }.record())
        .map_err(|e| e.to_string())?;
    Ok(Startup {
        config,
        version,
        file_differs: content_hash(&source) != content_hash(file_source),
    })
}
