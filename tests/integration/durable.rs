//! The fsync log through a real mount on S3 (moto over HTTP): a durable fsync of a file already
//! in the store sends what changed as one small record, and whoever mounts the volume next (the
//! same host after a kill, or another host with none of its cache after the lease lapsed) finds
//! every fsynced byte, folded into the plain objects other tools read.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use crate::common::Volume;
use cairn_testkit::S3Server;

const MIB: usize = 1 << 20;
/// Short leases, so that a takeover happens within the test.
const LEASE_TTL: u64 = 3;

/// A store root for one volume `v`, and the spec of the volume's data under it.
fn root_and_volume() -> (String, String) {
    let root = S3Server::shared().spec(&S3Server::unique_prefix("fsynclog"));
    let (path, query) = root.split_once('?').unwrap_or((&root, ""));
    let data = format!("{path}/v?{query}");
    (root, data)
}

/// `cairn mount` as the one writer of `v` (holding its lease), as host `host`; nothing
/// uploads on its own during the test.
fn as_writer<'a>(root: &'a str, host: &'a str) -> Vec<&'a str> {
    vec![
        "--lease-store",
        root,
        "--lease-name",
        "v",
        "--host-id",
        host,
        "--lease-ttl",
        "3",
        "--writeback-delay",
        "600",
        "--max-dirty-age",
        "600",
    ]
}

/// Bytes the mount has sent to the store so far.
fn bytes_sent(volume: &Volume) -> u64 {
    volume.metrics().store.values().map(|c| c.bytes_sent).sum()
}

fn records(volume: &Volume) -> Vec<String> {
    let root_prefix = volume.key("").trim_end_matches('/').to_string();
    let log = root_prefix.trim_end_matches("/v").to_string() + "/.cairn/fsync/v/";
    volume.direct().keys(&log)
}

/// A 20 MiB file in the store, changed in two places and fsynced each time: the store gets two
/// records of a few KiB, not the file. The host dies with its cache; another takes the volume
/// over and reads every fsynced byte, and the plain object holds them too.
#[test]
fn fsynced_changes_survive_the_loss_of_the_host_and_its_cache() {
    let (root, data) = root_and_volume();
    let mut a = Volume::mount(&data, &as_writer(&root, "host-a"));
    let mut expected: Vec<u8> = (0..20 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(a.path("wal"), &expected).unwrap();
    a.flush();
    let key = a.key("wal");
    assert_eq!(a.direct().get(&key).unwrap().1, expected);

    let sent_before = bytes_sent(&a);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path("wal"))
        .unwrap();
    for (at, byte) in [(MIB, b'x'), (19 * MIB + 5, b'y')] {
        let bytes = vec![byte; 8192];
        file.write_all_at(&bytes, at as u64).unwrap();
        file.sync_data().unwrap();
        expected[at..at + 8192].copy_from_slice(&bytes);
    }
    // Appended and fsynced: the file grows.
    file.seek(SeekFrom::End(0)).unwrap();
    file.write_all(b"appended").unwrap();
    file.sync_all().unwrap();
    expected.extend_from_slice(b"appended");

    let metrics = a.metrics();
    assert_eq!(metrics.fsyncs_logged, 3, "{metrics:?}");
    let sent = bytes_sent(&a) - sent_before;
    assert!(
        sent < 64 * 1024,
        "three fsyncs sent {sent} bytes to the store (the file is 20 MiB)"
    );
    assert_eq!(records(&a).len(), 3, "{:?}", records(&a));
    assert_ne!(
        a.direct().get(&key).unwrap().1,
        expected,
        "the plain object changed at the fsyncs"
    );

    // Host A is lost with its cache.
    a.kill();
    std::fs::remove_dir_all(&a.cache_dir).unwrap();
    std::thread::sleep(Duration::from_secs(LEASE_TTL + 1));

    let mut b = Volume::mount(&data, &as_writer(&root, "host-b"));
    let mut read = Vec::new();
    std::fs::File::open(b.path("wal"))
        .unwrap()
        .read_to_end(&mut read)
        .unwrap();
    assert!(read == expected, "host B does not read what A fsynced");
    assert!(
        b.direct().get(&key).unwrap().1 == expected,
        "the plain object lacks what was fsynced"
    );
    assert!(
        records(&b).is_empty(),
        "the log was folded, yet is still there"
    );
    b.stop();
    drop(file);
}

/// The same host, killed with a file still open after its fsyncs, comes back on its own cache:
/// the fsynced bytes are there, and in the store after the unmount, which leaves no record.
#[test]
fn fsynced_changes_survive_a_kill_and_the_log_is_gone_after_an_unmount() {
    let (root, data) = root_and_volume();
    let mut a = Volume::mount(&data, &as_writer(&root, "host-a"));
    let mut expected = vec![b'a'; 3 * MIB];
    std::fs::write(a.path("db"), &expected).unwrap();
    a.flush();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(a.path("db"))
        .unwrap();
    file.write_all_at(b"committed", 4096).unwrap();
    file.sync_data().unwrap();
    expected[4096..4096 + 9].copy_from_slice(b"committed");
    assert_eq!(records(&a).len(), 1);
    a.kill();
    drop(file);

    // The restarted mount folds the record into the object, or, where its cache still has a
    // change of the file waiting (the release of the first writer can queue one), leaves the
    // record moot: that change holds the bytes. Either way they read back, and reach the store.
    a.start(&as_writer(&root, "host-a"));
    assert_same(
        &std::fs::read(a.path("db")).unwrap(),
        &expected,
        "the restarted mount",
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(a.path("db"))
        .unwrap();
    file.write_all_at(b"again", 0).unwrap();
    file.sync_data().unwrap();
    drop(file);
    expected[..5].copy_from_slice(b"again");
    a.stop();
    let stored = a.direct().get(&a.key("db")).unwrap().1;
    assert_same(&stored, &expected, "the store after the unmount");
    assert!(records(&a).is_empty(), "{:?}", records(&a));
}

/// Asserts two file contents are equal, saying where they first differ (they are megabytes).
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    let first = actual.iter().zip(expected).position(|(a, e)| a != e);
    assert!(
        actual.len() == expected.len() && first.is_none(),
        "{what}: {} bytes, expected {}; first difference at {first:?}: {:?}",
        actual.len(),
        expected.len(),
        first.map(|at| &actual[at..(at + 16).min(actual.len())])
    );
}

/// A file a database makes for itself (opened read-write with O_CREAT, as SQLite opens its
/// `-wal`) goes through the mount, not the kernel's direct route: its first fsync uploads it
/// (a new file), and the later ones send only what changed.
#[test]
fn a_file_made_read_write_is_fsynced_through_the_log() {
    let (root, data) = root_and_volume();
    let mut a = Volume::mount(&data, &as_writer(&root, "host-a"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(a.path("db-wal"))
        .unwrap();
    file.write_all_at(&vec![b'f'; 2 * MIB], 0).unwrap();
    file.sync_data().unwrap();
    let sent_before = bytes_sent(&a);
    for commit in 0..20u64 {
        file.write_all_at(&[b'c'; 4096], 2 * MIB as u64 + commit * 4096)
            .unwrap();
        file.sync_data().unwrap();
    }
    let metrics = a.metrics();
    assert_eq!(metrics.fsyncs_logged, 20, "{metrics:?}");
    let sent = bytes_sent(&a) - sent_before;
    assert!(sent < 256 * 1024, "20 commits of 4 KiB sent {sent} bytes");
    drop(file);
    a.stop();
    let stored = a.direct().get(&a.key("db-wal")).unwrap().1;
    assert_eq!(stored.len(), 2 * MIB + 20 * 4096);
}
