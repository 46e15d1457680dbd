//! `cairn serve` run as Docker runs it: the real binary, its config file, its plugin socket,
//! and the mount processes it starts. A test talks to it over the socket (the protocol tests) or
//! through a real dockerd (the end-to-end tests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_testkit::{S3Server, spawn_with_death_signal};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use serde_json::{Value, json};

use super::{Direct, is_mounted};

/// Which kind of store the daemon's default store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Dir,
    S3,
}

/// A running `cairn serve` with its own state directory and config.
pub struct Daemon {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// The spec of the store new volumes go to.
    pub store_spec: String,
    /// CAIRN_LOG for the daemon (and so its mount processes) from the next `run`.
    pub log_filter: Option<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// A daemon on a socket of its own (not one Docker sees).
    pub fn start(kind: StoreKind) -> Daemon {
        Self::start_on(kind, None)
    }

    /// A daemon Docker knows as `driver` (its socket is in /run/docker/plugins).
    pub fn for_docker(kind: StoreKind, driver: &str) -> Daemon {
        Self::start_on(
            kind,
            Some(Path::new("/run/docker/plugins").join(format!("{driver}.sock"))),
        )
    }

    fn start_on(kind: StoreKind, socket: Option<PathBuf>) -> Daemon {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store_spec = match kind {
            StoreKind::Dir => {
                let root = dir.path().join("store");
                std::fs::create_dir(&root).unwrap();
                format!("dir://{}", root.display())
            }
            StoreKind::S3 => S3Server::shared().spec(&S3Server::unique_prefix("plugin")),
        };
        Self::start_with_store(dir, &store_spec, socket)
    }

    /// A daemon whose default store is `store_spec`.
    pub fn with_store(store_spec: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self::start_with_store(dir, store_spec, None)
    }

    fn start_with_store(
        dir: tempfile::TempDir,
        store_spec: &str,
        socket: Option<PathBuf>,
    ) -> Daemon {
        super::require_fuse();
        let store_spec = store_spec.to_string();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("default_store = \"main\"\n[stores.main]\nspec = \"{store_spec}\"\n"),
        )
        .unwrap();
        let socket = socket.unwrap_or_else(|| dir.path().join("cairn.sock"));
        Self::with_config(dir, config, socket, store_spec)
    }

    /// A daemon acting as host `host` (its own state directory, socket and host id) on the
    /// store `store_spec`, with leases of `lease_ttl` seconds.
    pub fn as_host(store_spec: &str, host: &str, lease_ttl: u64) -> Daemon {
        Self::as_host_with(store_spec, host, lease_ttl, "")
    }

    /// [`Daemon::as_host`], with more TOML for the store's section (`store_toml`: lines that
    /// follow `[stores.main]`, such as its `[stores.main.defaults]`).
    pub fn as_host_with(store_spec: &str, host: &str, lease_ttl: u64, store_toml: &str) -> Daemon {
        super::require_fuse();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "default_store = \"main\"\nhost_id = \"{host}\"\nlease_ttl = {lease_ttl}\n\
                 [stores.main]\nspec = \"{store_spec}\"\n{store_toml}"
            ),
        )
        .unwrap();
        let socket = dir.path().join("cairn.sock");
        Self::with_config(dir, config, socket, store_spec.to_string())
    }

    /// A second daemon (another host, as far as cairn can tell) with the same config, so the
    /// same store, and a state directory of its own.
    pub fn sharing_store_of(other: &Daemon) -> Daemon {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("cairn.sock");
        Self::with_config(dir, other.config.clone(), socket, other.store_spec.clone())
    }

    fn with_config(
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: PathBuf,
        store_spec: String,
    ) -> Daemon {
        let mut daemon = Daemon {
            state_dir: dir.path().join("state"),
            socket,
            config,
            store_spec,
            log_filter: None,
            child: None,
            dir,
        };
        daemon.run();
        daemon
    }

    /// Starts the daemon process and waits for its socket.
    pub fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(filter) = &self.log_filter {
            command.env("CAIRN_LOG", filter);
        }
        // SIGTERM when the test process ends, so the daemon removes its socket: Docker keeps
        // trying a plugin socket that is there but dead.
        let mut child = spawn_with_death_signal(command, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("cairn serve exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "cairn serve did not listen within 20 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// What the daemon printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "cairn serve exited with {status}: {}",
                self.log()
            );
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// One protocol call: the HTTP status and the JSON answer.
    pub fn call(&self, endpoint: &str, body: impl Into<Bytes>) -> (u16, Value) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(call(&self.socket, endpoint, body.into()))
    }

    /// Create; returns Err (empty on success).
    pub fn create(&self, name: &str, opts: Value) -> String {
        let (status, answer) = self.call(
            "/VolumeDriver.Create",
            json!({"Name": name, "Opts": opts}).to_string(),
        );
        assert_eq!(status, 200, "{answer}");
        answer["Err"].as_str().unwrap().to_string()
    }

    /// Mount with ID `id`; returns the whole answer.
    pub fn mount(&self, name: &str, id: &str) -> Value {
        let (status, answer) = self.call(
            "/VolumeDriver.Mount",
            json!({"Name": name, "ID": id}).to_string(),
        );
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// Unmount of ID `id`; returns Err.
    pub fn unmount(&self, name: &str, id: &str) -> String {
        let (_, answer) = self.call(
            "/VolumeDriver.Unmount",
            json!({"Name": name, "ID": id}).to_string(),
        );
        answer["Err"].as_str().unwrap().to_string()
    }

    /// Get's Status of a volume.
    pub fn status(&self, name: &str) -> Value {
        let (_, answer) = self.call("/VolumeDriver.Get", json!({"Name": name}).to_string());
        assert_eq!(answer["Err"], "", "{answer}");
        answer["Volume"]["Status"].clone()
    }

    /// The names List gives.
    pub fn names(&self) -> Vec<String> {
        let (_, answer) = self.call("/VolumeDriver.List", "{}");
        assert_eq!(answer["Err"], "", "{answer}");
        answer["Volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["Name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The store new volumes go to, reached directly (not through cairn's mount).
    pub fn direct(&self) -> Direct {
        Direct::new(&self.store_spec)
    }

    pub fn mountpoint(&self, volume: &str) -> PathBuf {
        self.state_dir.join("mounts").join(volume)
    }

    /// The PIDs of this daemon's mount processes.
    pub fn mount_processes(&self) -> Vec<u32> {
        let state = self.state_dir.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            });
            if !zombie && args.contains(&state) && args.iter().any(|a| a == "mount") {
                pids.push(pid);
            }
        }
        pids
    }
}

/// One call to a plugin socket.
pub async fn call(socket: &Path, endpoint: &str, body: Bytes) -> (u16, Value) {
    let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
    let request = hyper::Request::post(hyperlocal::Uri::new(socket, endpoint))
        .header("Content-Type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let response = client
        .request(request)
        .await
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{endpoint} answered {status} with non-JSON {body:?}: {e}"));
    (status, json)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        // Mount processes outlive the daemon by design; a test that ends early leaves some.
        let pids = self.mount_processes();
        for pid in &pids {
            // SAFETY: signalling a mount process this test's daemon started.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.mount_processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(mounts) = std::fs::read_dir(self.state_dir.join("mounts")) {
            for mount in mounts.flatten() {
                if is_mounted(&mount.path()) {
                    let _ = Command::new("umount").arg("-l").arg(mount.path()).status();
                }
            }
        }
    }
}
