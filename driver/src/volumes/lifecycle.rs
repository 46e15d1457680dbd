//! A volume's life: create, mount (one mount process per volume, on the first mount ID),
//! unmount (every change uploaded, on the last) and remove; and the lease checks they make.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use cairn_fs::store::{ErrorKind, StoreExt, StoreSpec, open_store};

use super::{Driver, DriverError, UNMOUNT_WAIT, local_error, private_dir, remove_tree};
use crate::names::{MountId, VolumeName};
use crate::options::{Access, VolumeOptions};
use crate::records::{self, VolumeRecord};
use crate::supervisor::{self, MountCommand};

fn show_options(options: &BTreeMap<String, String>) -> String {
    options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Driver {
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

    pub async fn create(
        &self,
        name: &str,
        given: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        // The store's defaults fill in what the Create does not say.
        let store_name = given.get("store").unwrap_or(&self.default_store);
        let defaults = self
            .stores
            .get(store_name)
            .map(|store| store.defaults.clone())
            .unwrap_or_default();
        let from_store_defaults: Vec<String> = defaults
            .keys()
            .filter(|option| !given.contains_key(*option))
            .cloned()
            .collect();
        let mut in_effect = defaults;
        in_effect.extend(given.clone());
        let options =
            VolumeOptions::parse(&in_effect, &self.default_store).map_err(DriverError::Invalid)?;
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
            from_store_defaults,
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
        // An expired lease of a host that died holding the volume goes with it, and so does
        // what is left of its fsync log (nothing after a clean unmount).
        let _ = store
            .store
            .delete(&cairn_fs::lease::lease_key(name.as_str()))
            .await;
        let fsync_log = cairn_fs::fsync_log::FsyncLog::new(Arc::clone(&store.store), name.as_str());
        if let Err(err) = fsync_log.delete_all().await {
            tracing::warn!("deleting the fsync log of volume {name}: {err}");
        }
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use crate::config::Config;
    use crate::volumes::{Driver, DriverError};

    /// A driver on the embedded dir store in a fresh state dir, whose mount processes would run
    /// `program`.
    async fn driver(program: &str) -> (Driver, tempfile::TempDir) {
        let state = tempfile::tempdir().unwrap();
        let driver = Driver::open(&Config::default(), state.path(), PathBuf::from(program))
            .await
            .unwrap();
        (driver, state)
    }

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A store's defaults fill in what a Create does not give, and Get says which options
    /// came from them; what the Create gives wins.
    #[tokio::test]
    async fn a_stores_defaults_fill_in_what_a_create_does_not_give() {
        let state = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let config = Config::parse(&format!(
            "default_store = \"d\"\n[stores.d]\nspec = \"dir://{}\"\n\
             [stores.d.defaults]\naccess = \"shared\"\nwriteback_delay = 0\n",
            store_dir.path().display()
        ))
        .unwrap();
        let driver = Driver::open(&config, state.path(), PathBuf::from("/bin/false"))
            .await
            .unwrap();
        driver.create("plain", &BTreeMap::new()).await.unwrap();
        let status = driver.get("plain").await.unwrap().status;
        assert_eq!(status["options"]["access"], "shared");
        assert_eq!(status["options"]["writeback_delay"], "0");
        assert_eq!(
            status["options_from_store_defaults"],
            serde_json::json!(["access", "writeback_delay"])
        );
        driver
            .create("mine", &options(&[("access", "readonly")]))
            .await
            .unwrap();
        let status = driver.get("mine").await.unwrap().status;
        assert_eq!(status["options"]["access"], "readonly");
        assert_eq!(
            status["options_from_store_defaults"],
            serde_json::json!(["writeback_delay"])
        );
        // Naming the volume again with no options is the same volume.
        driver.create("mine", &BTreeMap::new()).await.unwrap();
    }

    /// Create, Get, List and Remove as Docker calls them: a volume is there once created, a
    /// second create with the same options (or none) is the same volume, one with other options
    /// is refused, and after Remove it is gone.
    #[tokio::test]
    async fn a_volume_is_created_found_listed_and_removed() {
        let (driver, _state) = driver("/bin/false").await;
        let given = options(&[("writeback_delay", "1")]);
        driver.create("data", &given).await.unwrap();
        assert_eq!(driver.get("data").await.unwrap().name, "data");
        driver.create("data", &given).await.unwrap();
        driver.create("data", &BTreeMap::new()).await.unwrap();
        let other = driver
            .create("data", &options(&[("writeback_delay", "5")]))
            .await;
        assert!(matches!(other, Err(DriverError::Conflict(_))), "{other:?}");
        let listed: Vec<String> = driver
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(listed, ["data"]);

        driver.remove("data").await.unwrap();
        assert!(matches!(
            driver.get("data").await,
            Err(DriverError::NotFound(_))
        ));
        assert!(matches!(
            driver.remove("data").await,
            Err(DriverError::NotFound(_))
        ));
        assert!(driver.list().await.unwrap().is_empty());
    }

    /// Bad input gets a clear error and makes nothing.
    #[tokio::test]
    async fn bad_names_and_options_are_refused_and_make_nothing() {
        let (driver, _state) = driver("/bin/false").await;
        for name in ["", "../etc", "a/b", ".hidden"] {
            let made = driver.create(name, &BTreeMap::new()).await;
            assert!(
                matches!(made, Err(DriverError::Invalid(_))),
                "{name:?}: {made:?}"
            );
        }
        let made = driver.create("vol", &options(&[("colour", "blue")])).await;
        let Err(DriverError::Invalid(message)) = made else {
            panic!("an unknown option is refused: {made:?}");
        };
        assert!(message.contains("colour"), "{message}");
        let made = driver
            .create("vol", &options(&[("store", "nowhere")]))
            .await;
        assert!(matches!(made, Err(DriverError::Invalid(_))), "{made:?}");
        assert!(driver.list().await.unwrap().is_empty());
    }

    /// A Mount whose mount process cannot start says so and counts no mount ID: the volume is
    /// not left "in use", so Remove works.
    #[tokio::test]
    async fn a_mount_that_fails_to_start_leaves_the_volume_unused() {
        let (driver, _state) = driver("/nonexistent/cairn").await;
        driver.create("vol", &BTreeMap::new()).await.unwrap();
        let mounted = driver.mount("vol", "container-1").await;
        assert!(
            matches!(mounted, Err(DriverError::Mount { .. })),
            "{mounted:?}"
        );
        let status = driver.get("vol").await.unwrap().status;
        assert_eq!(status["mounts"], 0);
        assert_eq!(status["mounted"], false);
        driver.remove("vol").await.unwrap();
    }

    /// Unmount of an ID that was never mounted is not an error (Docker retries unmounts).
    #[tokio::test]
    async fn an_unmount_of_an_unknown_id_is_harmless() {
        let (driver, _state) = driver("/bin/false").await;
        driver.create("vol", &BTreeMap::new()).await.unwrap();
        driver.unmount("vol", "never-mounted").await.unwrap();
        assert_eq!(driver.get("vol").await.unwrap().status["mounts"], 0);
    }
}
