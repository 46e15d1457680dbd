//! Direct routes (FUSE passthrough) through a real mount over a real S3 server: the kernel
//! writes a file created afresh, and reads a wholly cached one, straight from the cache file;
//! the mount still sees sizes, uploads what was written (fsync included) and lets the file be
//! opened any other way meanwhile.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::common::Volume;

/// FUSE write and read requests the mount has answered so far.
fn requests(volume: &Volume, op: &str) -> u64 {
    volume.metrics().fuse.get(op).map_or(0, |l| l.count)
}

#[test]
fn a_file_written_afresh_goes_straight_to_the_cache_and_still_reaches_the_store() {
    let volume = Volume::new(&["--writeback-delay", "600"]);
    let mut file = File::create(volume.path("dump")).unwrap();
    file.write_all(&vec![5u8; 3 << 20]).unwrap();
    assert_eq!(
        fs::metadata(volume.path("dump")).unwrap().len(),
        3 << 20,
        "stat by path sees what the kernel wrote to the cache file"
    );
    file.write_all(&vec![6u8; 1 << 20]).unwrap();
    drop(file);
    let metrics = volume.metrics();
    assert!(metrics.direct_opens >= 1, "{metrics:?}");
    assert_eq!(
        requests(&volume, "write"),
        0,
        "no write went through the mount"
    );

    volume.flush();
    let (_, stored) = volume.direct().get(&volume.key("dump")).unwrap();
    assert_eq!(stored.len(), 4 << 20);
    assert!(stored[..3 << 20].iter().all(|b| *b == 5));
    assert!(stored[3 << 20..].iter().all(|b| *b == 6));

    // Read back: whole in the cache, so read by the kernel too.
    let reads_before = requests(&volume, "read");
    assert_eq!(fs::read(volume.path("dump")).unwrap(), stored);
    assert_eq!(requests(&volume, "read"), reads_before);
}

#[test]
fn fsync_of_a_file_written_afresh_returns_once_the_store_has_it() {
    let volume = Volume::new(&["--writeback-delay", "600"]);
    let mut file = File::create(volume.path("db")).unwrap();
    file.write_all(b"first").unwrap();
    file.sync_all().unwrap();
    let (_, stored) = volume.direct().get(&volume.key("db")).unwrap();
    assert_eq!(stored, b"first");
    file.write_all(b" second").unwrap();
    file.sync_all().unwrap();
    let (_, stored) = volume.direct().get(&volume.key("db")).unwrap();
    assert_eq!(stored, b"first second");
    assert_eq!(requests(&volume, "write"), 0);
}

#[test]
fn a_file_open_directly_can_be_opened_any_way_meanwhile() {
    let volume = Volume::new(&["--writeback-delay", "600"]);
    fs::write(volume.path("shared"), b"0123456789").unwrap();
    // A reader of the whole, cached file holds it open straight from the cache...
    let reader = File::open(volume.path("shared")).unwrap();
    let mut head = [0u8; 4];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"0123");
    // ...while another process writes into it without truncating, and appends.
    let writer = OpenOptions::new()
        .write(true)
        .open(volume.path("shared"))
        .unwrap();
    writer.write_all_at(b"AB", 0).unwrap();
    let mut appender = OpenOptions::new()
        .append(true)
        .open(volume.path("shared"))
        .unwrap();
    appender.write_all(b"++").unwrap();
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"AB23", "the reader sees the writer's bytes");
    assert_eq!(fs::metadata(volume.path("shared")).unwrap().len(), 12);
    drop((reader, writer, appender));
    volume.flush();
    let (_, stored) = volume.direct().get(&volume.key("shared")).unwrap();
    assert_eq!(stored, b"AB23456789++");

    // The other way round: a writer through the mount (not truncating) holds the file open,
    // and a reader opened meanwhile goes the same way.
    let mut appender = OpenOptions::new()
        .append(true)
        .open(volume.path("shared"))
        .unwrap();
    appender.write_all(b"!").unwrap();
    let mut text = String::new();
    File::open(volume.path("shared"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "AB23456789++!");
    drop(appender);
    // And once every handle is closed, a read goes straight to the cache again.
    assert_eq!(fs::read(volume.path("shared")).unwrap(), b"AB23456789++!");
}

#[test]
fn a_file_written_afresh_and_rewritten_without_pause_is_never_torn_in_the_store() {
    let volume = Volume::new(&["--writeback-delay", "0", "--max-dirty-age", "0.2"]);
    let store = volume.direct();
    let (size, chunk) = (4 << 20, 256 << 10);
    let file = File::create(volume.path("hot")).unwrap();
    let writer = std::thread::spawn(move || {
        let last = crate::common::rewrite_in_versions(&file, size, chunk, Duration::from_secs(4));
        // Still open, the writes paused: this version is uploaded without waiting for a close.
        (file, last)
    });
    let check = |body: &[u8]| {
        // Version `v` over `v - 1`: the first chunks new, the rest old (or not yet written, while
        // the first version is under way).
        let first = body[0];
        let boundary = body.iter().position(|b| *b != first).unwrap_or(body.len());
        assert!(
            boundary % chunk == 0
                && body[boundary..]
                    .iter()
                    .all(|b| *b == first.wrapping_sub(1) || (first == 1 && *b == 0)),
            "a torn object: starts {:?}, changes at {boundary}",
            &body[..4]
        );
    };
    while !writer.is_finished() {
        if let Some((_, body)) = store.get(&volume.key("hot")).filter(|(_, b)| !b.is_empty()) {
            check(&body);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (file, last) = writer.join().unwrap();
    let started = Instant::now();
    loop {
        let stored = store.get(&volume.key("hot")).map(|(_, body)| body);
        if let Some(body) = stored.as_ref().filter(|b| b.len() == size) {
            check(body);
            if body.iter().all(|b| *b == last) {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "version {last} not uploaded while the file stayed open, its writes paused"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(file);
}
