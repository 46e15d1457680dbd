//! What Get, List and the metrics endpoint show of volumes: records, options, lease, mounts,
//! and what each mount process says of its uploads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_fs::control::Request;
use cairn_fs::control::client::ask;
use cairn_fs::metrics::MetricsSnapshot;
use serde_json::{Value, json};

use super::{Driver, DriverError};
use crate::names::VolumeName;
use crate::records::{self, VolumeRecord};

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

/// A volume as Get and List describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub mountpoint: PathBuf,
    pub created_at: String,
    pub status: BTreeMap<String, Value>,
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
    pub async fn get(&self, name: &str) -> Result<VolumeInfo, DriverError> {
        let name = VolumeName::parse(name).map_err(DriverError::Invalid)?;
        let record = self.lookup(&name).await?;
        let mut info = self.describe(&record);
        info.status = self.status(&name, &record).await?;
        Ok(info)
    }

    pub(super) fn describe(&self, record: &VolumeRecord) -> VolumeInfo {
        VolumeInfo {
            name: record.name.clone(),
            mountpoint: self.mounts_dir.join(&record.name),
            created_at: record.created_at.clone(),
            status: BTreeMap::new(),
        }
    }

    pub(super) async fn status(
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
        if !record.from_store_defaults.is_empty() {
            status.insert(
                "options_from_store_defaults".into(),
                json!(record.from_store_defaults),
            );
        }
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
}
