//! `cairn ls` and `cairn report` against a running daemon, as an operator reads them.

mod common;

use std::process::{Command, Output};

use common::daemon::{Daemon, StoreKind};
use common::succeeded;
use serde_json::{Value, json};

fn cairn(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .expect("run cairn")
}

#[test]
fn reports_show_what_is_not_yet_in_the_store() {
    let daemon = Daemon::start(StoreKind::Dir);
    assert_eq!(
        daemon.create("db", json!({"writeback_delay": "600", "cache_size": "1G"})),
        ""
    );
    assert_eq!(daemon.create("web", json!({"access": "shared"})), "");
    assert_eq!(daemon.mount("db", "c1")["Err"], "");
    std::fs::write(daemon.mountpoint("db").join("dump.rdb"), vec![7u8; 5000]).unwrap();

    let all = succeeded(&cairn(&daemon, &["report"]));
    assert!(all.contains("=====> db volume information\n"), "{all}");
    assert!(all.contains("=====> web volume information\n"), "{all}");
    let db_block = all.split("=====> web").next().unwrap();
    for line in [
        "Volume access:               exclusive",
        "Volume mounted:              true",
        "Volume mount ids:            1",
        "Volume cache limit:          1G",
        "Volume dirty changes:        1",
        "Volume last error:           none",
    ] {
        assert!(db_block.contains(line), "{line:?} in {db_block}");
    }
    assert!(
        db_block.contains("Volume lease:                host "),
        "{db_block}"
    );

    let dirty = succeeded(&cairn(&daemon, &["report", "db", "--volume-dirty-bytes"]));
    // The local disk the changes take (whole blocks): at least the 5000 bytes written.
    let dirty: u64 = dirty.trim().parse().expect("a bare number");
    assert!((5000..=64 * 1024).contains(&dirty), "{dirty}");
    assert!(db_block.contains(&format!("Volume dirty bytes:          {dirty}\n")));
    let json: Value = serde_json::from_str(&succeeded(&cairn(
        &daemon,
        &["report", "web", "--format", "json"],
    )))
    .unwrap();
    assert_eq!(json[0]["access"], "shared");
    assert_eq!(json[0]["mounted"], false);

    let listed = succeeded(&cairn(&daemon, &["ls"]));
    let lines: Vec<&str> = listed.lines().collect();
    assert!(
        lines[0].starts_with("NAME  ACCESS     MOUNTED  DIRTY BYTES  STORE"),
        "{listed}"
    );
    assert!(
        lines[1].starts_with(&format!("db    exclusive  true     {dirty}")),
        "{listed}"
    );
    assert!(
        lines[2].starts_with("web   shared     false    0"),
        "{listed}"
    );

    let unknown = cairn(&daemon, &["report", "db", "--volume-colour"]);
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("--volume-dirty-bytes"),
        "the flags are listed: {err}"
    );
    // A volume's name is enough for a flush.
    let flushed = succeeded(&cairn(&daemon, &["flush", "db"]));
    assert!(
        flushed.contains("flushed: the store holds everything"),
        "{flushed}"
    );
    let dump = daemon
        .direct()
        .get("db/dump.rdb")
        .expect("in the store after the flush");
    assert_eq!(dump.1.len(), 5000);
    let missing = cairn(&daemon, &["report", "nosuch"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such volume"));
    assert_eq!(daemon.unmount("db", "c1"), "");
}

#[test]
fn without_a_daemon_the_report_says_so() {
    let output = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["ls", "--socket", "/nonexistent/cairn.sock"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("is `cairn serve` running?"), "{err}");
}
