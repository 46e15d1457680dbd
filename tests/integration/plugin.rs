//! The VolumeDriver protocol over the plugin socket, as Docker speaks it: every endpoint, bad
//! input, concurrent mounts, a second daemon on the same store, a daemon restart and a crashed
//! mount process. Real `cairn serve`, real mount processes, real FUSE mounts.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::common::daemon::{Daemon, StoreKind, call};
use crate::common::is_mounted;
use serde_json::{Value, json};

fn body(value: Value) -> String {
    value.to_string()
}

#[test]
fn activation_and_capabilities() {
    let daemon = Daemon::start(StoreKind::Dir);
    let socket = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(
        socket.permissions().mode() & 0o777,
        0o660,
        "only root and group docker"
    );
    for private in ["", "mounts", "volumes"] {
        let dir = daemon.state_dir.join(private);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is for root only", dir.display());
    }
    let (status, answer) = daemon.call("/Plugin.Activate", "");
    assert_eq!(
        (status, answer),
        (200, json!({"Implements": ["VolumeDriver"]}))
    );
    let (_, answer) = daemon.call("/VolumeDriver.Capabilities", "{}");
    assert_eq!(answer, json!({"Capabilities": {"Scope": "local"}}));
    let s3 = Daemon::start(StoreKind::S3);
    let (_, answer) = s3.call("/VolumeDriver.Capabilities", "{}");
    assert_eq!(answer, json!({"Capabilities": {"Scope": "global"}}));
}

#[test]
fn bad_requests_get_clear_errors() {
    let daemon = Daemon::start(StoreKind::Dir);
    let (status, answer) = daemon.call("/VolumeDriver.Create", "{\"Name\": ");
    assert_eq!(status, 400);
    assert!(
        answer["Err"]
            .as_str()
            .unwrap()
            .contains("malformed request"),
        "{answer}"
    );
    let (status, answer) = daemon.call("/VolumeDriver.Mount", body(json!({"Name": "x1"})));
    assert_eq!(status, 400, "a Mount without ID: {answer}");
    let (status, answer) = daemon.call("/VolumeDriver.Snapshot", "{}");
    assert_eq!(status, 404);
    assert!(
        answer["Err"]
            .as_str()
            .unwrap()
            .contains("/VolumeDriver.Mount"),
        "{answer}"
    );
    let huge = format!("{{\"Name\": \"{}\"}}", "a".repeat(1 << 20));
    let (status, answer) = daemon.call("/VolumeDriver.Create", huge);
    assert_eq!(status, 413, "{answer}");

    for bad in ["../etc", "a/b", ".hidden", "x", ""] {
        let err = daemon.create(bad, Value::Null);
        assert!(err.contains("invalid volume name"), "{bad:?}: {err}");
    }
    let err = daemon.create("opts", json!({"colour": "red"}));
    assert!(
        err.contains("\"colour\"") && err.contains("cache_size"),
        "{err}"
    );
    let err = daemon.create("opts", json!({"cache_size": "lots"}));
    assert!(err.contains("cache_size"), "{err}");
    let err = daemon.create("opts", json!({"path": "../../etc"}));
    assert!(err.contains("path"), "{err}");
    let err = daemon.create("opts", json!({"store": "nowhere"}));
    assert!(err.contains("unknown store \"nowhere\""), "{err}");
    assert!(daemon.names().is_empty(), "no bad request created a volume");

    let (_, answer) = daemon.call("/VolumeDriver.Get", body(json!({"Name": "missing"})));
    assert!(
        answer["Err"].as_str().unwrap().contains("no such volume"),
        "{answer}"
    );
    let answer = daemon.mount("missing", "id1");
    assert!(
        answer["Err"].as_str().unwrap().contains("no such volume"),
        "{answer}"
    );
    assert!(daemon.mount_processes().is_empty());
}

#[test]
fn volume_lifecycle() {
    let daemon = Daemon::start(StoreKind::Dir);
    assert_eq!(daemon.create("web", json!({"cache_size": "1G"})), "");
    assert_eq!(
        daemon.create("web", json!({"cache_size": "1G"})),
        "",
        "idempotent"
    );
    let err = daemon.create("web", json!({"cache_size": "2G"}));
    assert!(err.contains("exists with other options"), "{err}");
    assert_eq!(daemon.create("db", Value::Null), "");
    assert_eq!(daemon.names(), ["db", "web"]);
    let (_, listed) = daemon.call("/VolumeDriver.List", "{}");
    let web = &listed["Volumes"][1];
    assert!(web["CreatedAt"].as_str().unwrap().ends_with('Z'), "{web}");
    assert_eq!(web["Status"]["mounted"], false, "{web}");
    assert!(
        web["Status"]["store"].as_str().unwrap().ends_with("/web"),
        "{web}"
    );

    let (_, answer) = daemon.call("/VolumeDriver.Get", body(json!({"Name": "web"})));
    let volume = &answer["Volume"];
    assert_eq!(volume["Name"], "web");
    assert_eq!(
        volume["Mountpoint"],
        daemon.mountpoint("web").to_str().unwrap()
    );
    assert!(
        volume["CreatedAt"].as_str().unwrap().ends_with('Z'),
        "{volume}"
    );
    assert_eq!(volume["Status"]["mounted"], false);
    assert_eq!(volume["Status"]["options"]["cache_size"], "1G");
    let (_, answer) = daemon.call("/VolumeDriver.Path", body(json!({"Name": "web"})));
    assert_eq!(
        answer["Mountpoint"],
        daemon.mountpoint("web").to_str().unwrap()
    );

    let answer = daemon.mount("web", "c1");
    assert_eq!(answer["Err"], "");
    let mountpoint = daemon.mountpoint("web");
    assert_eq!(answer["Mountpoint"], mountpoint.to_str().unwrap());
    std::fs::write(mountpoint.join("index.html"), b"<h1>hi</h1>").unwrap();
    for private in ["volumes/web", "volumes/web/cache", "volumes/web/cache/data"] {
        let dir = daemon.state_dir.join(private);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is for root only", dir.display());
    }
    assert_eq!(daemon.mount("web", "c1")["Err"], "", "the same ID again");
    assert_eq!(daemon.mount("web", "c2")["Err"], "");
    let live = daemon.status("web");
    assert_eq!(
        (live["mounted"].clone(), live["mounts"].clone()),
        (json!(true), json!(2))
    );
    assert_eq!(daemon.mount_processes().len(), 1);

    let err = daemon
        .call("/VolumeDriver.Remove", body(json!({"Name": "web"})))
        .1["Err"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(daemon.unmount("web", "c1"), "");
    assert_eq!(daemon.unmount("web", "c1"), "", "the same ID again");
    assert!(is_mounted(&mountpoint), "c2 still uses it");
    assert_eq!(daemon.unmount("web", "c2"), "");
    assert!(!is_mounted(&mountpoint));
    assert!(daemon.mount_processes().is_empty());
    // The last unmount returns once the store has everything.
    let direct = daemon.direct();
    assert_eq!(direct.get("web/index.html").unwrap().1, b"<h1>hi</h1>");

    let (_, answer) = daemon.call("/VolumeDriver.Remove", body(json!({"Name": "web"})));
    assert_eq!(answer["Err"], "");
    assert_eq!(daemon.names(), ["db"]);
    assert!(
        direct.keys("web/").is_empty(),
        "the volume's data went with it"
    );
    assert!(direct.keys(".cairn/volumes/web").is_empty());
}

#[test]
fn a_path_volume_presents_existing_data_and_keeps_it() {
    let daemon = Daemon::start(StoreKind::S3);
    let direct = daemon.direct();
    direct.put("site/public/index.html", b"existing", Default::default());
    assert_eq!(
        daemon.create("site", json!({"path": "site/public", "access": "readonly"})),
        ""
    );
    let answer = daemon.mount("site", "c1");
    assert_eq!(answer["Err"], "", "{answer}");
    let mountpoint = daemon.mountpoint("site");
    assert_eq!(
        std::fs::read(mountpoint.join("index.html")).unwrap(),
        b"existing"
    );
    let write = std::fs::write(mountpoint.join("new.txt"), b"x");
    assert_eq!(
        crate::common::errno(write),
        libc::EROFS,
        "access=readonly mounts read-only"
    );
    assert_eq!(daemon.unmount("site", "c1"), "");
    let (_, answer) = daemon.call("/VolumeDriver.Remove", body(json!({"Name": "site"})));
    assert_eq!(answer["Err"], "");
    assert_eq!(direct.get("site/public/index.html").unwrap().1, b"existing");
}

#[test]
fn a_storm_of_mounts_starts_one_process() {
    let daemon = Daemon::start(StoreKind::Dir);
    assert_eq!(daemon.create("busy", Value::Null), "");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _entered = runtime.enter();
    let calls = (0..100).map(|i| {
        let socket = daemon.socket.clone();
        tokio::spawn(async move {
            let request = body(json!({"Name": "busy", "ID": format!("id-{i}")}));
            call(&socket, "/VolumeDriver.Mount", request.into()).await
        })
    });
    for answer in runtime.block_on(futures::future::join_all(calls)) {
        let (status, answer) = answer.unwrap();
        assert_eq!(
            (status, answer["Err"].clone()),
            (200, json!("")),
            "{answer}"
        );
    }
    assert_eq!(daemon.mount_processes().len(), 1);
    assert_eq!(daemon.status("busy")["mounts"], 100);
    std::fs::write(daemon.mountpoint("busy").join("f"), b"storm").unwrap();

    let calls = (0..100).map(|i| {
        let socket = daemon.socket.clone();
        tokio::spawn(async move {
            let request = body(json!({"Name": "busy", "ID": format!("id-{i}")}));
            call(&socket, "/VolumeDriver.Unmount", request.into()).await
        })
    });
    for answer in runtime.block_on(futures::future::join_all(calls)) {
        assert_eq!(answer.unwrap().1["Err"], "");
    }
    let after = daemon.status("busy");
    assert_eq!(
        (after["mounts"].clone(), after["mounted"].clone()),
        (json!(0), json!(false))
    );
    assert!(daemon.mount_processes().is_empty());
    assert!(!is_mounted(&daemon.mountpoint("busy")));
    assert_eq!(daemon.direct().get("busy/f").unwrap().1, b"storm");
}

#[test]
fn a_second_daemon_on_the_same_store_sees_the_same_volumes() {
    let first = Daemon::start(StoreKind::S3);
    assert_eq!(first.create("shared1", json!({"access": "shared"})), "");
    assert_eq!(first.mount("shared1", "a")["Err"], "");
    std::fs::write(first.mountpoint("shared1").join("note"), b"from host one").unwrap();
    assert_eq!(first.unmount("shared1", "a"), "");

    let second = Daemon::sharing_store_of(&first);
    assert_eq!(second.names(), ["shared1"]);
    assert_eq!(
        second.create("shared1", json!({"access": "shared"})),
        "",
        "same options"
    );
    assert_eq!(second.mount("shared1", "b")["Err"], "");
    assert_eq!(
        std::fs::read(second.mountpoint("shared1").join("note")).unwrap(),
        b"from host one"
    );
    assert_eq!(second.unmount("shared1", "b"), "");
    let (_, answer) = second.call("/VolumeDriver.Remove", body(json!({"Name": "shared1"})));
    assert_eq!(answer["Err"], "");
    assert!(first.names().is_empty(), "the first host sees the removal");
}

#[test]
fn a_restarted_daemon_adopts_running_mounts() {
    let mut daemon = Daemon::start(StoreKind::Dir);
    assert_eq!(daemon.create("steady", Value::Null), "");
    assert_eq!(daemon.mount("steady", "c1")["Err"], "");
    let pid = daemon.status("steady")["pid"].clone();
    let mountpoint = daemon.mountpoint("steady");

    daemon.stop();
    std::fs::write(
        mountpoint.join("during"),
        b"written while the daemon was down",
    )
    .unwrap();
    daemon.run();
    let adopted = daemon.status("steady");
    assert_eq!(
        (adopted["pid"].clone(), adopted["mounted"].clone()),
        (pid, json!(true))
    );
    assert_eq!(daemon.mount("steady", "c2")["Err"], "");
    assert_eq!(daemon.mount_processes().len(), 1, "no second process");
    assert_eq!(daemon.unmount("steady", "c1"), "");
    assert_eq!(daemon.unmount("steady", "c2"), "");
    assert!(daemon.mount_processes().is_empty());
    assert_eq!(
        daemon.direct().get("steady/during").unwrap().1,
        b"written while the daemon was down"
    );
}

#[test]
fn a_crashed_mount_process_is_cleaned_up_and_started_again() {
    let daemon = Daemon::start(StoreKind::Dir);
    assert_eq!(daemon.create("fragile", Value::Null), "");
    assert_eq!(daemon.mount("fragile", "c1")["Err"], "");
    let mountpoint = daemon.mountpoint("fragile");
    std::fs::write(mountpoint.join("kept"), b"fsynced").unwrap();
    std::fs::File::open(mountpoint.join("kept"))
        .unwrap()
        .sync_all()
        .unwrap();
    let pids = daemon.mount_processes();
    assert_eq!(pids.len(), 1);
    // SAFETY: killing the mount process this test's daemon started.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !daemon.mount_processes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed process lingers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(daemon.status("fragile")["mounted"], false);

    let answer = daemon.mount("fragile", "c2");
    assert_eq!(answer["Err"], "", "{answer}");
    let restarted = daemon.mount_processes();
    assert_eq!(restarted.len(), 1);
    assert_ne!(restarted, pids);
    assert_eq!(std::fs::read(mountpoint.join("kept")).unwrap(), b"fsynced");
    assert_eq!(daemon.unmount("fragile", "c1"), "");
    assert_eq!(daemon.unmount("fragile", "c2"), "");
    assert!(!is_mounted(&mountpoint));
}

#[test]
fn a_mount_that_cannot_start_says_why() {
    let daemon = Daemon::start(StoreKind::Dir);
    assert_eq!(daemon.create("broken", Value::Null), "");
    // The volume's folder in the dir store is gone (someone deleted it by hand).
    let root = daemon.store_spec.trim_start_matches("dir://");
    std::fs::remove_dir_all(std::path::Path::new(root).join("broken")).unwrap();
    let answer = daemon.mount("broken", "c1");
    let err = answer["Err"].as_str().unwrap();
    assert!(
        err.contains("mounting volume broken") && err.contains("no such directory"),
        "{err}"
    );
    assert_eq!(
        daemon.status("broken")["mounts"],
        0,
        "a failed mount is not counted"
    );
    assert!(daemon.mount_processes().is_empty());
}

#[test]
fn an_unreachable_store_fails_create_with_the_reason() {
    let port = cairn_testkit::free_port();
    let server = cairn_testkit::S3Server::shared();
    let spec = server
        .spec("vols")
        .replace(&server.endpoint, &format!("http://127.0.0.1:{port}"));
    let daemon = Daemon::with_store(&spec);
    let err = daemon.create("far", Value::Null);
    assert!(
        err.contains("store \"main\"") && err.contains("127.0.0.1"),
        "{err}"
    );
    assert!(daemon.names().is_empty(), "{err}");
}

#[test]
fn no_credential_reaches_logs_errors_reports_or_inspect() {
    const KEY_ID: &str = "AKIAPLANTEDKEYID4711";
    const SECRET: &str = "planted-secret-do-not-print-0815";
    let server = cairn_testkit::S3Server::shared();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("s3.secret");
    std::fs::write(
        &secret_file,
        format!("aws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
    )
    .unwrap();
    let spec = format!(
        "s3://{}/{}?endpoint={}&secret_file={}",
        server.bucket,
        cairn_testkit::S3Server::unique_prefix("secret"),
        server.endpoint,
        secret_file.display()
    );
    let mut daemon = Daemon::with_store(&spec);
    daemon.stop();
    daemon.log_filter = Some("debug".into());
    daemon.run();

    let mut seen = Vec::new();
    assert_eq!(daemon.create("vault", Value::Null), "");
    seen.push(daemon.create("vault", json!({"cache_size": "lots"})));
    seen.push(daemon.mount("nosuch", "x")["Err"].to_string());
    assert_eq!(daemon.mount("vault", "c1")["Err"], "");
    std::fs::write(daemon.mountpoint("vault").join("f"), b"data").unwrap();
    seen.push(daemon.status("vault").to_string());
    for pid in daemon.mount_processes() {
        seen.push(
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
                .into_owned(),
        );
    }
    assert_eq!(daemon.unmount("vault", "c1"), "");
    seen.push(daemon.call("/VolumeDriver.List", "{}").1.to_string());
    let report = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["report", "--format", "json", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    seen.push(String::from_utf8_lossy(&report.stdout).into_owned());
    seen.push(daemon.log());
    let mount_log = daemon.state_dir.join("volumes/vault/mount.log");
    seen.push(std::fs::read_to_string(mount_log).unwrap());
    assert!(
        seen.last().unwrap().len() > 100,
        "the mount logged at debug level"
    );
    for text in &seen {
        assert!(
            !text.contains(SECRET) && !text.contains(KEY_ID),
            "a credential in: {text}"
        );
    }
}
