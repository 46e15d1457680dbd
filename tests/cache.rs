//! The bounded cache through a real mount: clean data is evicted least recently used first,
//! changed data is never evicted (writers wait for uploads instead), and a full cache disk gives
//! a clear ENOSPC that loses nothing and goes away once space frees.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cairn_testkit::{Relay, S3Server};
use common::{Volume, errno};

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
