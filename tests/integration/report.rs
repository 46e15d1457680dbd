//! `cairn ls` and `cairn report` against a running daemon, as an operator reads them.

use std::process::{Command, Output};

use crate::common::daemon::{Daemon, StoreKind};
use crate::common::succeeded;
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

/// The body of `GET /metrics` on `address`, as Prometheus asks for it.
fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("the metrics address answers");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels, exactly as written), if there is one.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn prometheus_scrapes_what_the_mounts_do() {
    let mut daemon = Daemon::start(StoreKind::S3);
    let address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!("metrics_address = \"{address}\"\n{config}"),
    )
    .unwrap();
    daemon.restart();
    let idle = scrape(&address);
    assert_eq!(idle.trim(), "# EOF", "nothing mounted, nothing to show");

    assert_eq!(
        daemon.create("metered", json!({"writeback_delay": "600"})),
        ""
    );
    daemon
        .direct()
        .put("metered/old.bin", &[5u8; 300_000], Default::default());
    assert_eq!(daemon.mount("metered", "c1")["Err"], "");
    let mountpoint = daemon.mountpoint("metered");
    // A file created afresh is written by the kernel itself, and so is its read back (the
    // direct route: passthrough).
    std::fs::write(mountpoint.join("new.bin"), vec![9u8; 100_000]).unwrap();
    assert_eq!(
        std::fs::read(mountpoint.join("new.bin")).unwrap().len(),
        100_000
    );
    // The first read fetches old.bin through the mount; while it is open, every other open of
    // it goes the same way: a second read finds it in the cache, and a write into it is a FUSE
    // write request.
    let first = std::fs::File::open(mountpoint.join("old.bin")).unwrap();
    assert_eq!(
        std::io::Read::read_to_end(&mut &first, &mut Vec::new()).unwrap(),
        300_000
    );
    assert_eq!(
        std::fs::read(mountpoint.join("old.bin")).unwrap().len(),
        300_000
    );
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(mountpoint.join("old.bin"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&writer, &[8u8; 10], 0).unwrap();
    drop((first, writer));

    let before = scrape(&address);
    let volume = "volume=\"metered\"";
    assert_eq!(
        sample(&before, &format!("cairn_mounted{{{volume}}}")),
        Some(1.0)
    );
    let dirty = sample(&before, &format!("cairn_dirty_bytes{{{volume}}}")).unwrap();
    assert!(dirty >= 100_000.0, "{before}");
    let queued = sample(&before, &format!("cairn_upload_queue_changes{{{volume}}}")).unwrap();
    assert!(queued >= 1.0, "{before}");
    let misses = sample(&before, &format!("cairn_cache_misses_total{{{volume}}}")).unwrap();
    assert!(
        misses >= 1.0,
        "the first read of old.bin came from the store: {before}"
    );
    let writes = format!("cairn_fuse_operation_seconds_count{{{volume},op=\"write\"}}");
    assert!(sample(&before, &writes).unwrap() >= 1.0, "{before}");
    let received = format!("cairn_store_received_bytes_total{{{volume},op=\"get\"}}");
    assert!(sample(&before, &received).unwrap() >= 300_000.0, "{before}");

    succeeded(&cairn(&daemon, &["flush", "metered"]));
    let after = scrape(&address);
    assert_eq!(
        sample(&after, &format!("cairn_dirty_bytes{{{volume}}}")),
        Some(0.0),
        "{after}"
    );
    let sent = format!("cairn_store_sent_bytes_total{{{volume},op=\"put\"}}");
    assert!(sample(&after, &sent).unwrap() >= 100_000.0, "{after}");
    let hits = sample(&before, &format!("cairn_cache_hits_total{{{volume}}}")).unwrap();
    assert!(
        hits >= 1.0,
        "the second read found what the first fetched: {before}"
    );
    let direct = sample(&after, &format!("cairn_direct_opens_total{{{volume}}}")).unwrap();
    assert!(
        direct >= 2.0,
        "new.bin was written, and read back, by the kernel itself: {after}"
    );
    let uploaded = sample(&after, &format!("cairn_uploaded_bytes_total{{{volume}}}")).unwrap();
    assert!(uploaded >= 100_000.0, "{after}");
    assert_eq!(daemon.unmount("metered", "c1"), "");
    assert_eq!(scrape(&address).trim(), "# EOF");
}
