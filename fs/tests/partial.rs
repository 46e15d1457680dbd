//! A small change to a large stored file: the filesystem logic on a memory store (behind a
//! counting decorator) keeps the unchanged bytes in the store, and the upload copies those parts
//! inside the store. The object must still be exactly the file's version, after a crash too.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_fs::cache::Cache;
use cairn_fs::fs::{Filesystem, FsConfig};
use cairn_fs::namespace::ROOT;
use cairn_fs::store::faults::{FaultyStore, Op};
use cairn_fs::store::memory::MemoryStore;
use cairn_fs::store::{PutOptions, SharedStore, Store, StoreExt};

const MIB: u64 = 1 << 20;
/// Four parts of 5 MiB: 5, 5, 5 and 1 (neighbouring unchanged ones are copied as one).
const SIZE: u64 = 16 * MIB;

fn config() -> FsConfig {
    FsConfig {
        part_size: 5 * MIB,
        single_put_limit: 5 * MIB,
        block_size: 64 * 1024,
        max_readahead: 64 * 1024,
        copy_threshold: MIB,
        writeback_delay: Duration::ZERO,
        ..FsConfig::default()
    }
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

struct Setup {
    memory: Arc<MemoryStore>,
    counting: Arc<FaultyStore>,
    cache_dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let memory = Arc::new(MemoryStore::new());
        let body = Bytes::from(pattern(SIZE));
        memory
            .put("big", body, PutOptions::default())
            .await
            .unwrap();
        Setup {
            counting: Arc::new(FaultyStore::new(memory.clone() as SharedStore)),
            memory,
            cache_dir: tempfile::tempdir().unwrap(),
        }
    }

    fn mount(&self) -> (Arc<Filesystem>, tokio::task::JoinHandle<()>) {
        self.mount_with(config())
    }

    fn mount_with(&self, config: FsConfig) -> (Arc<Filesystem>, tokio::task::JoinHandle<()>) {
        let cache = Cache::open(self.cache_dir.path()).unwrap();
        let fs = Arc::new(Filesystem::new(self.counting.clone(), cache, config).unwrap());
        let uploader = fs.start_uploader();
        (fs, uploader)
    }

    async fn stored(&self, key: &str) -> Vec<u8> {
        self.memory.get_all(key).await.unwrap().1.to_vec()
    }
}

async fn open(fs: &Filesystem, name: &str) -> u64 {
    let ino = fs.lookup(ROOT, OsStr::new(name)).await.unwrap().ino;
    fs.open(ino, libc::O_RDWR).await.unwrap().fh
}

#[tokio::test]
async fn a_small_change_copies_the_unchanged_parts_inside_the_store() {
    let setup = Setup::new().await;
    let (fs, _uploader) = setup.mount();
    let fh = open(&fs, "big").await;
    fs.write(fh, 6 * MIB, b"0123456789").await.unwrap();
    assert_eq!(setup.counting.calls(Op::Get), 0, "a write fetches nothing");
    // A read of an unchanged part still comes from the store.
    let read = fs.read(fh, 12 * MIB, 100).await.unwrap();
    assert_eq!(
        &read[..],
        &pattern(SIZE)[(12 * MIB) as usize..(12 * MIB + 100) as usize]
    );
    fs.fsync(fh).await.unwrap();
    fs.release(fh).await.unwrap();

    let mut want = pattern(SIZE);
    want[(6 * MIB) as usize..(6 * MIB + 10) as usize].copy_from_slice(b"0123456789");
    assert!(
        setup.stored("big").await == want,
        "the object is the file's version"
    );
    assert_eq!(
        setup.counting.calls(Op::UploadPartCopy),
        2,
        "0-5 MiB copied, and 10-16 MiB as one part"
    );
    assert_eq!(
        setup.counting.calls(Op::UploadPart),
        1,
        "only part 2 uploaded"
    );
    // Part 2's unchanged bytes (two gaps) plus the one read above.
    assert!(
        setup.counting.calls(Op::Get) <= 3,
        "{}",
        setup.counting.calls(Op::Get)
    );

    // The file is clean now, and reads what it lacks from the new version.
    let fh = open(&fs, "big").await;
    let read = fs.read(fh, 6 * MIB - 5, 20).await.unwrap();
    assert_eq!(
        &read[..],
        &want[(6 * MIB - 5) as usize..(6 * MIB + 15) as usize]
    );
    fs.release(fh).await.unwrap();
}

#[tokio::test]
async fn a_partial_file_survives_a_crash_and_uploads_its_own_bytes() {
    let setup = Setup::new().await;
    let slow = FsConfig {
        writeback_delay: Duration::from_secs(3600),
        ..config()
    };
    let (fs, uploader) = setup.mount_with(slow);
    let fh = open(&fs, "big").await;
    fs.write(fh, MIB, b"first").await.unwrap();
    fs.flush(fh).await.unwrap(); // close: the upload is scheduled, an hour later
    fs.write(fh, 11 * MIB, b"second").await.unwrap();
    fs.flush(fh).await.unwrap();
    // The crash: the upload never ran, and the process is gone with the file still open.
    uploader.abort();
    let _ = uploader.await;
    drop(fs);

    let (fs, _uploader) = setup.mount();
    fs.drain(Some(Duration::from_secs(30))).await.unwrap();
    let mut want = pattern(SIZE);
    want[MIB as usize..(MIB + 5) as usize].copy_from_slice(b"first");
    want[(11 * MIB) as usize..(11 * MIB + 6) as usize].copy_from_slice(b"second");
    assert!(setup.stored("big").await == want);
}

#[tokio::test]
async fn truncating_and_growing_a_partial_file() {
    let setup = Setup::new().await;
    let (fs, _uploader) = setup.mount();
    let ino = fs.lookup(ROOT, OsStr::new("big")).await.unwrap().ino;
    let fh = fs.open(ino, libc::O_RDWR).await.unwrap().fh;
    fs.write(fh, 2 * MIB, b"x").await.unwrap();
    let shrink = cairn_fs::fs::SetAttrs {
        size: Some(9 * MIB),
        ..Default::default()
    };
    fs.setattr(ino, shrink).await.unwrap();
    fs.write(fh, 12 * MIB, b"tail").await.unwrap();
    fs.fsync(fh).await.unwrap();
    fs.release(fh).await.unwrap();

    let mut want = pattern(9 * MIB);
    want[(2 * MIB) as usize] = b'x';
    want.resize((12 * MIB) as usize, 0);
    want.extend_from_slice(b"tail");
    assert!(
        setup.stored("big").await == want,
        "the base below 9 MiB, zeros, then the tail"
    );
}

#[tokio::test]
async fn renaming_a_partial_file_fetches_the_rest_first() {
    let setup = Setup::new().await;
    let (fs, _uploader) = setup.mount();
    let fh = open(&fs, "big").await;
    fs.write(fh, 7 * MIB, b"moved").await.unwrap();
    fs.rename(ROOT, OsStr::new("big"), ROOT, OsStr::new("renamed"), false)
        .await
        .unwrap();
    fs.fsync(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.drain(Some(Duration::from_secs(30))).await.unwrap();

    let mut want = pattern(SIZE);
    want[(7 * MIB) as usize..(7 * MIB + 5) as usize].copy_from_slice(b"moved");
    assert!(setup.stored("renamed").await == want);
    assert!(setup.memory.head_opt("big").await.unwrap().is_none());
}

#[tokio::test]
async fn a_base_replaced_by_another_writer_is_never_mixed_in() {
    let setup = Setup::new().await;
    let (fs, _uploader) = setup.mount();
    let fh = open(&fs, "big").await;
    fs.write(fh, 3 * MIB, b"mine").await.unwrap();
    // Another host replaces the object before this upload.
    let theirs = Bytes::from(vec![7u8; SIZE as usize]);
    setup
        .memory
        .put("big", theirs.clone(), PutOptions::default())
        .await
        .unwrap();
    fs.release(fh).await.unwrap();
    let drained = fs.drain(Some(Duration::from_secs(3))).await;
    assert!(
        drained.is_err(),
        "the upload cannot be made of two versions"
    );
    assert!(
        setup.stored("big").await == theirs,
        "their version is untouched"
    );
    assert!(fs.upload_status().last_error.is_some());
}

#[tokio::test]
async fn a_partial_file_cut_to_nothing_is_whole_again_after_a_crash() {
    let setup = Setup::new().await;
    let slow = FsConfig {
        writeback_delay: Duration::from_secs(3600),
        ..config()
    };
    let (fs, uploader) = setup.mount_with(slow.clone());
    let ino = fs.lookup(ROOT, OsStr::new("big")).await.unwrap().ino;
    let fh = fs.open(ino, libc::O_RDWR).await.unwrap().fh;
    fs.write(fh, 4 * MIB, b"gone soon").await.unwrap();
    let empty = cairn_fs::fs::SetAttrs {
        size: Some(0),
        ..Default::default()
    };
    fs.setattr(ino, empty).await.unwrap();
    fs.write(fh, 0, b"all there is").await.unwrap();
    fs.flush(fh).await.unwrap();
    uploader.abort();
    let _ = uploader.await;
    drop(fs);

    let (fs, _uploader) = setup.mount_with(slow);
    fs.drain(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(setup.stored("big").await, b"all there is");
}
