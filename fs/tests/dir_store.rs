//! What the dir store promises beyond the conformance suite: conditional puts that hold between
//! processes, files put there by hand, and a missing root.

use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use cairn_fs::store::dir::DirStore;
use cairn_fs::store::{ErrorKind, PutCondition, PutOptions, Store, StoreExt};

const CHILD_ENV: &str = "CAIRN_DIR_STORE_RACE_ROOT";

/// One contender of the race below, run in a child process by it (hence ignored on its own).
#[tokio::test]
#[ignore = "a child process of create_if_absent_holds_across_processes"]
async fn contender_in_a_child_process() {
    let root = std::env::var(CHILD_ENV).expect("run by create_if_absent_holds_across_processes");
    let store = DirStore::open(root).unwrap();
    let me = std::process::id().to_string();
    let options = PutOptions {
        condition: PutCondition::IfAbsent,
        ..PutOptions::default()
    };
    match store.put("lease", Bytes::from(me), options).await {
        Ok(_) => println!("RACE-RESULT won"),
        Err(e) if e.kind() == ErrorKind::PreconditionFailed => println!("RACE-RESULT lost"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn create_if_absent_holds_across_processes() {
    let root = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..6)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "contender_in_a_child_process",
                    "--nocapture",
                ])
                .env(CHILD_ENV, root.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut won = 0;
    let mut lost = 0;
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        won += stdout.matches("RACE-RESULT won").count();
        lost += stdout.matches("RACE-RESULT lost").count();
    }
    assert_eq!((won, lost), (1, 5), "exactly one process creates the key");
}

#[tokio::test]
async fn files_put_there_by_hand_are_objects_without_metadata() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("photos")).unwrap();
    std::fs::write(root.path().join("photos/cat.jpg"), b"meow").unwrap();
    std::fs::write(root.path().join(".not-an-object"), b"x").unwrap();
    let store = Arc::new(DirStore::open(root.path()).unwrap());

    let listed = store.list_all("", false).await.unwrap();
    let keys: Vec<&str> = listed.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["photos/cat.jpg"]);
    let (info, body) = store.get_all("photos/cat.jpg").await.unwrap();
    assert_eq!(&body[..], b"meow");
    assert!(info.metadata.is_empty());

    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(root.path().join("photos/cat.jpg"), b"purr!").unwrap();
    let changed = store.head("photos/cat.jpg").await.unwrap();
    assert_ne!(
        changed.etag, info.etag,
        "a file changed by hand gets a new ETag"
    );
    assert_eq!(changed.size, 5);
}

#[test]
fn a_missing_root_is_a_missing_bucket() {
    let err = DirStore::open("/nonexistent/cairn-store").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSuchBucket);
    assert!(err.message().contains("/nonexistent/cairn-store"), "{err}");
}

#[tokio::test]
async fn deleting_the_last_object_leaves_no_empty_directories() {
    let root = tempfile::tempdir().unwrap();
    let store = DirStore::open(root.path()).unwrap();
    store
        .put("a/b/c.txt", Bytes::from_static(b"x"), PutOptions::default())
        .await
        .unwrap();
    store.delete("a/b/c.txt").await.unwrap();
    assert!(!root.path().join("a").exists(), "empty parents are removed");
}
