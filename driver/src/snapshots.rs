//! Point-in-time copies of a volume inside its store: `.cairn/snapshots/VOLUME/NAME/data/...`
//! holds a server-side copy of every object of the volume, and `manifest` (written last, so a
//! snapshot exists only once it is whole) says when and how much. Restoring copies them back
//! into another volume's folder.

use bytes::Bytes;
use cairn_fs::store::{ErrorKind, PutCondition, PutOptions, Store, StoreError, StoreExt};
use futures::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};

use crate::names::VolumeName;

/// Copies in flight at once.
const COPIES_IN_FLIGHT: usize = 8;

/// What a snapshot's manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub volume: String,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    pub objects: u64,
    pub bytes: u64,
}

fn root(volume: &VolumeName) -> String {
    format!(".cairn/snapshots/{volume}/")
}

fn data(volume: &VolumeName, name: &VolumeName) -> String {
    format!("{}{name}/data/", root(volume))
}

fn manifest(volume: &VolumeName, name: &VolumeName) -> String {
    format!("{}{name}/manifest", root(volume))
}

/// Copies every object under `from` to the same key under `to`, inside the store; returns how
/// many objects and bytes.
async fn copy_tree(store: &dyn Store, from: &str, to: &str) -> Result<(u64, u64), StoreError> {
    let listing = store.list_all(from, false).await?;
    let bytes = listing.objects.iter().map(|o| o.size).sum();
    let count = listing.objects.len() as u64;
    stream::iter(listing.objects)
        .map(|object| async move {
            let target = format!("{to}{}", &object.key[from.len()..]);
            store.copy(&object.key, &target, None).await.map(|_| ())
        })
        .buffer_unordered(COPIES_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok((count, bytes))
}

/// Takes snapshot `name` of the volume whose objects are under `data_prefix`.
pub async fn create(
    store: &dyn Store,
    volume: &VolumeName,
    data_prefix: &str,
    name: &VolumeName,
) -> Result<Snapshot, StoreError> {
    if store.head_opt(&manifest(volume, name)).await?.is_some() {
        return Err(StoreError::new(
            ErrorKind::PreconditionFailed,
            format!("volume {volume} already has a snapshot {name}: pick another name"),
        ));
    }
    let (objects, bytes) = copy_tree(store, data_prefix, &data(volume, name)).await?;
    let snapshot = Snapshot {
        volume: volume.to_string(),
        name: name.to_string(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        objects,
        bytes,
    };
    let body = serde_json::to_vec_pretty(&snapshot).expect("a manifest serializes");
    let once = PutOptions {
        condition: PutCondition::IfAbsent,
        ..PutOptions::default()
    };
    store
        .put(&manifest(volume, name), Bytes::from(body), once)
        .await?;
    Ok(snapshot)
}

/// The volume's whole snapshots, oldest first.
pub async fn list(store: &dyn Store, volume: &VolumeName) -> Result<Vec<Snapshot>, StoreError> {
    let listing = store.list_all(&root(volume), true).await?;
    let mut snapshots = Vec::new();
    for prefix in listing.prefixes {
        let key = format!("{prefix}manifest");
        match store.get_all(&key).await {
            Ok((_, body)) => {
                if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(&body) {
                    snapshots.push(snapshot);
                }
            }
            // Being taken, or abandoned half way: not a snapshot.
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    snapshots.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    Ok(snapshots)
}

/// Copies snapshot `name` of `volume` into `target_prefix` (a new volume's folder).
pub async fn restore(
    store: &dyn Store,
    volume: &VolumeName,
    name: &VolumeName,
    target_prefix: &str,
) -> Result<(u64, u64), StoreError> {
    if store.head_opt(&manifest(volume, name)).await?.is_none() {
        return Err(StoreError::new(
            ErrorKind::NotFound,
            format!(
                "volume {volume} has no snapshot {name}: `cairn snapshot ls {volume}` lists them"
            ),
        ));
    }
    copy_tree(store, &data(volume, name), target_prefix).await
}

#[cfg(test)]
mod tests {
    use cairn_fs::store::memory::MemoryStore;

    use super::*;

    fn name(text: &str) -> VolumeName {
        VolumeName::parse(text).unwrap()
    }

    #[tokio::test]
    async fn a_snapshot_is_a_copy_that_later_changes_do_not_touch() {
        let store = MemoryStore::new();
        for (key, body) in [("db/a", "1"), ("db/dir/b", "22")] {
            store
                .put(key, Bytes::from(body), PutOptions::default())
                .await
                .unwrap();
        }
        let taken = create(&store, &name("db"), "db/", &name("monday"))
            .await
            .unwrap();
        assert_eq!((taken.objects, taken.bytes), (2, 3));
        store
            .put("db/a", Bytes::from("changed"), PutOptions::default())
            .await
            .unwrap();
        let again = create(&store, &name("db"), "db/", &name("monday")).await;
        assert!(again.unwrap_err().message().contains("already has"));
        assert_eq!(list(&store, &name("db")).await.unwrap(), [taken]);

        restore(&store, &name("db"), &name("monday"), "db2/")
            .await
            .unwrap();
        assert_eq!(store.get_all("db2/a").await.unwrap().1, "1");
        assert_eq!(store.get_all("db2/dir/b").await.unwrap().1, "22");
        let missing = restore(&store, &name("db"), &name("friday"), "db3/").await;
        assert!(
            missing
                .unwrap_err()
                .message()
                .contains("cairn snapshot ls db")
        );
    }
}
