//! `cairn snapshot`: a volume whose service dumps its state to disk (a Redis-style dump.rdb) is
//! copied in its store while mounted, and a new volume restored from the copy has the dump byte
//! for byte, whatever changed after.

use std::process::{Command, Output};

use crate::common::daemon::{Daemon, StoreKind};
use crate::common::succeeded;
use serde_json::{Value, json};

fn snapshot(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--state-dir")
        .arg(&daemon.state_dir)
        .arg("snapshot")
        .args(args)
        .arg("--config")
        .arg(&daemon.config)
        .output()
        .expect("run cairn snapshot")
}

#[test]
fn a_snapshot_of_a_mounted_volume_restores_byte_for_byte() {
    let daemon = Daemon::start(StoreKind::S3);
    // Changes stay local for a long time: the snapshot must upload them first.
    assert_eq!(
        daemon.create("cache", json!({"writeback_delay": "600"})),
        ""
    );
    assert_eq!(daemon.mount("cache", "c1")["Err"], "");
    let dump: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mountpoint = daemon.mountpoint("cache");
    std::fs::create_dir(mountpoint.join("conf")).unwrap();
    std::fs::write(mountpoint.join("conf/redis.conf"), b"save 60 1\n").unwrap();
    std::fs::write(mountpoint.join("dump.rdb"), &dump).unwrap();

    // Three objects: the dump, the config file and the conf/ folder marker.
    let taken = succeeded(&snapshot(&daemon, &["create", "cache", "nightly"]));
    assert!(
        taken.contains("snapshot nightly of cache: 3 objects, 3000010 bytes"),
        "{taken}"
    );
    std::fs::write(mountpoint.join("dump.rdb"), b"a later dump").unwrap();
    assert_eq!(daemon.unmount("cache", "c1"), "");

    let listed = succeeded(&snapshot(&daemon, &["ls", "cache"]));
    assert!(
        listed.lines().nth(1).unwrap().starts_with("nightly  "),
        "{listed}"
    );
    let again = snapshot(&daemon, &["create", "cache", "nightly"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a snapshot nightly"));

    let restored = succeeded(&snapshot(
        &daemon,
        &["restore", "cache", "nightly", "cache-copy"],
    ));
    assert!(restored.contains("into volume cache-copy"), "{restored}");
    let (_, listed) = daemon.call("/VolumeDriver.List", "{}");
    let names: Vec<&str> = listed["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["Name"].as_str())
        .collect();
    assert_eq!(names, ["cache", "cache-copy"]);
    // Docker naming it with --volume-driver (Create without options) uses it as it is.
    assert_eq!(daemon.create("cache-copy", Value::Null), "");
    assert_eq!(daemon.mount("cache-copy", "c2")["Err"], "");
    let copy = daemon.mountpoint("cache-copy");
    assert!(
        std::fs::read(copy.join("dump.rdb")).unwrap() == dump,
        "byte for byte"
    );
    assert_eq!(
        std::fs::read(copy.join("conf/redis.conf")).unwrap(),
        b"save 60 1\n"
    );
    assert_eq!(daemon.unmount("cache-copy", "c2"), "");

    let taken = snapshot(&daemon, &["restore", "cache", "nightly", "cache-copy"]);
    assert!(String::from_utf8_lossy(&taken.stderr).contains("volume cache-copy exists"));
    let missing = snapshot(&daemon, &["restore", "cache", "weekly", "other"]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("no snapshot weekly") && err.contains("cairn snapshot ls cache"),
        "{err}"
    );
}
