//! Volume records in the store, under `.cairn/volumes/NAME`: a volume's options and creation
//! time, kept beside its data so that every host pointed at the store sees the same volumes.

use std::collections::BTreeMap;

use bytes::Bytes;
use cairn_fs::store::{PutCondition, PutOptions, Store, StoreError, StoreExt};
use serde::{Deserialize, Serialize};

use crate::names::VolumeName;

/// Where the records live in a store.
pub const RECORDS_PREFIX: &str = ".cairn/volumes/";

/// What the store keeps of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// The options the volume was created with, `store` included, and those its store's
    /// defaults gave it.
    pub options: BTreeMap<String, String>,
    /// Which of `options` came from the store's defaults (the rest were given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_store_defaults: Vec<String>,
    /// RFC 3339, as Docker shows it.
    pub created_at: String,
}

fn key(name: &VolumeName) -> String {
    format!("{RECORDS_PREFIX}{name}")
}

fn decode(key: &str, body: &[u8]) -> Result<VolumeRecord, StoreError> {
    serde_json::from_slice(body).map_err(|err| {
        StoreError::other(format!(
            "the volume record {key} is damaged ({err}); remove it from the store to forget the volume"
        ))
    })
}

/// Writes `record` unless the store already has one for the name; returns the one that is there.
pub async fn create(
    store: &dyn Store,
    record: &VolumeRecord,
) -> Result<Option<VolumeRecord>, StoreError> {
    let name = VolumeName::parse(&record.name).map_err(StoreError::invalid)?;
    let body = serde_json::to_vec_pretty(record).map_err(|e| StoreError::other(e.to_string()))?;
    let options = PutOptions {
        condition: PutCondition::IfAbsent,
        ..PutOptions::default()
    };
    match store.put(&key(&name), Bytes::from(body), options).await {
        Ok(_) => Ok(None),
        Err(err) if err.kind() == cairn_fs::store::ErrorKind::PreconditionFailed => {
            get(store, &name).await
        }
        Err(err) => Err(err),
    }
}

/// The record of one volume, if the store has it.
pub async fn get(store: &dyn Store, name: &VolumeName) -> Result<Option<VolumeRecord>, StoreError> {
    let key = key(name);
    match store.get_all(&key).await {
        Ok((_, body)) => decode(&key, &body).map(Some),
        Err(err) if err.kind() == cairn_fs::store::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Every volume record in the store (records whose names are not volume names are skipped).
pub async fn list(store: &dyn Store) -> Result<Vec<VolumeRecord>, StoreError> {
    let listing = store.list_all(RECORDS_PREFIX, true).await?;
    let mut records = Vec::new();
    for object in listing.objects {
        let Ok(name) = VolumeName::parse(&object.key[RECORDS_PREFIX.len()..]) else {
            continue;
        };
        if let Some(record) = get(store, &name).await? {
            records.push(record);
        }
    }
    Ok(records)
}

pub async fn delete(store: &dyn Store, name: &VolumeName) -> Result<(), StoreError> {
    store.delete(&key(name)).await
}

#[cfg(test)]
mod tests {
    use cairn_fs::store::memory::MemoryStore;

    use super::*;

    fn record(name: &str, size: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            options: [("cache_size".to_string(), size.to_string())].into(),
            from_store_defaults: Vec::new(),
            created_at: "2026-11-23T17:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn the_first_record_of_a_name_wins() {
        let store = MemoryStore::new();
        assert_eq!(create(&store, &record("db", "1G")).await.unwrap(), None);
        let existing = create(&store, &record("db", "2G")).await.unwrap();
        assert_eq!(existing, Some(record("db", "1G")));
        create(&store, &record("web", "1G")).await.unwrap();
        let names: Vec<String> = list(&store)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["db", "web"]);
        delete(&store, &VolumeName::parse("db").unwrap())
            .await
            .unwrap();
        assert_eq!(
            get(&store, &VolumeName::parse("db").unwrap())
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn a_damaged_record_says_how_to_recover() {
        let store = MemoryStore::new();
        store
            .put(
                ".cairn/volumes/db",
                Bytes::from_static(b"{not json"),
                PutOptions::default(),
            )
            .await
            .unwrap();
        let err = get(&store, &VolumeName::parse("db").unwrap())
            .await
            .unwrap_err();
        assert!(err.message().contains("remove it"), "{err}");
    }
}
