//! Start-up: which version serves (the store's running version, or the config file on a first
//! start), and what became of a rollout a crash interrupted.

use super::*;

/// Why safelb cannot start from its store.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store names version {0} as running, but has no such version")]
    MissingRunning(u64),
    #[error("running version {version} no longer passes check:\n{rendered}")]
    NoLongerValid { version: u64, rendered: String },
}

/// Decides the version to serve at start: the store's running version if there is one (a
/// rollout interrupted by a crash is recorded as rolled back), else the config file, recorded
/// as the first version.
pub fn recover(store: &mut dyn VersionStore, file_name: &str, file_source: &str) -> Result<Startup, RecoverError> {
    for v in store.versions(10_000)? {
        if v.fate == Fate::Pending {
            store.set_fate(v.id, Fate::RolledBack)?;
            store.append_event(Event::RolloutInterrupted { version: v.id }.record())?;
        }
    }
    let (version, source) = match store.running()? {
        Some(id) => {
            let v = store.version(id)?.ok_or(RecoverError::MissingRunning(id))?;
            (id, v.source.unwrap_or_default())
        }
        None => {
            let id = store.append_version(NewVersion {
                parent: None,
                author: "safelb".into(),
                reason: format!("first start with {file_name}"),
                source: file_source.to_owned(),
                origin: "startup".into(),
                skip_preflight: false,
                emergency: false,
                fate: Fate::KnownGood,
            })?;
            store.set_running(id)?;
            (id, file_source.to_owned())
        }
    };
    let config = safelb_config::check(&format!("version {version}"), &source)
        .into_result()
        .map_err(|d| RecoverError::NoLongerValid {
            version,
            rendered: d.render(),
        })?;
    store.append_event(Event::VersionStarted { version }.record())?;
    Ok(Startup {
        config,
        version,
        file_differs: content_hash(&source) != content_hash(file_source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, RUNNING};

    fn pending(source: &str) -> NewVersion {
        NewVersion {
            parent: Some(1),
            author: "test".into(),
            reason: "a change".into(),
            source: source.to_owned(),
            origin: "apply".into(),
            skip_preflight: false,
            emergency: false,
            fate: Fate::Pending,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollout_cut_off_by_a_crash_is_rolled_back_and_the_known_good_version_serves() {
        let (store, _dir) = testing::store("recover");
        let first = store.blocking(|s| recover(s, "safelb.toml", RUNNING)).unwrap();
        assert_eq!((first.version, first.file_differs), (1, false));
        // A rollout of version 2 starts; the process dies mid-canary (its task simply stops).
        let candidate = RUNNING.replace("127.0.0.1:9\"", "127.0.0.1:10\"");
        let handle = safelb_proxy::ProxyHandle::new(first.config, 1);
        let controller = Controller::new(handle.clone(), store.clone());
        let v2 = store
            .call(move |s| s.append_version(pending(&candidate)))
            .await
            .unwrap();
        drop(controller);

        // The restart, with the file of the interrupted change on disk.
        let edited = RUNNING.replace("127.0.0.1:9\"", "127.0.0.1:10\"");
        let again = store.blocking(|s| recover(s, "safelb.toml", &edited)).unwrap();
        assert_eq!(again.version, 1, "the last promoted version serves");
        assert!(again.file_differs, "the edited file is offered as a change, not served");
        let record = store.call(move |s| s.version(v2)).await.unwrap().unwrap();
        assert_eq!(record.fate, Fate::RolledBack);
        assert_eq!(store.call(|s| s.running()).await.unwrap(), Some(1));
        let events = store.call(|s| s.events(0, 100)).await.unwrap();
        let interrupted: Vec<_> = events.iter().filter_map(|e| e.event()).collect();
        assert!(
            interrupted.contains(&Event::RolloutInterrupted { version: v2 }),
            "{interrupted:?}"
        );
    }

    #[test]
    fn a_running_version_that_no_longer_passes_check_is_a_clear_error() {
        let (store, _dir) = testing::store("recover");
        store.blocking(|s| recover(s, "safelb.toml", RUNNING)).unwrap();
        store
            .blocking(|s| {
                let id = s.append_version(NewVersion {
                    fate: Fate::KnownGood,
                    ..pending("not toml [")
                })?;
                s.set_running(id)
            })
            .unwrap();
        match store.blocking(|s| recover(s, "safelb.toml", RUNNING)) {
            Err(RecoverError::NoLongerValid { version: 2, rendered }) => {
                assert!(rendered.contains("version 2"), "{rendered}")
            }
            other => panic!("expected NoLongerValid, got {:?}", other.map(|s| s.version)),
        }
    }
}
