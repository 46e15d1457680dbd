//! Direct routes (FUSE passthrough) through a real mount over a real S3 server: the kernel
//! writes a file created afresh, and reads a wholly cached one, straight from the cache file;
//! the mount still sees sizes, uploads what was written (fsync included) and lets the file be
//! opened any other way meanwhile.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use common::Volume;

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
