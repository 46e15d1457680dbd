//! Micro-benchmarks of the paths every read and write goes through: the range bookkeeping of a
//! cached file, the cache index (SQLite) lookups, and the change log's record and take.
//!
//!     cargo bench -p cairn-fs --bench hot_paths

use std::hint::black_box;
use std::time::SystemTime;

use cairn_fs::cache::{Cache, RangeSet};
use cairn_fs::journal::{Change, Journal, StoredAttrs};
use cairn_fs::store::ETag;
use criterion::{Criterion, criterion_group, criterion_main};

/// A file read in 4 KiB pieces here and there: 1,000 separate spans over 64 MiB.
fn scattered() -> RangeSet {
    let mut present = RangeSet::default();
    for i in 0..1000u64 {
        let start = (i * 7919 % 16_384) * 4096;
        present.insert(start..start + 4096);
    }
    present
}

fn ranges(c: &mut Criterion) {
    c.bench_function("range set: insert 1,000 scattered spans", |b| {
        b.iter(|| black_box(scattered()))
    });
    let present = scattered();
    c.bench_function("range set: contains a 128 KiB read", |b| {
        b.iter(|| black_box(present.contains(black_box(8 << 20)..(8 << 20) + (128 << 10))))
    });
    c.bench_function("range set: missing pieces of a 1 MiB read", |b| {
        b.iter(|| black_box(present.missing(black_box(3 << 20)..4 << 20)))
    });
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    // Whole files, as most cached files are (a scattered one costs a row per span).
    let present = RangeSet::full(1 << 20);
    for i in 0..1000 {
        let (file, _) = cache.new_file().unwrap();
        let etag = ETag(format!("\"{i:032x}\""));
        cache
            .index_version(&format!("vol/dir/file-{i}"), &file, &etag, &present)
            .unwrap();
    }
    let mut i = 0;
    c.bench_function("cache index: look up a cached object", |b| {
        b.iter(|| {
            i = (i + 389) % 1000;
            black_box(cache.lookup(&format!("vol/dir/file-{i}")).unwrap())
        })
    });
}

fn change_log(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(&dir.path().join("journal.db")).unwrap();
    let attrs = StoredAttrs {
        mode: 0o100644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        atime_ns: None,
        rdev: 0,
    };
    let mut n = 0u64;
    c.bench_function("change log: record a file's new contents", |b| {
        b.iter(|| {
            n += 1;
            let change = Change::PutFile {
                cache_file: format!("f{n}"),
                attrs,
            };
            let key = format!("vol/file-{}", n % 500);
            black_box(journal.record(&key, change, false, SystemTime::UNIX_EPOCH))
        })
    });
    c.bench_function("change log: take the next 8 runnable changes", |b| {
        b.iter(|| {
            let taken = journal.take_runnable(SystemTime::now(), 8);
            for entry in &taken {
                journal.retry_later(entry.seq, SystemTime::UNIX_EPOCH);
            }
            black_box(taken.len())
        })
    });

    // A big untar: thousands of closed files wait out the write-back delay while the uploader
    // looks for work after each request it finishes.
    let mut journal = Journal::open(&dir.path().join("waiting.db")).unwrap();
    let later = SystemTime::now() + std::time::Duration::from_secs(3600);
    for n in 0..10_000 {
        let change = Change::PutFile {
            cache_file: format!("w{n}"),
            attrs,
        };
        let key = format!("vol/tree/dir-{}/file-{n}", n % 100);
        journal.record(&key, change, false, later).unwrap();
    }
    c.bench_function("change log: take, 10,000 changes waiting", |b| {
        b.iter(|| black_box(journal.take_runnable(SystemTime::now(), 8).len()))
    });
    // ...and asks when the next is due, and whether a file it uploaded is still needed.
    c.bench_function("change log: next due, 10,000 changes waiting", |b| {
        b.iter(|| black_box(journal.next_due()))
    });
    c.bench_function("change log: is a cache file pending, 10,000 waiting", |b| {
        b.iter(|| black_box(journal.uploads_cache_file("w5000")))
    });
}

criterion_group!(hot_paths, ranges, index, change_log);
criterion_main!(hot_paths);
