//! A misbehaving store: cairn's mount talks to the real S3 server through a proxy that answers
//! 500 and 503 SlowDown, cuts connections mid-body, truncates answers, holds requests, or stops
//! answering. Nothing written may be lost or corrupted, and the mount must keep answering.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{Direct, Volume};
use cairn_testkit::S3Server;
use cairn_testkit::faults::{FaultPlan, FaultProxy};

/// Bytes that differ from file to file and version to version.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A volume on a fresh prefix, mounted through a fault proxy; and the store reached directly.
fn flaky_volume(label: &str, seed: u64, extra: &[&str]) -> (Volume, FaultProxy, Direct) {
    let server = S3Server::shared();
    let spec = server.spec(&S3Server::unique_prefix(label));
    let proxy = FaultProxy::start(server.port(), seed);
    let volume = Volume::mount(&format!("{}&timeout=2", proxy.spec(server, &spec)), extra);
    (volume, proxy, Direct::new(&server.spec("")))
}

#[test]
fn nothing_is_lost_or_corrupted_through_a_flaky_store() {
    let (mut volume, proxy, direct) = flaky_volume("flaky", 7, &["--writeback-delay", "0"]);
    proxy.set(FaultPlan::all_at(0.08, Duration::from_millis(300)));

    // A mixed workload, with its model: what each path must hold at the end.
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    fs::create_dir_all(volume.path("db/logs")).unwrap();
    for i in 0..24u64 {
        let path = format!("db/table-{i}");
        let bytes = content(i, 1000 + (i as usize * 7919) % 150_000);
        fs::write(volume.path(&path), &bytes).unwrap();
        model.insert(path, bytes);
    }
    let big = content(99, 20 << 20); // several parts
    fs::write(volume.path("db/big.bin"), &big).unwrap();
    model.insert("db/big.bin".into(), big);
    for i in (0..24u64).step_by(3) {
        let path = format!("db/table-{i}");
        let bytes = content(i + 1000, 4096);
        fs::write(volume.path(&path), &bytes).unwrap();
        model.insert(path, bytes);
    }
    for i in (1..24u64).step_by(5) {
        let (from, to) = (format!("db/table-{i}"), format!("db/logs/moved-{i}"));
        fs::rename(volume.path(&from), volume.path(&to)).unwrap();
        let bytes = model.remove(&from).unwrap();
        model.insert(to, bytes);
    }
    for i in (2..24u64).step_by(7) {
        let path = format!("db/table-{i}");
        if model.remove(&path).is_some() {
            fs::remove_file(volume.path(&path)).unwrap();
        }
    }
    volume.flush();
    let struck = proxy.counts();

    // The store holds exactly the model: every version a file had last, nothing removed.
    let prefix = volume.key("db/");
    let mut stored: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for key in direct.keys(&prefix) {
        if key.ends_with('/') {
            continue; // directory markers
        }
        let relative = format!("db/{}", &key[prefix.len()..]);
        stored.insert(relative, direct.get(&key).unwrap().1);
    }
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &model {
        assert!(stored[path] == *bytes, "{path} differs in the store");
    }

    // Read back cold, through the same proxy, still failing now and then, and often cutting
    // answers short.
    proxy.set(FaultPlan {
        reset_mid_body: 0.1,
        truncate_body: 0.1,
        ..FaultPlan::all_at(0.02, Duration::from_millis(300))
    });
    volume.remount_cold(&[]);
    for (path, bytes) in &model {
        let read = fs::read(volume.path(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        assert!(read == *bytes, "{path} reads back wrong");
    }
    volume.stop();
    let total = proxy.counts();
    assert!(
        struck.faults() >= 12 && struck.resets >= 2,
        "the proxy should have struck often while writing: {struck:?}"
    );
    assert!(
        total.faults() > struck.faults(),
        "and while reading: {total:?}"
    );
}

/// Runs `work` on another thread and fails the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    wait.recv_timeout(limit).unwrap_or_else(|_| {
        panic!("{what} did not return within {limit:?}: the mount hangs on the store")
    })
}

#[test]
fn a_store_that_stops_answering_does_not_hang_the_mount() {
    let (mut volume, proxy, direct) = flaky_volume(
        "silent",
        11,
        &["--writeback-delay", "0", "--metadata-ttl", "0.5"],
    );
    fs::create_dir(volume.path("app")).unwrap();
    fs::write(volume.path("app/state.json"), b"{\"v\": 1}").unwrap();
    volume.flush();
    assert_eq!(fs::read_dir(volume.path("app")).unwrap().count(), 1);

    proxy.set(FaultPlan {
        silent: true,
        ..FaultPlan::default()
    });
    std::thread::sleep(Duration::from_millis(700)); // what the mount knows is now stale
    let root = volume.mountpoint.clone();
    let limit = Duration::from_secs(25);
    let read = within(limit, "a read of cached data", {
        let root = root.clone();
        move || fs::read(root.join("app/state.json")).unwrap()
    });
    assert_eq!(read, b"{\"v\": 1}");
    within(limit, "writes, a new file and a new directory", {
        let root = root.clone();
        move || {
            fs::write(root.join("app/state.json"), b"{\"v\": 2}").unwrap();
            fs::write(
                root.join("app/new.log"),
                b"written while the store is silent",
            )
            .unwrap();
            fs::create_dir(root.join("app/sub")).unwrap();
        }
    });
    // Once the store was seen not answering, nothing waits on it any more.
    let names = within(Duration::from_secs(3), "a listing", {
        let root = root.clone();
        move || {
            let mut names: Vec<String> = fs::read_dir(root.join("app"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    });
    assert_eq!(names, ["new.log", "state.json", "sub"]);
    assert!(proxy.counts().held > 0, "requests reached the silent proxy");

    proxy.set(FaultPlan::default());
    volume.flush();
    let key = |path: &str| volume.key(path);
    assert_eq!(direct.get(&key("app/state.json")).unwrap().1, b"{\"v\": 2}");
    assert_eq!(
        direct.get(&key("app/new.log")).unwrap().1,
        b"written while the store is silent"
    );
    volume.stop();
    assert!(!Path::new(&volume.path("app")).exists());
}
