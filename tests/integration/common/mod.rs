//! Shared by the integration tests: `cairn mount` run as a user runs it (the real binary, a real
//! FUSE mount, a real S3 server over HTTP), and direct access to the store to check what
//! reached it.
#![allow(dead_code)] // Helpers some test modules use only with some options.

pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_fs::store::{Metadata, SharedStore, StoreExt, StoreSpec, open_store};
use cairn_testkit::S3Server;

/// Writes version 1, 2, 3... (each byte the version's number, wrapping) over the first `size`
/// bytes of `file`, `chunk` bytes a write in order, without pause for `how_long`; returns the
/// last version written.
pub fn rewrite_in_versions(
    file: &std::fs::File,
    size: usize,
    chunk: usize,
    how_long: Duration,
) -> u8 {
    use std::os::unix::fs::FileExt;
    let started = Instant::now();
    let mut version = 0u8;
    while started.elapsed() < how_long {
        version = version.wrapping_add(1);
        for at in (0..size).step_by(chunk) {
            file.write_all_at(&vec![version; chunk], at as u64).unwrap();
        }
    }
    version
}

/// Fails loudly when the machine cannot run FUSE tests.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: FUSE tests need it (run the README's test command as root)"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "FUSE tests mount filesystems and must run as root");
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let wanted = path.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(&wanted))
}

/// A running `cairn mount` of a fresh prefix of the test bucket (or of a given spec).
pub struct Volume {
    pub spec: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    /// What the running mount process printed (a file, not a pipe: a pipe nobody reads fills
    /// up, and a mount that logs more than it holds blocks on it).
    log: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Volume {
    /// Mounts a new, empty prefix of the shared S3 server.
    pub fn new(extra: &[&str]) -> Volume {
        let spec = S3Server::shared().spec(&S3Server::unique_prefix("vol"));
        Self::mount(&spec, extra)
    }

    pub fn mount(spec: &str, extra: &[&str]) -> Volume {
        Self::mount_with_cache(spec, None, extra)
    }

    /// Mounts with the cache in `cache_dir` (default: a temporary directory).
    pub fn mount_with_cache(spec: &str, cache_dir: Option<&Path>, extra: &[&str]) -> Volume {
        require_fuse();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mountpoint = dir.path().join("mnt");
        let cache_dir = cache_dir.map_or_else(|| dir.path().join("cache"), Path::to_path_buf);
        std::fs::create_dir(&mountpoint).unwrap();
        let mut volume = Volume {
            spec: spec.to_string(),
            mountpoint,
            cache_dir,
            log: dir.path().join("mount.log"),
            _dir: dir,
            child: None,
        };
        volume.start(extra);
        volume
    }

    /// Starts `cairn mount` (again) on this volume's mountpoint and waits until it is live.
    pub fn start(&mut self, extra: &[&str]) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .args(["mount", &self.spec])
            .arg(&self.mountpoint)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).expect("the mount's log file"));
        let mut child = command.spawn().expect("start cairn mount");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mountpoint) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "cairn mount exited with {status} before mounting: {}",
                    self.printed()
                );
            }
            assert!(
                Instant::now() < deadline,
                "cairn mount did not mount within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// The mount process's ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(relative)
    }

    /// The store key of a path inside the volume (relative to the bucket).
    pub fn key(&self, relative: &str) -> String {
        let path = self.spec.split('?').next().unwrap();
        let prefix = path
            .splitn(4, '/')
            .nth(3)
            .unwrap_or_default()
            .trim_end_matches('/');
        format!("{prefix}/{relative}")
    }

    /// The store of this volume's bucket, reached directly (not through cairn's mount).
    pub fn direct(&self) -> Direct {
        let (path, query) = self.spec.split_once('?').unwrap_or((&self.spec, ""));
        let bucket_root: String = path.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
        Direct::new(&format!("{bucket_root}?{query}"))
    }

    /// What the mount counted so far, asked over its control socket.
    pub fn metrics(&self) -> cairn_fs::metrics::MetricsSnapshot {
        use cairn_fs::control::{Request, client};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answer = runtime.block_on(client::ask(&self.mountpoint, Request::Metrics));
        let answer = answer.unwrap_or_else(|| {
            panic!(
                "the control socket of {} answers",
                self.mountpoint.display()
            )
        });
        serde_json::from_value(answer).unwrap_or_else(|e| panic!("metrics as JSON: {e}"))
    }

    /// Runs `cairn flush` on the mount: returns once the store holds every change.
    pub fn flush(&self) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("flush")
            .arg(&self.mountpoint)
            .args(["--timeout", "120"])
            .output()
            .expect("run cairn flush");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "cairn flush failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Stops the mount with SIGTERM (uploading changes) and returns what it printed.
    pub fn stop(&mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let output = wait_with_timeout(child, Duration::from_secs(60));
        let stderr = self.printed();
        assert!(
            output.status.success(),
            "cairn mount failed to stop cleanly: {stderr}"
        );
        assert!(!is_mounted(&self.mountpoint), "still mounted after stop");
        stderr
    }

    /// Kills the mount process with SIGKILL, as a crash would, and clears its dead mountpoint.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let status = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status()
            .unwrap();
        assert!(status.success(), "clear the dead mountpoint");
    }

    /// Stops and mounts again with the same cache directory.
    pub fn remount(&mut self, extra: &[&str]) {
        self.stop();
        self.start(extra);
    }

    /// Stops and mounts again with an empty cache, so every read goes to the store.
    pub fn remount_cold(&mut self, extra: &[&str]) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.cache_dir);
        self.start(extra);
    }

    /// Waits for the process to end by itself (after an outside unmount).
    pub fn wait_exit(&mut self) -> std::process::Output {
        let child = self.child.take().expect("a running mount");
        let mut output = wait_with_timeout(child, Duration::from_secs(60));
        output.stderr = self.printed().into_bytes();
        output
    }

    /// What the mount process (the last one started) printed so far.
    pub fn printed(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_with_timeout(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
        .wait_with_output()
        .expect("collect the mount's output")
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Talks to the store directly, bypassing cairn's mount.
pub struct Direct {
    runtime: tokio::runtime::Runtime,
    pub store: SharedStore,
}

impl Direct {
    pub fn new(spec: &str) -> Direct {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let spec: StoreSpec = spec.parse().unwrap();
        let store = runtime.block_on(open_store(&spec)).unwrap();
        Direct { runtime, store }
    }

    pub fn get(&self, key: &str) -> Option<(Metadata, Vec<u8>)> {
        self.runtime
            .block_on(self.store.head_opt(key))
            .unwrap()
            .map(|_| {
                let (info, body) = self.runtime.block_on(self.store.get_all(key)).unwrap();
                (info.metadata, body.to_vec())
            })
    }

    pub fn put(&self, key: &str, body: &[u8], metadata: Metadata) {
        let options = cairn_fs::store::PutOptions::with_metadata(metadata);
        self.runtime
            .block_on(
                self.store
                    .put(key, bytes::Bytes::copy_from_slice(body), options),
            )
            .unwrap();
    }

    pub fn delete(&self, key: &str) {
        self.runtime.block_on(self.store.delete(key)).unwrap();
    }

    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let page = self
            .runtime
            .block_on(self.store.list_all(prefix, false))
            .unwrap();
        page.objects.into_iter().map(|o| o.key).collect()
    }

    /// Puts many small objects with several requests in flight.
    pub fn put_many(&self, keys: Vec<String>) {
        let store = Arc::clone(&self.store);
        self.runtime.block_on(async move {
            use futures::StreamExt;
            futures::stream::iter(keys)
                .map(|key| {
                    let store = Arc::clone(&store);
                    async move {
                        let body = bytes::Bytes::from(key.clone());
                        store.put(&key, body, Default::default()).await.unwrap();
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await;
        });
    }
}

/// The standard output of a command that must have succeeded (else its stderr fails the test).
pub fn succeeded(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The errno of a failed std call.
pub fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result
        .expect_err("the call should have failed")
        .raw_os_error()
        .expect("an OS error")
}
