//! A volume's snapshots, the driver's side: flush the volume's mount here first, then let
//! [`crate::snapshots`] copy in the store.

use std::path::Path;
use std::time::{Duration, SystemTime};

use cairn_fs::store::StoreSpec;

use super::{Driver, DriverError};
use crate::names::VolumeName;
use crate::records::{self, VolumeRecord};
use crate::snapshots::Snapshot;

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

impl Driver {
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
        crate::snapshots::create(store.store.as_ref(), &name, &prefix, &snap)
            .await
            .map_err(self.store_error(options.store()))
    }

    /// The snapshots of a volume, oldest first.
    pub async fn snapshot_list(&self, volume: &str) -> Result<Vec<Snapshot>, DriverError> {
        let name = VolumeName::parse(volume).map_err(DriverError::Invalid)?;
        let record = self.lookup(&name).await?;
        let options = self.options_of(&record)?;
        let store = self.named_store(options.store())?;
        crate::snapshots::list(store.store.as_ref(), &name)
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
            from_store_defaults: source.from_store_defaults.clone(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        let parsed = self.options_of(&record)?;
        let store = self.named_store(parsed.store())?;
        if let StoreSpec::Dir(root) = self.data_spec(&record, &parsed)? {
            cairn_fs::store::dir::DirStore::create(&root)
                .map_err(self.store_error(parsed.store()))?;
        }
        let copied =
            crate::snapshots::restore(store.store.as_ref(), &name, &snap, &format!("{target}/"))
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
}
