//! End to end with a real dockerd and real containers: the docker CLI creates, inspects, mounts
//! and removes cairn volumes, and containers write and read through them. Every test runs once
//! with the embedded dir store and once with an S3 store (moto).
//!
//! The daemons (`cairn serve`, known to Docker by their socket's name) live as long as the test
//! process, one per store kind, plus one per kind for the test that restarts its daemon: Docker
//! remembers every volume driver it has talked to, and `docker volume ls` waits on a dead one.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::daemon::{Daemon, StoreKind};

/// The test image: busybox and sqlite3 (scripts/test builds it with `docker import`).
fn image() -> String {
    std::env::var("CAIRN_TEST_IMAGE").unwrap_or_else(|_| "cairn-test:2".into())
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker (install docker.io; scripts/test does): {e}"))
}

/// Runs docker and returns its stdout, failing the test with its stderr if it fails.
fn docker_ok(args: &[&str]) -> String {
    let output = docker(args);
    assert!(
        output.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The daemon Docker knows as `driver`, started on first use and kept for the test process.
fn daemon(driver: &str, kind: StoreKind) -> &'static Mutex<Daemon> {
    static DAEMONS: OnceLock<Mutex<HashMap<String, &'static Mutex<Daemon>>>> = OnceLock::new();
    let mut daemons = DAEMONS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    daemons
        .entry(driver.to_string())
        .or_insert_with(|| Box::leak(Box::new(Mutex::new(Daemon::for_docker(kind, driver)))))
}

/// One test's world: the cairn daemon it uses (by driver name), and the containers and volumes
/// it made, removed at the end even when the test fails.
struct World {
    driver: String,
    daemon: &'static Mutex<Daemon>,
    suffix: String,
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl World {
    /// A world on the daemon the tests of `kind` share.
    fn new(kind: StoreKind) -> World {
        Self::on_daemon(kind, "shared")
    }

    /// A world on a daemon of its own, named after `role`.
    fn on_daemon(kind: StoreKind, role: &str) -> World {
        let info = docker(&["info", "--format", "{{.ServerVersion}}"]);
        assert!(
            info.status.success(),
            "dockerd is not reachable: run the README's test command, which starts it ({})",
            String::from_utf8_lossy(&info.stderr)
        );
        assert!(
            docker(&["image", "inspect", &image()]).status.success(),
            "the test image {} is missing: scripts/test builds it from busybox-static and sqlite3",
            image()
        );
        let kind_name = match kind {
            StoreKind::Dir => "dir",
            StoreKind::S3 => "s3",
        };
        let driver = format!("cairn-test-{role}-{kind_name}");
        World {
            daemon: daemon(&driver, kind),
            driver,
            suffix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            containers: Vec::new(),
            volumes: Vec::new(),
        }
    }

    /// The names of this driver's volumes that `docker volume ls` shows.
    fn listed(&self) -> Vec<String> {
        let filter = format!("driver={}", self.driver);
        docker_ok(&["volume", "ls", "-q", "--filter", &filter])
            .lines()
            .map(String::from)
            .collect()
    }

    fn daemon(&self) -> MutexGuard<'_, Daemon> {
        self.daemon.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A volume name no other test uses.
    fn volume(&mut self, label: &str) -> String {
        let name = format!("{label}-{}", self.suffix);
        self.volumes.push(name.clone());
        name
    }

    fn create(&mut self, label: &str, options: &[&str]) -> String {
        let name = self.volume(label);
        let mut args = vec!["volume", "create", "-d", &self.driver];
        for option in options {
            args.extend(["-o", option]);
        }
        args.push(&name);
        docker_ok(&args);
        name
    }

    /// Runs a command in a new container with `volume` on /data, and removes the container.
    fn run(&self, volume: &str, script: &str) -> String {
        let mount = format!("{volume}:/data");
        docker_ok(&["run", "--rm", "-v", &mount, &image(), "sh", "-c", script])
    }

    /// Starts a container in the background with `volume` on /data.
    fn start(&mut self, volume: &str, script: &str) -> String {
        let name = format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mount = format!("{volume}:/data");
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "-v",
            &mount,
            &image(),
            "sh",
            "-c",
            script,
        ]);
        self.containers.push(name.clone());
        name
    }

    /// What the store holds for a file of a volume, read directly (not through cairn's mount).
    fn stored(&self, volume: &str, path: &str) -> Option<Vec<u8>> {
        let key = format!("{volume}/{path}");
        let daemon = self.daemon();
        match daemon.store_spec.strip_prefix("dir://") {
            // A dir store keeps an object as a plain file of the same path.
            Some(root) => std::fs::read(std::path::Path::new(root).join(key)).ok(),
            None => daemon.direct().get(&key).map(|(_, body)| body),
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = docker(&["rm", "-f", container]);
        }
        for volume in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", volume]);
        }
    }
}

/// Waits until `check` holds, failing after 20 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cli_lifecycle(kind: StoreKind) {
    let mut world = World::new(kind);
    let name = world.create("life", &["cache_size=1G", "writeback_delay=1"]);
    assert!(world.listed().contains(&name));
    let inspect = docker_ok(&["volume", "inspect", &name]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let volume = &inspect[0];
    assert_eq!(volume["Driver"], world.driver.as_str());
    assert_eq!(volume["Status"]["options"]["cache_size"], "1G");
    assert_eq!(volume["Status"]["mounted"], false);
    let scope = if kind == StoreKind::S3 {
        "global"
    } else {
        "local"
    };
    assert_eq!(volume["Scope"], scope);
    docker_ok(&["volume", "rm", &name]);
    assert!(!world.listed().contains(&name));
}

fn data_outlives_the_container(kind: StoreKind) {
    let mut world = World::new(kind);
    let name = world.create("keep", &[]);
    world.run(
        &name,
        "mkdir -p /data/app && echo 'state 1' > /data/app/state.txt && echo done",
    );
    // The container is gone and Docker has unmounted the volume: the store has the data.
    assert_eq!(
        world.stored(&name, "app/state.txt").as_deref(),
        Some(&b"state 1\n"[..])
    );
    let read = world.run(&name, "cat /data/app/state.txt");
    assert_eq!(read, "state 1\n");
}

fn two_containers_share_a_volume(kind: StoreKind) {
    let mut world = World::new(kind);
    let name = world.create("share", &[]);
    let writer = world.start(&name, "echo from-writer > /data/w.txt; sleep 60");
    eventually("the writer has written", || {
        docker(&["exec", &writer, "cat", "/data/w.txt"])
            .status
            .success()
    });
    let read = world.run(&name, "cat /data/w.txt; echo from-reader > /data/r.txt");
    assert_eq!(read, "from-writer\n");
    assert_eq!(
        docker_ok(&["exec", &writer, "cat", "/data/r.txt"]),
        "from-reader\n"
    );
    docker_ok(&["rm", "-f", &writer]);
    assert_eq!(
        world.stored(&name, "r.txt").as_deref(),
        Some(&b"from-reader\n"[..])
    );
}

fn the_mount_flag_creates_and_mounts(kind: StoreKind) {
    let mut world = World::new(kind);
    let name = world.volume("flag");
    let mount = format!(
        "type=volume,source={name},target=/data,volume-driver={},volume-opt=cache_size=512M",
        world.driver
    );
    let out = docker_ok(&[
        "run",
        "--rm",
        "--mount",
        &mount,
        &image(),
        "sh",
        "-c",
        "echo hi > /data/f; cat /data/f",
    ]);
    assert_eq!(out, "hi\n");
    let inspect: serde_json::Value =
        serde_json::from_str(&docker_ok(&["volume", "inspect", &name])).unwrap();
    assert_eq!(inspect[0]["Status"]["options"]["cache_size"], "512M");
    assert_eq!(world.stored(&name, "f").as_deref(), Some(&b"hi\n"[..]));
}

fn a_bad_option_shows_cairns_message(kind: StoreKind) {
    let mut world = World::new(kind);
    let name = world.volume("bad");
    let create_with =
        |option: &str| docker(&["volume", "create", "-d", &world.driver, "-o", option, &name]);
    let output = create_with("colour=red");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown volume option \"colour\"") && stderr.contains("cache_size"),
        "{stderr}"
    );
    let output = create_with("fsync=never");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("fsync") && stderr.contains("store or local"),
        "{stderr}"
    );
    assert!(!world.listed().contains(&name));
}

fn a_daemon_restart_leaves_the_container_running(kind: StoreKind) {
    let mut world = World::on_daemon(kind, "restart");
    let name = world.create("steady", &[]);
    let container = world.start(
        &name,
        "i=0; while true; do echo $i >> /data/log; i=$((i+1)); sleep 0.1; done",
    );
    let lines = |world: &World| {
        let out = docker(&["exec", &container, "cat", "/data/log"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = world;
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    eventually("the container writes", || lines(&world) > 3);
    world.daemon().restart();
    let before = lines(&world);
    eventually("the container goes on writing", || {
        lines(&world) > before + 5
    });
    docker_ok(&["rm", "-f", &container]);
    let stored = world.stored(&name, "log").expect("the log is in the store");
    assert!(stored.split(|b| *b == b'\n').count() > before + 5);
    assert!(
        world.daemon().mount_processes().is_empty(),
        "the new daemon unmounted it"
    );
}

/// `docker volume prune` removes only volumes of Docker's `local` driver (Docker's rule, not
/// cairn's): cairn volumes and their data stay. Unused cairn volumes are removed by listing the
/// dangling ones of the driver and removing them, as docs/OPERATIONS.md says.
fn unused_volumes_are_pruned_by_driver(kind: StoreKind) {
    let mut world = World::new(kind);
    let label = format!("cairn-test={}", world.suffix);
    let unused = world.volume("unused");
    let used = world.volume("used");
    for name in [&unused, &used] {
        docker_ok(&[
            "volume",
            "create",
            "-d",
            &world.driver,
            "--label",
            &label,
            name,
        ]);
    }
    world.run(&unused, "echo precious > /data/p");
    let container = world.start(&used, "sleep 60");
    docker_ok(&[
        "volume",
        "prune",
        "-f",
        "--filter",
        &format!("label={label}"),
    ]);
    let ours = |world: &World| {
        let mut names = world.listed();
        names.retain(|name| name.ends_with(&world.suffix));
        names
    };
    assert_eq!(ours(&world).len(), 2, "prune leaves cairn volumes alone");
    assert_eq!(
        world.stored(&unused, "p").as_deref(),
        Some(&b"precious\n"[..])
    );

    let filter = format!("driver={}", world.driver);
    let dangling = docker_ok(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &filter,
        "--filter",
        "dangling=true",
    ]);
    let dangling: Vec<&str> = dangling
        .lines()
        .filter(|n| n.ends_with(&world.suffix))
        .collect();
    assert_eq!(dangling, [unused.as_str()]);
    docker_ok(&["volume", "rm", &unused]);
    assert_eq!(ours(&world), std::slice::from_ref(&used));
    assert_eq!(
        world.stored(&unused, "p"),
        None,
        "removing a volume removes its data"
    );
    docker_ok(&["rm", "-f", &container]);
}

/// Moving a stateful container between hosts: on host A (the daemon this dockerd talks to) a
/// container keeps files and a SQLite database with fsync'd transactions, then stops; host B
/// (another daemon, another host id, the same S3 store) mounts the volume, and a container on
/// B's mount finds every byte and a sound database. Meanwhile A cannot mount it.
#[test]
fn a_stateful_container_moves_to_another_host() {
    let mut world = World::on_daemon(StoreKind::S3, "move");
    let name = world.create("moved", &[]);
    let sql = |statement: &str| format!("sqlite3 /data/app.db \"{statement}\" >/dev/null");
    let mut script = vec![
        "mkdir -p /data/files".to_string(),
        "for i in 1 2 3 4 5; do echo file $i > /data/files/f$i; done".to_string(),
        sql("PRAGMA journal_mode=DELETE; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"),
    ];
    for i in 1..=20 {
        script.push(sql(&format!(
            "PRAGMA synchronous=FULL; BEGIN; INSERT INTO t (v) VALUES ('row {i}'); COMMIT;"
        )));
    }
    script.push("echo written".into());
    assert_eq!(world.run(&name, &script.join(" && ")), "written\n");

    let store_spec = world.daemon().store_spec.clone();
    let b = Daemon::as_host(&store_spec, "host-b", 30);
    let answer = b.mount(&name, "b1");
    assert_eq!(answer["Err"], "", "{answer}");
    let on_b = format!("{}:/data", b.mountpoint(&name).display());
    let check = docker_ok(&[
        "run",
        "--rm",
        "-v",
        &on_b,
        &image(),
        "sh",
        "-c",
        "sqlite3 /data/app.db 'PRAGMA integrity_check; SELECT count(*) FROM t;' && cat /data/files/f3",
    ]);
    assert_eq!(check, "ok\n20\nfile 3\n");

    let on_a = format!("{name}:/data");
    let refused = docker(&["run", "--rm", "-v", &on_a, &image(), "true"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in use by host host-b"), "{stderr}");

    assert_eq!(b.unmount(&name, "b1"), "");
    let back = world.run(&name, "sqlite3 /data/app.db 'SELECT count(*) FROM t'");
    assert_eq!(back, "20\n", "the volume moves back to host A");
}

/// The managed plugin, as a user installs it: the bundle script, `docker plugin create`, `set`
/// and `enable`; then a container writes to a volume of it and another reads it back, on an S3
/// store that the plugin's config (in the config mount, with its secret file) names.
#[test]
fn a_container_runs_on_the_managed_plugin() {
    const PLUGIN: &str = "cairn-test-managed:latest";
    let host = tempfile::tempdir().unwrap();
    let (bundle, etc, state) = (
        host.path().join("bundle"),
        host.path().join("etc"),
        host.path().join("state"),
    );
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let server = cairn_testkit::S3Server::shared();
    // The spec as the host sees it, and as the plugin does (its secret file in the config mount).
    let host_spec = server.spec(&cairn_testkit::S3Server::unique_prefix("managed"));
    let mut spec = host_spec.clone();
    if let Some(secret) = &server.secret_file {
        std::fs::copy(secret, etc.join("s3.secret")).unwrap();
        spec = spec.replace(&secret.display().to_string(), "/etc/cairn/s3.secret");
    }
    std::fs::write(
        etc.join("config.toml"),
        format!("default_store = \"s3\"\n[stores.s3]\nspec = \"{spec}\"\n"),
    )
    .unwrap();
    let built = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/plugin/build.sh"
    ))
    .arg(&bundle)
    .arg(env!("CARGO_BIN_EXE_cairn"))
    .output()
    .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );

    // A plugin left by an earlier run that failed half-way.
    let _ = docker(&["plugin", "rm", "-f", PLUGIN]);
    docker_ok(&["plugin", "create", PLUGIN, &bundle.display().to_string()]);
    let removed = RemoveOnDrop(vec!["plugin", "rm", "-f", PLUGIN]);
    docker_ok(&[
        "plugin",
        "set",
        PLUGIN,
        &format!("config.source={}", etc.display()),
        &format!("state.source={}", state.display()),
    ]);
    docker_ok(&["plugin", "enable", PLUGIN]);
    let volume = format!(
        "managed-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    docker_ok(&["volume", "create", "-d", PLUGIN, &volume]);
    let volume_removed = RemoveOnDrop(vec!["volume", "rm", "-f", &volume]);

    let mount = format!("{volume}:/data");
    let run =
        |script: &str| docker_ok(&["run", "--rm", "-v", &mount, &image(), "sh", "-c", script]);
    run("echo from the managed plugin > /data/note && sync");
    assert_eq!(run("cat /data/note"), "from the managed plugin\n");
    let status = docker_ok(&["volume", "inspect", "--format", "{{json .Status}}", &volume]);
    assert!(status.contains("s3://"), "{status}");
    let stored = crate::common::Direct::new(&host_spec)
        .get(&format!("{volume}/note"))
        .map(|(_, body)| body);
    assert_eq!(stored.as_deref(), Some(&b"from the managed plugin\n"[..]));
    assert!(
        state.join("registry.db").exists(),
        "the state mount holds the registry"
    );
    drop(volume_removed);
    drop(removed);
}

/// Runs `docker ARGS` when dropped, whatever the test's outcome (cleanup).
struct RemoveOnDrop<'a>(Vec<&'a str>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = docker(&self.0);
    }
}

/// A container makes, uses and removes a FIFO and a unix socket in its volume, as services do
/// beside their state (MySQL's `mysql.sock`). The socket half runs the host's Python, bind-mounted
/// read-only, since the busybox image has no tool that speaks unix sockets.
#[test]
fn a_container_uses_a_fifo_and_a_unix_socket_in_its_volume() {
    let mut world = World::new(StoreKind::S3);
    let name = world.create("special", &[]);
    let fifo = world.run(
        &name,
        "mkfifo /data/fifo && (echo through-the-fifo > /data/fifo &) && cat /data/fifo && \
         rm /data/fifo && echo removed",
    );
    assert_eq!(fifo, "through-the-fifo\nremoved\n");
    let script = "import os, socket, threading\n\
        server = socket.socket(socket.AF_UNIX)\n\
        server.bind('/data/app.sock')\n\
        server.listen(1)\n\
        def answer():\n    peer, _ = server.accept()\n    peer.sendall(b'pong')\n    peer.close()\n\
        threading.Thread(target=answer).start()\n\
        client = socket.socket(socket.AF_UNIX)\n\
        client.connect('/data/app.sock')\n\
        print(client.recv(4).decode(), os.path.exists('/data/app.sock'))\n\
        os.remove('/data/app.sock')\n";
    let mount = format!("{name}:/data");
    let socket = docker_ok(&[
        "run",
        "--rm",
        "-v",
        &mount,
        "-v",
        "/usr:/usr:ro",
        "-v",
        "/lib:/lib:ro",
        "-v",
        "/lib64:/lib64:ro",
        &image(),
        "/usr/bin/python3",
        "-c",
        script,
    ]);
    assert_eq!(socket, "pong True\n");
    assert_eq!(world.run(&name, "ls -A /data | wc -l"), "0\n");
}

/// Each scenario once on the embedded dir store and once on S3.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn dir_store() {
                    super::$scenario(super::StoreKind::Dir);
                }

                #[test]
                fn s3_store() {
                    super::$scenario(super::StoreKind::S3);
                }
            }
        )*
    };
}

on_both_stores!(
    cli_lifecycle,
    data_outlives_the_container,
    two_containers_share_a_volume,
    the_mount_flag_creates_and_mounts,
    a_bad_option_shows_cairns_message,
    a_daemon_restart_leaves_the_container_running,
    unused_volumes_are_pruned_by_driver,
);
