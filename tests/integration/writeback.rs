//! The write-back engine through a real mount over a real S3 server: each rung of the
//! durability ladder, objects that are never torn, unmount draining, `cairn flush`, and working
//! while the S3 server is away.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Volume, is_mounted};
use cairn_testkit::{Relay, S3Server};

/// The spec of a new prefix on `server`, reached through `relay` (which a test can stop).
fn through(server: &S3Server, relay: &Relay, prefix: &str) -> String {
    let relayed = format!("http://127.0.0.1:{}", relay.port);
    server
        .spec(&S3Server::unique_prefix(prefix))
        .replace(&server.endpoint, &relayed)
}

/// Polls `check` until it holds or `limit` passes; returns how long it took.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_returned_write_is_in_the_local_cache() {
    let volume = Volume::new(&["--writeback-delay", "60"]);
    let mut file = File::create(volume.path("f")).unwrap();
    file.write_all(b"in the cache before any close").unwrap();
    let cached = fs::read_dir(volume.cache_dir.join("data"))
        .unwrap()
        .any(|entry| fs::read(entry.unwrap().path()).unwrap() == b"in the cache before any close");
    assert!(cached, "the written bytes are in a cache file");
    assert!(
        volume.direct().get(&volume.key("f")).is_none(),
        "and not yet in the store"
    );
}

#[test]
fn close_schedules_the_upload_after_the_writeback_delay() {
    let volume = Volume::new(&["--writeback-delay", "2"]);
    let store = volume.direct();
    fs::write(volume.path("later"), b"uploaded after a delay").unwrap();
    let closed = Instant::now();
    assert!(
        store.get(&volume.key("later")).is_none(),
        "not in the store right after close"
    );
    eventually(Duration::from_secs(20), "the upload", || {
        store.get(&volume.key("later")).is_some()
    });
    assert!(
        closed.elapsed() >= Duration::from_millis(1800),
        "the upload waited for the delay"
    );
    assert_eq!(
        store.get(&volume.key("later")).unwrap().1,
        b"uploaded after a delay"
    );
}

#[test]
fn fsync_local_survives_a_killed_mount_process() {
    let mut volume = Volume::new(&["--writeback-delay", "600", "--fsync", "local"]);
    let mut file = File::create(volume.path("db")).unwrap();
    file.write_all(b"committed transaction").unwrap();
    file.sync_all().unwrap();
    assert!(
        volume.direct().get(&volume.key("db")).is_none(),
        "fsync=local does not wait for the store"
    );
    volume.kill();
    drop(file);
    volume.start(&["--writeback-delay", "600"]);
    volume.flush();
    assert_eq!(
        volume.direct().get(&volume.key("db")).unwrap().1,
        b"committed transaction"
    );
}

#[test]
fn a_file_kept_open_and_written_is_uploaded_every_max_dirty_age() {
    let volume = Volume::new(&["--writeback-delay", "600", "--max-dirty-age", "1"]);
    let store = volume.direct();
    let mut file = File::create(volume.path("log")).unwrap();
    let started = Instant::now();
    let mut written = 0;
    // Keep writing, never closing, until the store has a version (within a second or two; the
    // generous limit is for a loaded S3 server shared with other tests).
    let stored = loop {
        file.write_all(b"line\n").unwrap();
        written += 5;
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() < Duration::from_secs(1) {
            continue;
        }
        if let Some((_, stored)) = store.get(&volume.key("log")) {
            break stored;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not uploaded while still open"
        );
    };
    assert!(!stored.is_empty() && stored.len() <= written);
    assert!(
        stored.chunks(5).all(|line| line == b"line\n"),
        "a version the file really had"
    );
}

#[test]
fn unmount_drains_everything_before_the_process_exits() {
    let mut volume = Volume::new(&["--writeback-delay", "600"]);
    fs::create_dir(volume.path("many")).unwrap();
    for i in 0..200 {
        fs::write(volume.path(&format!("many/{i:03}")), format!("file {i}")).unwrap();
    }
    fs::write(volume.path("big"), vec![7u8; 20 << 20]).unwrap();
    assert!(volume.direct().get(&volume.key("big")).is_none());
    volume.stop();
    let store = volume.direct();
    let keys = store.keys(&volume.key("many/"));
    assert_eq!(keys.len(), 201, "200 files and the directory marker");
    assert_eq!(store.get(&volume.key("many/123")).unwrap().1, b"file 123");
    assert_eq!(
        store.get(&volume.key("big")).unwrap().1,
        vec![7u8; 20 << 20]
    );
}

#[test]
fn cairn_flush_uploads_now_and_reports_progress() {
    let volume = Volume::new(&["--writeback-delay", "600"]);
    for i in 0..20 {
        fs::write(volume.path(&format!("f{i}")), vec![i as u8; 1 << 20]).unwrap();
    }
    let output = volume.flush();
    assert!(
        output.contains("pending: "),
        "progress lines when not on a terminal: {output}"
    );
    assert!(
        output.trim_end().ends_with(&format!(
            "flushed: the store holds everything written to {}",
            volume.mountpoint.display()
        )),
        "{output}"
    );
    assert_eq!(
        volume.direct().get(&volume.key("f19")).unwrap().1,
        vec![19u8; 1 << 20]
    );
    // A flush with nothing pending is quick and says so too.
    assert!(volume.flush().contains("flushed"));
}

#[test]
fn cairn_flush_without_a_mount_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("flush")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no cairn mount answers"), "{stderr}");
}

/// The states a file takes when version `v` is written over version `v - 1` in chunks: the
/// first chunks new, the rest old.
fn is_a_real_version(body: &[u8], chunk: usize) -> bool {
    let Some(&first) = body.first() else {
        return true;
    };
    let boundary = body.iter().position(|b| *b != first).unwrap_or(body.len());
    boundary % chunk == 0 && body[boundary..].iter().all(|b| *b == first.wrapping_sub(1))
}

/// A database's way: the file exists, and is opened to be written in place (no truncation), so
/// every write goes through the mount (a file written afresh is tested in tests/direct.rs). It
/// is made in the store, not through the mount: an open right after a close here could still
/// follow the closed handle's direct route (docs/SEMANTICS.md, "Direct routes").
#[test]
fn objects_are_never_torn_while_the_application_keeps_writing() {
    let volume = Volume::new(&["--writeback-delay", "0", "--max-dirty-age", "0.2"]);
    let store = volume.direct();
    let (size, chunk) = (8 << 20, 256 << 10);
    store.put(&volume.key("hot"), b"", Default::default());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(volume.path("hot"))
        .unwrap();
    file.write_all_at(&vec![0u8; size], 0).unwrap();
    // From here on every version the file has is `size` bytes long.
    file.sync_all().unwrap();
    let writer = std::thread::spawn(move || {
        crate::common::rewrite_in_versions(&file, size, chunk, Duration::from_secs(8))
    });
    let mut seen = std::collections::HashSet::new();
    while !writer.is_finished() {
        if let Some((_, body)) = store.get(&volume.key("hot")) {
            assert_eq!(
                body.len(),
                size,
                "a size the file never had since the fsync"
            );
            assert!(
                is_a_real_version(&body, chunk),
                "a torn object: starts {:?}",
                &body[..8]
            );
            seen.insert(body[0]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let versions = writer.join().unwrap();
    assert!(
        seen.len() > 3,
        "uploads ran while the writer wrote {versions} versions ({} seen)",
        seen.len()
    );
}

#[test]
fn writes_keep_working_while_the_s3_server_is_away() {
    let server = S3Server::shared();
    let relay = Relay::start(server.port());
    let spec = through(server, &relay, "offline");
    let mut volume = Volume::mount(&spec, &["--writeback-delay", "0", "--metadata-ttl", "0.5"]);
    fs::create_dir(volume.path("docs")).unwrap();
    fs::write(volume.path("docs/kept.txt"), b"written while online").unwrap();
    fs::write(volume.path("docs/gone.txt"), b"deleted while offline").unwrap();
    volume.flush();
    assert_eq!(fs::read_dir(volume.path("docs")).unwrap().count(), 2);

    relay.stop();
    // Cached reads, new files, overwrites, deletes and new directories all work offline.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        fs::read(volume.path("docs/kept.txt")).unwrap(),
        b"written while online"
    );
    fs::write(volume.path("docs/new.txt"), b"written offline").unwrap();
    fs::write(volume.path("docs/kept.txt"), b"changed offline").unwrap();
    fs::remove_file(volume.path("docs/gone.txt")).unwrap();
    fs::create_dir(volume.path("docs/sub")).unwrap();
    fs::write(volume.path("docs/sub/deep.txt"), b"deep").unwrap();
    let mut names: Vec<String> = fs::read_dir(volume.path("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["kept.txt", "new.txt", "sub"]);
    std::thread::sleep(Duration::from_secs(2));

    relay.resume();
    volume.flush();
    let store = volume.direct();
    assert_eq!(
        store.get(&volume.key("docs/kept.txt")).unwrap().1,
        b"changed offline"
    );
    assert_eq!(
        store.get(&volume.key("docs/new.txt")).unwrap().1,
        b"written offline"
    );
    assert_eq!(
        store.get(&volume.key("docs/sub/deep.txt")).unwrap().1,
        b"deep"
    );
    assert!(store.get(&volume.key("docs/gone.txt")).is_none());
    volume.stop();
    assert!(!is_mounted(&volume.mountpoint));
}

#[test]
fn a_small_change_to_a_large_file_moves_little_data() {
    const MIB: usize = 1 << 20;
    let server = S3Server::shared();
    let relay = Relay::start(server.port());
    let spec = through(server, &relay, "bigedit");
    let mut original: Vec<u8> = (0..48 * MIB).map(|i| (i % 253) as u8).collect();
    let volume = Volume::mount(&spec, &["--writeback-delay", "0"]);
    volume
        .direct()
        .put(&volume.key("db.img"), &original, Default::default());
    let before = relay.traffic();

    // Change 16 bytes in the middle of a 48 MiB file no one has read here.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(volume.path("db.img"))
        .unwrap();
    file.write_all_at(b"sixteen  bytes!!", 20 * MIB as u64)
        .unwrap();
    file.sync_all().unwrap(); // fsync: in the store when it returns
    drop(file);

    let after = relay.traffic();
    original[20 * MIB..20 * MIB + 16].copy_from_slice(b"sixteen  bytes!!");
    let (_, stored) = volume.direct().get(&volume.key("db.img")).unwrap();
    assert!(stored == original, "the object is the changed file");
    let moved = (after.0 - before.0) + (after.1 - before.1);
    // One 8 MiB part goes up, and its unchanged bytes come down: far less than the 96 MiB of
    // downloading and uploading the whole file.
    assert!(
        moved < 24 * MIB as u64,
        "{moved} bytes went over the wire ({before:?} -> {after:?})"
    );
}

#[test]
fn a_file_renamed_twice_while_the_store_is_away_arrives_under_its_last_name() {
    let server = S3Server::shared();
    let relay = Relay::start(server.port());
    let spec = through(server, &relay, "twice");
    let volume = Volume::mount(&spec, &["--writeback-delay", "0"]);
    fs::write(volume.path("draft.txt"), b"the only copy of this text").unwrap();
    volume.flush();
    assert_eq!(fs::read_dir(volume.mountpoint.clone()).unwrap().count(), 1);

    // The first rename's copy cannot reach the store before the second rename.
    relay.stop();
    fs::rename(volume.path("draft.txt"), volume.path("review.txt")).unwrap();
    fs::rename(volume.path("review.txt"), volume.path("final.txt")).unwrap();
    relay.resume();
    volume.flush();
    let store = volume.direct();
    assert_eq!(
        store.get(&volume.key("final.txt")).map(|(_, body)| body),
        Some(b"the only copy of this text".to_vec())
    );
    assert!(store.get(&volume.key("draft.txt")).is_none());
    assert!(store.get(&volume.key("review.txt")).is_none());
}

#[test]
fn appending_to_a_file_replaced_in_the_store_takes_the_new_version() {
    let mut volume = Volume::new(&["--writeback-delay", "0", "--metadata-ttl", "3600"]);
    const MIB: usize = 1 << 20;
    fs::write(volume.path("log"), vec![b'a'; 8 * MIB]).unwrap();
    volume.flush();
    volume.remount_cold(&["--writeback-delay", "0", "--metadata-ttl", "3600"]);
    // Cached in part only (the first blocks), then replaced behind the mount's back.
    let mut head = [0u8; 10];
    File::open(volume.path("log"))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    let store = volume.direct();
    let (metadata, _) = store.get(&volume.key("log")).unwrap();
    store.put(&volume.key("log"), &vec![b'b'; 6 * MIB], metadata);

    let mut file = OpenOptions::new()
        .append(true)
        .open(volume.path("log"))
        .unwrap();
    file.write_all(b"tail").unwrap();
    drop(file);
    volume.flush();
    let stored = store.get(&volume.key("log")).unwrap().1;
    assert_eq!(
        stored.len(),
        8 * MIB + 4,
        "the size this mount knew, plus the tail"
    );
    assert!(
        stored[..6 * MIB].iter().all(|b| *b == b'b'),
        "the store's new version"
    );
    assert_eq!(&stored[8 * MIB..], b"tail");
}

/// The only writer of a volume (`--only-writer`, as an exclusive volume is mounted) goes on
/// with the S3 server away, anywhere it has listed or made: a workload of creates, overwrites,
/// renames, deletes and new directories, in the root and below, runs without one failure while
/// the relay in front of the server is down for its middle third; once it is back, the store
/// holds exactly what a model of the workload says.
#[test]
fn the_only_writer_keeps_working_anywhere_it_listed_while_the_s3_server_is_away() {
    use std::collections::BTreeMap;
    let server = S3Server::shared();
    let relay = Relay::start(server.port());
    let spec = through(server, &relay, "onlywriter");
    // A short TTL, which the only writer's own knowledge outlives (it sets the kernel's).
    let flags = [
        "--only-writer",
        "--writeback-delay",
        "0",
        "--metadata-ttl",
        "0.2",
    ];
    let mut volume = Volume::mount(&spec, &flags);
    let store = volume.direct();
    // What another tool put there before the mount: listed, never looked up one by one.
    store.put(&volume.key("top.txt"), b"from before", Default::default());
    store.put(&volume.key("old/one.txt"), b"one", Default::default());
    volume.remount(&flags);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::from([
        ("top.txt".to_string(), b"from before".to_vec()),
        ("old/one.txt".to_string(), b"one".to_vec()),
    ]);
    // The directories it has listed (the root is listed when it mounts).
    assert_eq!(fs::read_dir(volume.path("old")).unwrap().count(), 1);
    let mut dirs = vec![String::new(), "old/".to_string()];

    let steps = 90;
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for step in 0..steps {
        if step == steps / 3 {
            relay.stop();
            // Everything the mount learned is now older than the TTL.
            std::thread::sleep(Duration::from_millis(500));
        }
        if step == 2 * steps / 3 {
            relay.resume();
        }
        let dir = dirs[next(dirs.len() as u64) as usize].clone();
        let files: Vec<String> = model
            .keys()
            .filter(|k| k.starts_with(&dir))
            .cloned()
            .collect();
        let what = next(10);
        let done = match what {
            0..=3 => {
                let name = format!("{dir}f{step}.txt");
                let body = format!("step {step}").into_bytes();
                let written = fs::write(volume.path(&name), &body);
                model.insert(name, body);
                written
            }
            4 | 5 if !files.is_empty() => {
                let name = &files[next(files.len() as u64) as usize];
                let body = format!("overwritten at {step}").into_bytes();
                let written = fs::write(volume.path(name), &body);
                model.insert(name.clone(), body);
                written
            }
            6 if !files.is_empty() => {
                let from = files[next(files.len() as u64) as usize].clone();
                let to = format!("{}r{step}.txt", dirs[next(dirs.len() as u64) as usize]);
                let renamed = fs::rename(volume.path(&from), volume.path(&to));
                let body = model.remove(&from).unwrap();
                model.insert(to, body);
                renamed
            }
            7 if !files.is_empty() => {
                let name = files[next(files.len() as u64) as usize].clone();
                model.remove(&name);
                fs::remove_file(volume.path(&name))
            }
            8 => {
                let new = format!("{dir}d{step}/");
                let made = fs::create_dir(volume.path(&new));
                dirs.push(new);
                made
            }
            _ => fs::read_dir(volume.path(&dir)).map(|_| ()),
        };
        done.unwrap_or_else(|e| panic!("step {step} ({what} in {dir:?}) failed: {e}"));
    }
    volume.flush();
    let prefix = volume.key("");
    let mut stored: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for key in store.keys(&prefix) {
        let name = key[prefix.len()..].to_string();
        if !name.ends_with('/') {
            stored.insert(name, store.get(&key).unwrap().1);
        }
    }
    assert_eq!(stored, model);
    volume.stop();
}
