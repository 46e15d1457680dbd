//! The volume driver's logic behind each protocol call: volumes are created as records in their
//! store (and cached in the registry), mounted by starting one mount process per volume on the
//! first mount ID, and unmounted (with every change uploaded) on the last.
//!
//! Calls on one volume are serialized by a per-volume lock, so a storm of concurrent Mounts starts
//! one process and counts every ID.
//!
//! This file holds the [`Driver`] (its stores, registry and locks) and what every call shares:
//! finding a volume's record, its options and its store. The calls live beside it by concern:
//! [`lifecycle`] (create, mount, unmount, remove, path), [`status`] (get, list, the metrics
//! endpoint's figures) and [`snapshots`]. Mount processes are asked over their control socket
//! with [`cairn_fs::control::client`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_fs::store::{SharedStore, StoreError, StoreSpec, open_store};

use crate::config::{Config, EMBEDDED_STORE};
use crate::names::VolumeName;
use crate::options::VolumeOptions;
use crate::records::{self, VolumeRecord};
use crate::registry::Registry;
use crate::supervisor;

mod lifecycle;
mod snapshots;
mod status;

pub use status::{MountFigures, VolumeInfo};

/// How long an Unmount waits for the mount process to upload what is pending and exit; past it
/// the upload goes on in the background (Docker gives up on a plugin call after 60 s).
pub const UNMOUNT_WAIT: Duration = Duration::from_secs(50);

/// Why a call failed; the message is what Docker shows the user.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(
        "store {store:?} ({spec}): {source} (`cairn store check '{spec}'` tests it from this host)"
    )]
    Store {
        store: String,
        spec: String,
        source: StoreError,
    },
    #[error("mounting volume {volume}: {message}")]
    Mount { volume: String, message: String },
    #[error("cairn's local state under {dir}: {message}")]
    Local { dir: PathBuf, message: String },
}

/// Whether Docker should treat volumes as cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Local,
    Global,
}

#[derive(Debug)]
pub(super) struct NamedStore {
    spec: StoreSpec,
    store: SharedStore,
    shared: bool,
    /// Whether the store honours conditional puts (checked on first need).
    honours_conditions: tokio::sync::OnceCell<bool>,
    /// The volume options volumes of this store get when created without them.
    defaults: BTreeMap<String, String>,
}

/// The driver: the stores, the registry and the mount processes of one daemon.
#[derive(Debug)]
pub struct Driver {
    state_dir: PathBuf,
    /// Where volumes are mounted (one folder each): the config's `mounts_dir`, or
    /// STATE_DIR/mounts.
    mounts_dir: PathBuf,
    /// The `cairn` binary the mount processes run.
    program: PathBuf,
    default_store: String,
    stores: BTreeMap<String, NamedStore>,
    registry: Registry,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// This host's name in leases.
    host_id: String,
    lease_ttl: Duration,
}

pub(super) fn local_error(dir: &Path, err: impl std::fmt::Display) -> DriverError {
    DriverError::Local {
        dir: dir.to_path_buf(),
        message: err.to_string(),
    }
}

/// Creates `dir` and its missing parents with mode 0700.
pub(super) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Removes a folder and all it holds (a missing one is fine), off the async workers.
pub(super) async fn remove_tree(dir: PathBuf) -> Result<(), DriverError> {
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(local_error(&dir, err)),
        _ => Ok(()),
    })
    .await
    .map_err(|e| DriverError::Local {
        dir: PathBuf::new(),
        message: e.to_string(),
    })?
}

impl Driver {
    /// Opens the stores the config names (creating the embedded one if it is the default) and
    /// the registry under `state_dir`. `program` is the `cairn` binary for mount processes.
    pub async fn open(
        config: &Config,
        state_dir: &Path,
        program: PathBuf,
    ) -> Result<Self, DriverError> {
        // Only root gets in: the registry, the caches (volume data) and the mount logs.
        let mounts_dir = config
            .mounts_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("mounts"));
        for dir in [&mounts_dir, &state_dir.join("volumes")] {
            private_dir(dir).map_err(|e| local_error(dir, e))?;
        }
        // Mountpoints are matched against the kernel's mount table, which has canonical paths.
        let mounts_dir =
            std::fs::canonicalize(&mounts_dir).map_err(|e| local_error(&mounts_dir, e))?;
        let state_dir = &std::fs::canonicalize(state_dir).map_err(|e| local_error(state_dir, e))?;
        let registry = Registry::open(&state_dir.join("registry.db"))
            .map_err(|e| local_error(state_dir, e))?;
        let mut specs = BTreeMap::new();
        for (name, store) in &config.stores {
            let spec: StoreSpec = store.spec.parse().map_err(|source| DriverError::Store {
                store: name.clone(),
                spec: store.spec.clone(),
                source,
            })?;
            if spec == StoreSpec::Memory {
                return Err(DriverError::Invalid(format!(
                    "store {name:?}: a memory store lives in one process and cannot hold volumes; \
                     use s3:// or dir://"
                )));
            }
            let shared = store.shared.unwrap_or(matches!(spec, StoreSpec::S3(_)));
            specs.insert(name.clone(), (spec, shared, store.default_options()));
        }
        if !specs.contains_key(&config.default_store) {
            if config.default_store != EMBEDDED_STORE {
                return Err(DriverError::Invalid(format!(
                    "default_store {:?} is not one of the configured stores ({})",
                    config.default_store,
                    specs.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            let root = state_dir.join("store");
            cairn_fs::store::dir::DirStore::create(&root).map_err(|source| DriverError::Store {
                store: EMBEDDED_STORE.into(),
                spec: StoreSpec::Dir(root.clone()).to_string(),
                source,
            })?;
            specs.insert(
                EMBEDDED_STORE.into(),
                (StoreSpec::Dir(root), false, BTreeMap::new()),
            );
        }
        let mut stores = BTreeMap::new();
        for (name, (spec, shared, defaults)) in specs {
            let store = open_store(&spec)
                .await
                .map_err(|source| DriverError::Store {
                    store: name.clone(),
                    spec: spec.to_string(),
                    source,
                })?;
            stores.insert(
                name,
                NamedStore {
                    spec,
                    store,
                    shared,
                    honours_conditions: tokio::sync::OnceCell::new(),
                    defaults,
                },
            );
        }
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            mounts_dir,
            program,
            default_store: config.default_store.clone(),
            stores,
            registry,
            locks: Mutex::new(HashMap::new()),
            host_id: config
                .host_id
                .clone()
                .unwrap_or_else(cairn_fs::lease::default_host_id),
            lease_ttl: Duration::from_secs(config.lease_ttl.max(1)),
        })
    }

    /// Looks at the mount processes a previous daemon left running: live ones are adopted,
    /// dead ones have their mountpoints cleaned up (and start again on the next Mount).
    pub async fn adopt(&self) -> Result<(), DriverError> {
        for record in self.registry(|r| r.volumes()).await? {
            let name = record.name.clone();
            let Some(process) = self.registry(move |r| r.process(&name)).await? else {
                continue;
            };
            if process.is_alive() {
                tracing::info!(volume = %record.name, pid = process.pid, "adopted a running mount process");
            } else {
                tracing::warn!(volume = %record.name, pid = process.pid, "the mount process died; its mount starts again on the next Mount");
                supervisor::clean_dead_mount(&process.mountpoint).await;
                let name = record.name.clone();
                self.registry(move |r| r.clear_process(&name)).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn registry<T, F>(&self, call: F) -> Result<T, DriverError>
    where
        T: Send + 'static,
        F: FnOnce(&Registry) -> rusqlite::Result<T> + Send + 'static,
    {
        let registry = self.registry.clone();
        let path = self.state_dir.join("registry.db");
        tokio::task::spawn_blocking(move || call(&registry))
            .await
            .map_err(|e| local_error(&path, e))?
            .map_err(|e| local_error(&path, e))
    }

    pub(super) fn lock(&self, name: &VolumeName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(name.to_string()).or_default())
    }

    pub(super) fn named_store(&self, name: &str) -> Result<&NamedStore, DriverError> {
        self.stores.get(name).ok_or_else(|| {
            DriverError::Invalid(format!(
                "unknown store {name:?}; the config names: {}",
                self.stores.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub(super) fn store_error(&self, name: &str) -> impl FnOnce(StoreError) -> DriverError {
        let store = name.to_string();
        let spec = self
            .stores
            .get(name)
            .map(|s| s.spec.to_string())
            .unwrap_or_default();
        move |source| DriverError::Store {
            store,
            spec,
            source,
        }
    }

    pub fn mountpoint(&self, name: &VolumeName) -> PathBuf {
        self.mounts_dir.join(name.as_str())
    }

    pub(super) fn volume_dir(&self, name: &VolumeName) -> PathBuf {
        self.state_dir.join("volumes").join(name.as_str())
    }

    /// The spec of the store folder a volume presents.
    pub(super) fn data_spec(
        &self,
        record: &VolumeRecord,
        options: &VolumeOptions,
    ) -> Result<StoreSpec, DriverError> {
        let store = self.named_store(options.store())?;
        Ok(store.spec.join(options.path().unwrap_or(&record.name)))
    }

    pub(super) fn options_of(&self, record: &VolumeRecord) -> Result<VolumeOptions, DriverError> {
        VolumeOptions::parse(&record.options, &self.default_store).map_err(|why| {
            DriverError::Invalid(format!(
                "volume {} has options this cairn does not take: {why}",
                record.name
            ))
        })
    }

    /// A volume's record: from the registry, else from whichever store has it.
    pub(super) async fn lookup(&self, name: &VolumeName) -> Result<VolumeRecord, DriverError> {
        let key = name.to_string();
        if let Some(record) = self.registry(move |r| r.volume(&key)).await? {
            return Ok(record);
        }
        for (store_name, store) in &self.stores {
            if let Some(record) = records::get(store.store.as_ref(), name)
                .await
                .map_err(self.store_error(store_name))?
            {
                let cached = record.clone();
                self.registry(move |r| r.put_volume(&cached)).await?;
                return Ok(record);
            }
        }
        Err(DriverError::NotFound(name.to_string()))
    }

    /// Global when every store is one that several hosts share.
    pub fn scope(&self) -> Scope {
        if self.stores.values().all(|s| s.shared) {
            Scope::Global
        } else {
            Scope::Local
        }
    }
}
