//! The volume driver's logic behind each protocol call: volumes are created as records in their
//! store (and cached in the registry), mounted by starting one mount process per volume on the
//! first mount ID, and unmounted (with every change uploaded) on the last.
//!
//! Calls on one volume are serialized by a per-volume lock, so a storm of concurrent Mounts starts
//! one process and counts every ID.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cairn_fs::control::Request;
use cairn_fs::control::client::ask;
use cairn_fs::metrics::MetricsSnapshot;
use cairn_fs::store::{ErrorKind, SharedStore, StoreError, StoreExt, StoreSpec, open_store};
use serde_json::{Value, json};

use crate::config::{Config, EMBEDDED_STORE};
use crate::names::{MountId, VolumeName};
use crate::options::{Access, VolumeOptions};
use crate::records::{self, VolumeRecord};
use crate::registry::Registry;
use crate::snapshots::{self, Snapshot};
use crate::supervisor::{self, MountCommand};

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

/// A volume as Get and List describe it.
/// What one mounted volume is doing: its mount process's upload status and counters, and the
/// disk its cache takes.
#[derive(Debug, Clone, PartialEq)]
pub struct MountFigures {
    pub volume: String,
    /// The mount's `status` answer (JSON), or null if it did not answer.
    pub status: Value,
    pub counters: MetricsSnapshot,
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub mountpoint: PathBuf,
    pub created_at: String,
    pub status: BTreeMap<String, Value>,
}

/// Whether Docker should treat volumes as cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Local,
    Global,
}

#[derive(Debug)]
struct NamedStore {
    spec: StoreSpec,
    store: SharedStore,
    shared: bool,
    /// Whether the store honours conditional puts (checked on first need).
    honours_conditions: tokio::sync::OnceCell<bool>,
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

fn local_error(dir: &Path, err: impl std::fmt::Display) -> DriverError {
    DriverError::Local {
        dir: dir.to_path_buf(),
        message: err.to_string(),
    }
}

/// Creates `dir` and its missing parents with mode 0700.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Bytes the files under `dir` take on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_usage(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
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
            specs.insert(name.clone(), (spec, shared));
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
            specs.insert(EMBEDDED_STORE.into(), (StoreSpec::Dir(root), false));
        }
        let mut stores = BTreeMap::new();
        for (name, (spec, shared)) in specs {
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

    async fn registry<T, F>(&self, call: F) -> Result<T, DriverError>
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

    fn lock(&self, name: &VolumeName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(name.to_string()).or_default())
    }

    fn named_store(&self, name: &str) -> Result<&NamedStore, DriverError> {
        self.stores.get(name).ok_or_else(|| {
            DriverError::Invalid(format!(
                "unknown store {name:?}; the config names: {}",
                self.stores.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    fn store_error(&self, name: &str) -> impl FnOnce(StoreError) -> DriverError {
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

    fn volume_dir(&self, name: &VolumeName) -> PathBuf {
        self.state_dir.join("volumes").join(name.as_str())
    }

    /// The spec of the store folder a volume presents.
    fn data_spec(
        &self,
        record: &VolumeRecord,
        options: &VolumeOptions,
    ) -> Result<StoreSpec, DriverError> {
        let store = self.named_store(options.store())?;
        Ok(store.spec.join(options.path().unwrap_or(&record.name)))
    }

    fn options_of(&self, record: &VolumeRecord) -> Result<VolumeOptions, DriverError> {
        VolumeOptions::parse(&record.options, &self.default_store).map_err(|why| {
            DriverError::Invalid(format!(
                "volume {} has options this cairn does not take: {why}",
                record.name
            ))
        })
    }

    /// Refuses `access=exclusive` on a store that ignores conditional puts: a lease there would
    /// protect nothing.
    async fn check_exclusive(&self, store_name: &str) -> Result<(), DriverError> {
        let store = self.named_store(store_name)?;
        let honours = store
            .honours_conditions
            .get_or_try_init(|| cairn_fs::lease::store_honours_conditions(&store.store))
            .await
            .map_err(self.store_error(store_name))?;
        if *honours {
            return Ok(());
        }
        Err(DriverError::Invalid(format!(
            "store {store_name:?} ignores conditional puts (a second If-None-Match: * put of one \
             key succeeded), so an exclusive lease there would protect nothing: use \
             -o access=shared (several hosts may write, the last writer wins) or \
             -o access=readonly, or a store that honours conditional puts"
        )))
    }

    /// Refuses early, with the holder's name, a Mount of a volume another host holds.
    async fn check_lease(
        &self,
        name: &VolumeName,
        options: &VolumeOptions,
    ) -> Result<(), DriverError> {
        let store = self.named_store(options.store())?;
        let key = cairn_fs::lease::lease_key(name.as_str());
        let current = cairn_fs::lease::read(&store.store, &key)
            .await
            .map_err(|e| DriverError::Conflict(format!("volume {name}: {e}")))?;
        match current {
            Some((record, _)) if record.is_live() && record.host != self.host_id => {
                Err(DriverError::Conflict(format!(
                    "volume {name} is in use by {}; this is host {}: stop the volume's container \
                     there (or, if that host is gone, wait until the lease expires)",
                    record.describe(),
                    self.host_id
                )))
            }
            _ => Ok(()),
        }
    }

    /// A volume's record: from the registry, else from whichever store has it.
    async fn lookup(&self, name: &VolumeName) -> Result<VolumeRecord, DriverError> {
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

    pub async fn create(
        &self,
        name: &str,
        given: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        let options =
            VolumeOptions::parse(given, &self.default_store).map_err(DriverError::Invalid)?;
        let store = self.named_store(options.store())?;
        if options.access() == Access::Exclusive {
            self.check_exclusive(options.store()).await?;
        }
        let lock = self.lock(&name);
        let _held = lock.lock().await;
        let same_as = |existing: &VolumeRecord| {
            // No options at all: Docker naming a volume that exists (on another host, or restored
            // from a snapshot) with --volume-driver; it is used as it is.
            if &existing.options == options.as_map() || given.is_empty() {
                Ok(())
            } else {
                Err(DriverError::Conflict(format!(
                    "volume {name} exists with other options ({}); remove it first or create it \
                     with the same options",
                    show_options(&existing.options)
                )))
            }
        };
        match self.lookup(&name).await {
            Ok(existing) => return same_as(&existing),
            Err(DriverError::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
        let record = VolumeRecord {
            name: name.to_string(),
            options: options.as_map().clone(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        if let StoreSpec::Dir(root) = self.data_spec(&record, &options)? {
            cairn_fs::store::dir::DirStore::create(&root)
                .map_err(self.store_error(options.store()))?;
        }
        if let Some(existing) = records::create(store.store.as_ref(), &record)
            .await
            .map_err(self.store_error(options.store()))?
        {
            // Another host created it a moment ago.
            let cached = existing.clone();
            self.registry(move |r| r.put_volume(&cached)).await?;
            return same_as(&existing);
        }
        self.registry(move |r| r.put_volume(&record)).await
    }

    pub async fn remove(&self, name: &str) -> Result<(), DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        let lock = self.lock(&name);
        let _held = lock.lock().await;
        let record = self.lookup(&name).await?;
        let options = self.options_of(&record)?;
        let key = name.to_string();
        let in_use = self.registry(move |r| r.mount_count(&key)).await?;
        if in_use > 0 {
            return Err(DriverError::Conflict(format!(
                "volume {name} is in use by {in_use} container mount(s); stop them first"
            )));
        }
        if options.access() == Access::Exclusive {
            self.check_lease(&name, &options).await?;
        }
        let key = name.to_string();
        if let Some(process) = self.registry(move |r| r.process(&key)).await? {
            if !supervisor::stop(&process, UNMOUNT_WAIT).await {
                return Err(DriverError::Conflict(format!(
                    "volume {name} is still uploading its last changes (mount process {}); try \
                     again when it has finished",
                    process.pid
                )));
            }
            supervisor::clean_dead_mount(&process.mountpoint).await;
        }
        // Data the volume only presents (option path) was there before it and stays.
        if options.path().is_none() {
            self.delete_data(&record, &options).await?;
        }
        let store = self.named_store(options.store())?;
        // An expired lease of a host that died holding the volume goes with it.
        let _ = store
            .store
            .delete(&cairn_fs::lease::lease_key(name.as_str()))
            .await;
        match records::delete(store.store.as_ref(), &name).await {
            Err(err) if err.kind() != ErrorKind::NotFound => {
                return Err(self.store_error(options.store())(err));
            }
            _ => {}
        }
        let key = name.to_string();
        self.registry(move |r| r.forget_volume(&key)).await?;
        for dir in [self.volume_dir(&name), self.mountpoint(&name)] {
            remove_tree(dir).await?;
        }
        Ok(())
    }

    /// Deletes every object of a volume's own folder in its store.
    async fn delete_data(
        &self,
        record: &VolumeRecord,
        options: &VolumeOptions,
    ) -> Result<(), DriverError> {
        let spec = self.data_spec(record, options)?;
        if let StoreSpec::Dir(root) = &spec
            && !root.exists()
        {
            return Ok(());
        }
        let store = open_store(&spec)
            .await
            .map_err(self.store_error(options.store()))?;
        let listing = store
            .list_all("", false)
            .await
            .map_err(self.store_error(options.store()))?;
        let keys: Vec<String> = listing.objects.into_iter().map(|o| o.key).collect();
        for chunk in keys.chunks(1000) {
            store
                .delete_many(chunk)
                .await
                .map_err(self.store_error(options.store()))?;
        }
        if let StoreSpec::Dir(root) = spec {
            // The store's own bookkeeping (locks, sidecars) goes with the folder.
            remove_tree(root).await?;
        }
        Ok(())
    }

    pub async fn mount(&self, name: &str, id: &str) -> Result<PathBuf, DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        let id = MountId::parse(id).map_err(DriverError::Invalid)?;
        let lock = self.lock(&name);
        let _held = lock.lock().await;
        let record = self.lookup(&name).await?;
        let options = self.options_of(&record)?;
        let key = name.to_string();
        let id_key = id.as_str().to_string();
        self.registry(move |r| r.add_mount(&key, &id_key)).await?;
        match self.ensure_mounted(&name, &record, &options).await {
            Ok(mountpoint) => Ok(mountpoint),
            Err(err) => {
                let key = name.to_string();
                let id_key = id.as_str().to_string();
                self.registry(move |r| r.remove_mount(&key, &id_key))
                    .await?;
                Err(err)
            }
        }
    }

    /// Makes sure a live mount process serves the volume, starting one if needed.
    async fn ensure_mounted(
        &self,
        name: &VolumeName,
        record: &VolumeRecord,
        options: &VolumeOptions,
    ) -> Result<PathBuf, DriverError> {
        let mountpoint = self.mountpoint(name);
        let key = name.to_string();
        if let Some(process) = self.registry(move |r| r.process(&key)).await? {
            if process.is_serving() {
                return Ok(mountpoint);
            }
            // Dead, or still finishing an earlier unmount: let it end, then clean up after it.
            if !supervisor::stop(&process, UNMOUNT_WAIT).await {
                return Err(DriverError::Mount {
                    volume: name.to_string(),
                    message: format!(
                        "the previous mount process ({}) is still uploading; try again shortly",
                        process.pid
                    ),
                });
            }
            supervisor::clean_dead_mount(&process.mountpoint).await;
            let key = name.to_string();
            self.registry(move |r| r.clear_process(&key)).await?;
        } else {
            // A mount left by a process the registry lost track of.
            supervisor::clean_dead_mount(&mountpoint).await;
        }
        let volume_dir = self.volume_dir(name);
        let mut flags = options.mount_flags();
        if options.access() == Access::Exclusive {
            self.check_exclusive(options.store()).await?;
            self.check_lease(name, options).await?;
            let store = self.named_store(options.store())?;
            flags.extend([
                "--lease-store".to_string(),
                store.spec.to_string(),
                "--lease-name".to_string(),
                name.to_string(),
                "--host-id".to_string(),
                self.host_id.clone(),
                "--lease-ttl".to_string(),
                self.lease_ttl.as_secs().to_string(),
            ]);
        }
        let command = MountCommand {
            program: self.program.clone(),
            state_dir: self.state_dir.clone(),
            spec: self.data_spec(record, options)?.to_string(),
            mountpoint: mountpoint.clone(),
            cache_dir: volume_dir.join("cache"),
            log: volume_dir.join("mount.log"),
            flags,
        };
        private_dir(&volume_dir).map_err(|e| local_error(&volume_dir, e))?;
        let process = supervisor::start(&command)
            .await
            .map_err(|message| DriverError::Mount {
                volume: name.to_string(),
                message,
            })?;
        tracing::info!(volume = %name, pid = process.pid, "mounted");
        let key = name.to_string();
        self.registry(move |r| r.set_process(&key, &process))
            .await?;
        Ok(mountpoint)
    }

    pub async fn unmount(&self, name: &str, id: &str) -> Result<(), DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        let id = MountId::parse(id).map_err(DriverError::Invalid)?;
        let lock = self.lock(&name);
        let _held = lock.lock().await;
        // No record lookup: a volume another host removed meanwhile must still unmount here.
        let key = name.to_string();
        let remaining = self
            .registry(move |r| r.remove_mount(&key, id.as_str()))
            .await?;
        if remaining > 0 {
            return Ok(());
        }
        let key = name.to_string();
        let Some(process) = self.registry(move |r| r.process(&key)).await? else {
            return Ok(());
        };
        if supervisor::stop(&process, UNMOUNT_WAIT).await {
            supervisor::clean_dead_mount(&process.mountpoint).await;
            let key = name.to_string();
            self.registry(move |r| r.clear_process(&key)).await?;
            tracing::info!(volume = %name, "unmounted; every change is in the store");
        } else {
            tracing::warn!(volume = %name, pid = process.pid, "still uploading after the unmount; it goes on in the background");
        }
        Ok(())
    }

    pub async fn path(&self, name: &str) -> Result<PathBuf, DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        self.lookup(&name).await?;
        Ok(self.mountpoint(&name))
    }

    pub async fn get(&self, name: &str) -> Result<VolumeInfo, DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        let record = self.lookup(&name).await?;
        let mut info = self.describe(&record);
        info.status = self.status(&name, &record).await?;
        Ok(info)
    }

    fn describe(&self, record: &VolumeRecord) -> VolumeInfo {
        VolumeInfo {
            name: record.name.clone(),
            mountpoint: self.mounts_dir.join(&record.name),
            created_at: record.created_at.clone(),
            status: BTreeMap::new(),
        }
    }

    async fn status(
        &self,
        name: &VolumeName,
        record: &VolumeRecord,
    ) -> Result<BTreeMap<String, Value>, DriverError> {
        let options = self.options_of(record)?;
        let mut status = BTreeMap::new();
        status.insert(
            "store".into(),
            json!(self.data_spec(record, &options)?.to_string()),
        );
        status.insert("options".into(), json!(record.options));
        status.insert("host".into(), json!(self.host_id));
        let store = self.named_store(options.store())?;
        let key = cairn_fs::lease::lease_key(name.as_str());
        if let Ok(Some((lease, _))) = cairn_fs::lease::read(&store.store, &key).await {
            let state = if lease.is_live() { "" } else { ", expired" };
            status.insert(
                "lease".into(),
                json!(format!("{}{state}", lease.describe())),
            );
        }
        let key = name.to_string();
        let mounts = self.registry(move |r| r.mount_count(&key)).await?;
        status.insert("mounts".into(), json!(mounts));
        let key = name.to_string();
        let process = self.registry(move |r| r.process(&key)).await?;
        let serving = process.as_ref().filter(|p| p.is_serving());
        status.insert("mounted".into(), json!(serving.is_some()));
        if let Some(process) = serving {
            status.insert("pid".into(), json!(process.pid));
            if let Some(Value::Object(uploads)) = ask(&process.mountpoint, Request::Status).await {
                status.extend(uploads);
            }
        }
        let cache = self.volume_dir(name).join("cache");
        let cache_bytes = tokio::task::spawn_blocking(move || disk_usage(&cache))
            .await
            .unwrap_or(0);
        status.insert("cache_bytes".into(), json!(cache_bytes));
        Ok(status)
    }

    /// Every volume: the stores' records (each store's view replaces what the registry had;
    /// an unreachable store is answered from the registry).
    pub async fn list(&self) -> Result<Vec<VolumeInfo>, DriverError> {
        let known = self.registry(|r| r.volumes()).await?;
        let mut volumes = BTreeMap::new();
        for (store_name, store) in &self.stores {
            match records::list(store.store.as_ref()).await {
                Ok(records) => {
                    for record in &records {
                        let cached = record.clone();
                        self.registry(move |r| r.put_volume(&cached)).await?;
                    }
                    self.forget_removed_elsewhere(store_name, &known, &records)
                        .await?;
                    volumes.extend(records.into_iter().map(|r| (r.name.clone(), r)));
                }
                Err(err) => {
                    tracing::warn!(store = %store_name, "cannot list volumes, showing the last known: {err}");
                    volumes.extend(
                        known
                            .iter()
                            .filter(|r| r.options.get("store") == Some(store_name))
                            .map(|r| (r.name.clone(), r.clone())),
                    );
                }
            }
        }
        let mut described = Vec::with_capacity(volumes.len());
        for record in volumes.values() {
            let mut info = self.describe(record);
            if let Ok(name) = VolumeName::parse(&record.name) {
                info.status = self.status(&name, record).await?;
            }
            described.push(info);
        }
        Ok(described)
    }

    /// What every volume mounted here is doing, for the metrics endpoint: asked of the mount
    /// processes and the local disk only, never of the store.
    pub async fn mounted_figures(&self) -> Result<Vec<MountFigures>, DriverError> {
        let mut figures = Vec::new();
        for record in self.registry(|r| r.volumes()).await? {
            let key = record.name.clone();
            let Some(process) = self.registry(move |r| r.process(&key)).await? else {
                continue;
            };
            if !process.is_serving() {
                continue;
            }
            let status = ask(&process.mountpoint, Request::Status).await;
            let counters = ask(&process.mountpoint, Request::Metrics)
                .await
                .and_then(|value| serde_json::from_value(value).ok());
            let Ok(name) = VolumeName::parse(&record.name) else {
                continue;
            };
            let cache = self.volume_dir(&name).join("cache");
            let cache_bytes = tokio::task::spawn_blocking(move || disk_usage(&cache))
                .await
                .unwrap_or(0);
            figures.push(MountFigures {
                volume: record.name,
                status: status.unwrap_or(Value::Null),
                counters: counters.unwrap_or_default(),
                cache_bytes,
            });
        }
        Ok(figures)
    }

    /// Drops registry entries of `store_name` whose records another host removed (unless mounted
    /// here).
    async fn forget_removed_elsewhere(
        &self,
        store_name: &str,
        known: &[VolumeRecord],
        present: &[VolumeRecord],
    ) -> Result<(), DriverError> {
        for record in known {
            if record.options.get("store").map(String::as_str) != Some(store_name)
                || present.iter().any(|p| p.name == record.name)
            {
                continue;
            }
            let key = record.name.clone();
            if self.registry(move |r| r.mount_count(&key)).await? == 0 {
                let key = record.name.clone();
                self.registry(move |r| r.forget_volume(&key)).await?;
            }
        }
        Ok(())
    }

    /// Takes snapshot `snapshot` of a volume: what the store holds of it, after uploading what
    /// its mount on this host has not yet (a mount on another host is not waited for).
    pub async fn snapshot_create(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<Snapshot, DriverError> {
        let name = VolumeName::parse(volume).map_err(DriverError::Invalid)?;
        let snap = snapshot_name(snapshot)?;
        let record = self.lookup(&name).await?;
        let options = self.options_of(&record)?;
        let key = name.to_string();
        if let Some(process) = self.registry(move |r| r.process(&key)).await?
            && process.is_serving()
        {
            flush_mount(&process.mountpoint)
                .await
                .map_err(|message| DriverError::Mount {
                    volume: name.to_string(),
                    message: format!("uploading before the snapshot: {message}"),
                })?;
        }
        let store = self.named_store(options.store())?;
        let prefix = format!("{}/", options.path().unwrap_or(name.as_str()));
        snapshots::create(store.store.as_ref(), &name, &prefix, &snap)
            .await
            .map_err(self.store_error(options.store()))
    }

    /// The snapshots of a volume, oldest first.
    pub async fn snapshot_list(&self, volume: &str) -> Result<Vec<Snapshot>, DriverError> {
        let name = VolumeName::parse(volume).map_err(DriverError::Invalid)?;
        let record = self.lookup(&name).await?;
        let options = self.options_of(&record)?;
        let store = self.named_store(options.store())?;
        snapshots::list(store.store.as_ref(), &name)
            .await
            .map_err(self.store_error(options.store()))
    }

    /// Makes a new volume `target` (same store and options, its own folder) from a snapshot.
    pub async fn snapshot_restore(
        &self,
        volume: &str,
        snapshot: &str,
        target: &str,
    ) -> Result<(u64, u64), DriverError> {
        let name = VolumeName::parse(volume).map_err(DriverError::Invalid)?;
        let snap = snapshot_name(snapshot)?;
        let target = VolumeName::parse(target).map_err(DriverError::Invalid)?;
        let source = self.lookup(&name).await?;
        match self.lookup(&target).await {
            Ok(_) => {
                return Err(DriverError::Conflict(format!(
                    "volume {target} exists: restore into a new volume name"
                )));
            }
            Err(DriverError::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
        let mut options = source.options.clone();
        options.remove("path");
        let record = VolumeRecord {
            name: target.to_string(),
            options,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        let parsed = self.options_of(&record)?;
        let store = self.named_store(parsed.store())?;
        if let StoreSpec::Dir(root) = self.data_spec(&record, &parsed)? {
            cairn_fs::store::dir::DirStore::create(&root)
                .map_err(self.store_error(parsed.store()))?;
        }
        let copied = snapshots::restore(store.store.as_ref(), &name, &snap, &format!("{target}/"))
            .await
            .map_err(self.store_error(parsed.store()))?;
        // The record last: the volume appears once its data is all there.
        if records::create(store.store.as_ref(), &record)
            .await
            .map_err(self.store_error(parsed.store()))?
            .is_some()
        {
            return Err(DriverError::Conflict(format!(
                "volume {target} was created meanwhile; its data may now be mixed with the snapshot's"
            )));
        }
        Ok(copied)
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

/// Removes a folder and all it holds (a missing one is fine), off the async workers.
async fn remove_tree(dir: PathBuf) -> Result<(), DriverError> {
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

/// A snapshot name: the rules of a volume name.
fn snapshot_name(text: &str) -> Result<VolumeName, DriverError> {
    VolumeName::parse(text)
        .map_err(|why| DriverError::Invalid(why.replace("volume name", "snapshot name")))
}

/// Asks the mount process on `mountpoint` to upload everything, and waits until it has (at
/// most ten minutes).
async fn flush_mount(mountpoint: &Path) -> Result<(), String> {
    let flushed = cairn_fs::control::client::flush(mountpoint, |_| {});
    match tokio::time::timeout(Duration::from_secs(600), flushed).await {
        Ok(flushed) => flushed.map_err(|e| e.to_string()),
        Err(_) => Err("not done after 10 minutes".into()),
    }
}

fn show_options(options: &BTreeMap<String, String>) -> String {
    options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
