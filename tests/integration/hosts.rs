//! Volumes across hosts: two `cairn serve` daemons on this machine act as two hosts (their own
//! state directories, sockets and host ids) sharing one S3 server. Exclusive volumes are mounted
//! by one host at a time; a dead holder's lease expires and never before; a holder that lost its
//! lease overwrites nothing; shared and read-only volumes mount everywhere.

use std::time::{Duration, Instant};

use crate::common::daemon::Daemon;
use cairn_testkit::S3Server;
use serde_json::{Value, json};

/// Short leases, so that takeovers happen within a test.
const TTL: u64 = 4;

fn two_hosts() -> (Daemon, Daemon) {
    let spec = S3Server::shared().spec(&S3Server::unique_prefix("hosts"));
    (
        Daemon::as_host(&spec, "host-a", TTL),
        Daemon::as_host(&spec, "host-b", TTL),
    )
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: signalling a mount process this test's daemon started.
    unsafe { libc::kill(pid as i32, signal) };
}

fn the_mount_process(host: &Daemon) -> u32 {
    let pids = host.mount_processes();
    assert_eq!(pids.len(), 1, "{pids:?}");
    pids[0]
}

#[test]
fn an_exclusive_volume_is_mounted_by_one_host_at_a_time() {
    let (a, b) = two_hosts();
    assert_eq!(a.create("db", Value::Null), "");
    assert_eq!(a.mount("db", "a1")["Err"], "");
    std::fs::write(a.mountpoint("db").join("data"), b"written on A").unwrap();

    let refused = b.mount("db", "b1");
    let err = refused["Err"].as_str().unwrap();
    assert!(
        err.contains("in use by host host-a") && err.contains("this is host host-b"),
        "{err}"
    );
    assert!(err.contains("stop the volume's container there"), "{err}");
    let lease = b.status("db")["lease"].clone();
    assert!(lease.as_str().unwrap().contains("host host-a"), "{lease}");
    assert!(b.mount_processes().is_empty());
    let err = b
        .call("/VolumeDriver.Remove", json!({"Name": "db"}).to_string())
        .1;
    assert!(err["Err"].as_str().unwrap().contains("host-a"), "{err}");

    assert_eq!(a.unmount("db", "a1"), "");
    assert_eq!(b.mount("db", "b1")["Err"], "");
    assert_eq!(
        std::fs::read(b.mountpoint("db").join("data")).unwrap(),
        b"written on A"
    );
    assert_eq!(b.unmount("db", "b1"), "");
}

#[test]
fn a_dead_holders_lease_expires_and_its_unuploaded_changes_are_set_aside() {
    let (a, b) = two_hosts();
    assert_eq!(a.create("db", json!({"writeback_delay": "600"})), "");
    assert_eq!(a.mount("db", "a1")["Err"], "");
    // Closed, so on its way to the store, but not there when host A dies.
    std::fs::write(a.mountpoint("db").join("state"), b"A's last state").unwrap();
    signal(the_mount_process(&a), libc::SIGKILL);
    let died = Instant::now();

    let mut refusals = 0;
    loop {
        let answer = b.mount("db", "b1");
        if answer["Err"] == "" {
            break;
        }
        assert!(
            answer["Err"].as_str().unwrap().contains("host-a"),
            "{answer}"
        );
        refusals += 1;
        assert!(
            died.elapsed() < Duration::from_secs(TTL + 10),
            "never taken over"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The lease was renewed at most a third of the TTL before the kill (whole seconds).
    assert!(refusals > 0);
    assert!(
        died.elapsed() >= Duration::from_secs(TTL * 2 / 3 - 1),
        "taken over {:?} after the holder died, before its lease expired",
        died.elapsed()
    );
    std::fs::write(b.mountpoint("db").join("state"), b"B's state").unwrap();
    assert_eq!(b.unmount("db", "b1"), "");

    // Host A comes back: its old changes were made under a lease it lost, so they are set aside.
    assert_eq!(a.mount("db", "a2")["Err"], "");
    assert_eq!(
        std::fs::read(a.mountpoint("db").join("state")).unwrap(),
        b"B's state"
    );
    assert_eq!(a.unmount("db", "a2"), "");
    let stored = a.direct().get("db/state").unwrap().1;
    assert_eq!(stored, b"B's state", "A's stale change overwrote nothing");
    let log = std::fs::read_to_string(a.state_dir.join("volumes/db/mount.log")).unwrap();
    assert!(
        log.contains("never will be") && log.contains("set-aside"),
        "{log}"
    );
}

#[test]
fn a_holder_that_lost_its_lease_stops_writing_to_the_store() {
    let (a, b) = two_hosts();
    assert_eq!(a.create("db", json!({"writeback_delay": "5"})), "");
    assert_eq!(a.mount("db", "a1")["Err"], "");
    // Due for upload 5 s after the close: while host A is stalled, so the moment it resumes.
    std::fs::write(a.mountpoint("db").join("state"), b"A, pending").unwrap();
    // Host A stalls (a long pause, a network partition) past its lease.
    let stalled = the_mount_process(&a);
    signal(stalled, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(TTL + 2));
    let answer = b.mount("db", "b1");
    assert_eq!(answer["Err"], "", "{answer}");
    std::fs::write(b.mountpoint("db").join("state"), b"B, now the holder").unwrap();
    std::fs::File::open(b.mountpoint("db").join("state"))
        .unwrap()
        .sync_all()
        .unwrap();

    signal(stalled, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(TTL + 10);
    loop {
        let status = a.status("db");
        if status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("taken over"))
        {
            assert_eq!(status["permanent"], true, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "A never noticed: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let write = std::fs::write(a.mountpoint("db").join("more"), b"x");
    assert_eq!(crate::common::errno(write), libc::EROFS);
    assert_eq!(a.unmount("db", "a1"), "");
    assert_eq!(b.unmount("db", "b1"), "");
    assert_eq!(a.direct().get("db/state").unwrap().1, b"B, now the holder");
}

#[test]
fn a_shared_volume_is_written_on_one_host_and_read_on_another() {
    let (a, b) = two_hosts();
    assert_eq!(a.create("common", json!({"access": "shared"})), "");
    assert_eq!(a.mount("common", "a1")["Err"], "");
    assert_eq!(b.mount("common", "b1")["Err"], "", "no lease for shared");
    std::fs::write(a.mountpoint("common").join("note"), b"hello from A").unwrap();
    // Closed on A: uploaded after the write-back delay, seen on B within the metadata TTL.
    let deadline = Instant::now() + Duration::from_secs(15);
    let note = b.mountpoint("common").join("note");
    while std::fs::read(&note).ok().as_deref() != Some(b"hello from A") {
        assert!(Instant::now() < deadline, "B never saw A's file");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(a.unmount("common", "a1"), "");
    assert_eq!(b.unmount("common", "b1"), "");
}

/// A store whose config makes its volumes shared by default: a volume created with no options
/// (compose, swarm, `--volume-driver`) is shared, says so, and mounts on two hosts at once.
#[test]
fn a_stores_defaults_apply_to_volumes_created_without_options() {
    let spec = S3Server::shared().spec(&S3Server::unique_prefix("hosts"));
    let defaults = "[stores.main.defaults]\naccess = \"shared\"\nwriteback_delay = 0\n";
    let a = Daemon::as_host_with(&spec, "host-a", TTL, defaults);
    let b = Daemon::as_host_with(&spec, "host-b", TTL, defaults);
    assert_eq!(a.create("plain", Value::Null), "");
    let status = a.status("plain");
    assert_eq!(status["options"]["access"], "shared", "{status}");
    assert_eq!(
        status["options_from_store_defaults"],
        json!(["access", "writeback_delay"])
    );
    assert_eq!(a.mount("plain", "a1")["Err"], "");
    assert_eq!(b.mount("plain", "b1")["Err"], "", "no lease for shared");
    assert_eq!(a.unmount("plain", "a1"), "");
    assert_eq!(b.unmount("plain", "b1"), "");
}

#[test]
fn a_readonly_volume_refuses_writes_on_every_host() {
    let (a, b) = two_hosts();
    a.direct().put("ro/kept", b"kept", Default::default());
    assert_eq!(a.create("ro", json!({"access": "readonly"})), "");
    for (host, id) in [(&a, "a1"), (&b, "b1")] {
        assert_eq!(host.mount("ro", id)["Err"], "");
        let mountpoint = host.mountpoint("ro");
        assert_eq!(std::fs::read(mountpoint.join("kept")).unwrap(), b"kept");
        let write = std::fs::write(mountpoint.join("new"), b"x");
        assert_eq!(crate::common::errno(write), libc::EROFS);
    }
    assert_eq!(a.unmount("ro", "a1"), "");
    assert_eq!(b.unmount("ro", "b1"), "");
}
