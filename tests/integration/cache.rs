//! The bounded cache through a real mount: clean data is evicted least recently used first,
//! changed data is never evicted (writers wait for uploads instead), and a full cache disk gives
//! a clear ENOSPC that loses nothing and goes away once space frees. A cache disk smaller than
//! the data makes clean data give way whatever the cache size, and a disk filled by something
//! else still reads from the store.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{Direct, Volume, errno};
use cairn_testkit::faults::{FaultPlan, FaultProxy};
use cairn_testkit::{Relay, S3Server};

/// Bytes the cache's files take on disk.
fn cache_bytes(cache_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(cache_dir.join("data"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn body(i: u8, len: usize) -> Vec<u8> {
    (0..len).map(|n| i.wrapping_add((n / 4096) as u8)).collect()
}

#[test]
fn clean_data_beyond_the_cache_size_is_evicted() {
    let volume = Volume::new(&["--cache-size", "8M"]);
    let store = volume.direct();
    for i in 0..6u8 {
        store.put(
            &volume.key(&format!("r{i}")),
            &body(i, 4 << 20),
            Default::default(),
        );
    }
    for i in 0..6u8 {
        assert_eq!(
            fs::read(volume.path(&format!("r{i}"))).unwrap(),
            body(i, 4 << 20)
        );
    }
    std::thread::sleep(Duration::from_millis(2500));
    let used = cache_bytes(&volume.cache_dir);
    assert!(
        used <= 8 << 20,
        "the cache holds {used} bytes, over its 8 MiB"
    );
    // Evicted files read again from the store.
    assert_eq!(fs::read(volume.path("r0")).unwrap(), body(0, 4 << 20));
}

#[test]
fn writers_wait_for_uploads_when_changed_data_fills_the_cache() {
    let volume = Volume::new(&["--cache-size", "8M", "--writeback-delay", "0"]);
    for i in 0..12u8 {
        fs::write(volume.path(&format!("w{i}")), body(i, 3 << 20)).unwrap();
    }
    volume.flush();
    let store = volume.direct();
    for i in 0..12u8 {
        assert_eq!(
            store.get(&volume.key(&format!("w{i}"))).unwrap().1,
            body(i, 3 << 20),
            "w{i}"
        );
    }
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mount a small tmpfs as the cache disk");
        SmallDisk { path, _dir: dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_cache_disk_gives_enospc_loses_nothing_and_recovers() {
    let disk = SmallDisk::new("24m");
    let server = S3Server::shared();
    let relay = Relay::start(server.port());
    let spec = server.spec(&S3Server::unique_prefix("full")).replace(
        &server.endpoint,
        &format!("http://127.0.0.1:{}", relay.port),
    );
    let cache = disk.path.join("cache");
    let mut volume = Volume::mount_with_cache(&spec, Some(&cache), &["--writeback-delay", "0"]);
    fs::write(volume.path("probe"), b"online").unwrap();
    volume.flush();
    // Offline, new names can be made in directories this mount has listed.
    assert_eq!(fs::read_dir(&volume.mountpoint).unwrap().count(), 1);

    // With the store away nothing drains, so changed data fills the small disk.
    relay.stop();
    let mut written = Vec::new();
    let mut full = None;
    for i in 0..20u8 {
        match fs::write(volume.path(&format!("f{i}")), body(i, 2 << 20)) {
            Ok(()) => written.push(i),
            Err(err) => {
                full = Some(err);
                break;
            }
        }
    }
    let err = full.expect("the 24 MiB cache disk fills up");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "a clear error: {err}"
    );
    assert!(
        written.len() >= 5,
        "it took a few files to fill ({})",
        written.len()
    );
    for &i in &written {
        assert_eq!(
            fs::read(volume.path(&format!("f{i}"))).unwrap(),
            body(i, 2 << 20),
            "f{i} intact"
        );
    }

    // Deleting files frees their space; writing works again.
    let deleted: Vec<u8> = written.split_off(3);
    for &i in &deleted {
        fs::remove_file(volume.path(&format!("f{i}"))).unwrap();
    }
    let _ = fs::remove_file(volume.path(&format!("f{}", written.len() + deleted.len())));
    std::thread::sleep(Duration::from_secs(1));
    fs::write(volume.path("after"), body(99, 1 << 20)).unwrap();
    for &i in &deleted {
        assert_eq!(errno(fs::read(volume.path(&format!("f{i}")))), libc::ENOENT);
    }

    // The store comes back: every closed file reaches it.
    relay.resume();
    volume.flush();
    let store = volume.direct();
    for &i in &written {
        assert_eq!(
            store.get(&volume.key(&format!("f{i}"))).unwrap().1,
            body(i, 2 << 20),
            "f{i}"
        );
    }
    assert_eq!(
        store.get(&volume.key("after")).unwrap().1,
        body(99, 1 << 20)
    );
    for &i in &deleted {
        assert!(
            store.get(&volume.key(&format!("f{i}"))).is_none(),
            "deleted f{i} never reached the store"
        );
    }
    volume.stop();
}

/// A volume of `files` 2 MiB files already in the store, mounted through a fault proxy with its
/// cache on a 24 MiB disk; and the store reached directly.
fn tight_flaky_volume(label: &str, files: u8) -> (Volume, FaultProxy, Direct, SmallDisk) {
    let disk = SmallDisk::new("24m");
    let server = S3Server::shared();
    let spec = server.spec(&S3Server::unique_prefix(label));
    let direct = Direct::new(&server.spec(""));
    let proxy = FaultProxy::start(server.port(), 11);
    let spec = format!("{}&timeout=2", proxy.spec(server, &spec));
    let cache = disk.path.join("cache");
    let volume = Volume::mount_with_cache(&spec, Some(&cache), &["--writeback-delay", "0"]);
    for i in 0..files {
        let key = volume.key(&format!("old{i}"));
        direct.put(&key, &body(i, 2 << 20), Default::default());
    }
    (volume, proxy, direct, disk)
}

#[test]
fn a_cache_disk_smaller_than_the_data_on_a_flaky_store_loses_nothing() {
    let (mut volume, proxy, direct, _disk) = tight_flaky_volume("tight", 8);
    proxy.set(FaultPlan::all_at(0.05, Duration::from_millis(200)));
    // 16 MiB of clean data read through the mount, then 40 MiB written: the disk holds 24 MiB
    // and the cache size (10 GiB by default) is never reached, so clean data must give way and
    // writers wait for uploads.
    for i in 0..8u8 {
        let path = volume.path(&format!("old{i}"));
        assert_eq!(fs::read(path).unwrap(), body(i, 2 << 20), "old{i}");
    }
    for i in 0..20u8 {
        let path = volume.path(&format!("new{i}"));
        fs::write(path, body(100 + i, 2 << 20)).unwrap_or_else(|e| panic!("new{i}: {e}"));
    }
    for i in 0..8u8 {
        let path = volume.path(&format!("old{i}"));
        assert_eq!(fs::read(path).unwrap(), body(i, 2 << 20), "old{i} again");
    }
    for i in 0..20u8 {
        let path = volume.path(&format!("new{i}"));
        assert_eq!(fs::read(path).unwrap(), body(100 + i, 2 << 20), "new{i}");
    }
    volume.flush();
    let struck = proxy.counts();
    assert!(struck.faults() > 10, "the store misbehaved: {struck:?}");
    for i in 0..20u8 {
        let key = volume.key(&format!("new{i}"));
        assert_eq!(
            direct.get(&key).unwrap().1,
            body(100 + i, 2 << 20),
            "new{i}"
        );
    }
    volume.stop();
}

#[test]
fn a_cache_disk_filled_by_something_else_still_reads_from_the_store() {
    let (mut volume, _proxy, _direct, disk) = tight_flaky_volume("crowded", 4);
    fs::write(volume.path("mine"), b"written before the disk filled").unwrap();
    volume.flush();
    // Another program fills the disk the cache lives on.
    let filler = disk.path.join("filler");
    let mut filling = fs::File::create(&filler).unwrap();
    let chunk = vec![7u8; 1 << 20];
    while std::io::Write::write_all(&mut filling, &chunk).is_ok() {}
    drop(filling);

    for i in 0..4u8 {
        let path = volume.path(&format!("old{i}"));
        assert_eq!(fs::read(path).unwrap(), body(i, 2 << 20), "old{i}");
    }
    assert_eq!(
        errno(fs::write(volume.path("new"), body(1, 1 << 20))),
        libc::ENOSPC,
        "a clear error while the disk is full"
    );
    assert_eq!(
        fs::read(volume.path("mine")).unwrap(),
        b"written before the disk filled"
    );

    fs::remove_file(&filler).unwrap();
    fs::write(volume.path("new"), body(1, 1 << 20)).unwrap();
    volume.flush();
    assert_eq!(fs::read(volume.path("new")).unwrap(), body(1, 1 << 20));
    volume.stop();
}
