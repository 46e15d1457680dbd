//! The store conformance suite: what every [`Store`] backend must do, written once.
//!
//! Each case takes an empty store (a fresh prefix or directory) and panics with a message on the
//! first broken promise. [`store_conformance_tests!`](crate::store_conformance_tests) turns the
//! cases into one `#[tokio::test]` each for a backend's test file.

use std::any::Any;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use md5::{Digest, Md5};

use super::{
    ETag, ErrorKind, GetOptions, ListOptions, MIN_PART_SIZE, Metadata, PartSource, PutCondition,
    PutOptions, SharedStore, Store, StoreExt,
};

/// An empty store for one case, and whatever must live as long as it (a temporary directory).
pub struct Fixture {
    pub store: SharedStore,
    _keep: Box<dyn Any + Send>,
}

impl Fixture {
    pub fn new(store: SharedStore) -> Self {
        Self::keeping(store, ())
    }

    pub fn keeping(store: SharedStore, keep: impl Any + Send) -> Self {
        Self {
            store,
            _keep: Box::new(keep),
        }
    }
}

/// One `#[tokio::test]` per conformance case; `$make` is an async fn returning a [`Fixture`].
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:path) => {
        $crate::store_conformance_tests!(@cases $make;
            round_trip_with_metadata,
            overwrite_replaces_the_object,
            ranged_reads_at_the_edges,
            missing_objects,
            odd_keys_round_trip_and_list,
            listing_paginates_past_a_thousand_keys,
            concurrent_create_if_absent_has_one_winner,
            replace_if_match_loses_a_race,
            read_if_match,
            streamed_reads_bring_what_reads_do,
            multipart_with_a_copied_part,
            copy_keeps_or_replaces_metadata,
            delete_one_and_many,
            large_object_round_trip,
            invalid_requests_are_refused
        );
    };
    (@cases $make:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $make().await;
                $crate::store::conformance::$case(&*fixture.store).await;
            }
        )*
    };
}

/// Deterministic bytes that differ with `seed` (no two 8-byte words of one buffer repeat soon).
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

fn posix_metadata() -> Metadata {
    [
        ("mode", "33184"),
        ("uid", "1000"),
        ("gid", "1000"),
        ("mtime", "1700000000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn put(store: &dyn Store, key: &str, body: impl Into<Bytes>) -> super::ETag {
    store
        .put(key, body.into(), PutOptions::default())
        .await
        .unwrap_or_else(|e| panic!("put {key:?}: {e}"))
        .etag
}

async fn read(store: &dyn Store, key: &str) -> Bytes {
    store
        .get_all(key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
        .1
}

/// Puts `keys` (body = key) with a few requests in flight.
async fn put_many(store: &dyn Store, keys: &[String]) {
    for chunk in keys.chunks(16) {
        let puts = chunk.iter().map(|key| put(store, key, key.clone()));
        futures::future::join_all(puts).await;
    }
}

pub async fn round_trip_with_metadata(store: &dyn Store) {
    let before = SystemTime::now() - Duration::from_secs(120);
    let options = PutOptions::with_metadata(posix_metadata());
    let etag = store
        .put(
            "docs/readme.txt",
            Bytes::from_static(b"hello, store"),
            options,
        )
        .await
        .expect("put with metadata")
        .etag;
    let info = store.head("docs/readme.txt").await.expect("head");
    assert_eq!(info.key, "docs/readme.txt");
    assert_eq!(info.size, 12);
    assert_eq!(info.etag, etag, "head reports the ETag the put returned");
    assert_eq!(info.metadata, posix_metadata(), "metadata round trips");
    assert!(info.last_modified > before, "last-modified is recent");
    let (got_info, body) = store.get_all("docs/readme.txt").await.expect("get");
    assert_eq!(&body[..], b"hello, store");
    assert_eq!(
        got_info.metadata,
        posix_metadata(),
        "get carries metadata too"
    );
    assert_eq!(got_info.etag, etag);
}

pub async fn overwrite_replaces_the_object(store: &dyn Store) {
    let first = put(store, "f", "version one").await;
    let second = put(store, "f", "two").await;
    assert_ne!(first, second, "a new version gets a new ETag");
    assert_eq!(&read(store, "f").await[..], b"two");
    assert_eq!(store.head("f").await.unwrap().size, 3);
}

pub async fn ranged_reads_at_the_edges(store: &dyn Store) {
    put(store, "empty", Bytes::new()).await;
    assert!(read(store, "empty").await.is_empty());
    let got = store
        .get(
            "empty",
            GetOptions {
                range: Some(0..10),
                if_match: None,
            },
        )
        .await
        .expect("a range of an empty object reads zero bytes");
    assert!(got.body.is_empty());
    assert_eq!(got.info.size, 0);

    put(store, "digits", "0123456789").await;
    let cases: [(std::ops::Range<u64>, &[u8]); 6] = [
        (0..1, b"0"),
        (9..10, b"9"),
        (3..7, b"3456"),
        (5..100, b"56789"),
        (10..20, b""),
        (20..30, b""),
    ];
    for (range, want) in cases {
        let got = store
            .get(
                "digits",
                GetOptions {
                    range: Some(range.clone()),
                    if_match: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("range {range:?}: {e}"));
        assert_eq!(&got.body[..], want, "range {range:?}");
        assert_eq!(got.info.size, 10, "range {range:?} reports the whole size");
        assert_eq!(
            got.range.start,
            range.start.min(10),
            "range {range:?} start"
        );
        assert_eq!(got.range.end - got.range.start, want.len() as u64);
    }
}

pub async fn missing_objects(store: &dyn Store) {
    let head = store.head("nothing/here").await.unwrap_err();
    assert_eq!(head.kind(), ErrorKind::NotFound, "head: {head}");
    let get = store.get_all("nothing/here").await.unwrap_err();
    assert_eq!(get.kind(), ErrorKind::NotFound, "get: {get}");
    assert!(store.head_opt("nothing/here").await.unwrap().is_none());
    store
        .delete("nothing/here")
        .await
        .expect("deleting a missing key succeeds");
    store
        .delete_many(&["nothing/a".to_string(), "nothing/b".to_string()])
        .await
        .expect("deleting missing keys succeeds");
    let listed = store.list_all("nothing/", false).await.unwrap();
    assert!(listed.objects.is_empty() && listed.prefixes.is_empty());
}

/// Keys a volume may hold that a careless backend mangles.
pub const ODD_KEYS: &[&str] = &[
    "with space.txt",
    "ünïcødé/日本語.txt",
    "plus+sign",
    "percent%20literal",
    "percent%",
    "a/../b",
    "b",
    "./dot",
    "dir/./x",
    ".hidden",
    "dir/",
    "dir/..",
    "tilde~#hash?query&amp=1",
    "quote'\"",
    "trailing space ",
    "emoji-🪨",
];

pub async fn odd_keys_round_trip_and_list(store: &dyn Store) {
    let mut keys: Vec<String> = ODD_KEYS.iter().map(|k| k.to_string()).collect();
    keys.push(format!("long/{}", "n".repeat(255)));
    put_many(store, &keys).await;
    for key in &keys {
        assert_eq!(
            &read(store, key).await[..],
            key.as_bytes(),
            "body of {key:?}"
        );
        assert_eq!(store.head(key).await.unwrap().key, *key);
    }
    let mut want = keys.clone();
    want.sort();
    let listed: Vec<String> = store
        .list_all("", false)
        .await
        .unwrap()
        .objects
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        listed, want,
        "a full listing returns every key once, in order"
    );
    let under_dir = store.list_all("dir/", true).await.unwrap();
    let names: Vec<&str> = under_dir.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(names, ["dir/", "dir/.."], "a marker key lists as an object");
    assert_eq!(under_dir.prefixes, ["dir/./"]);
}

pub async fn listing_paginates_past_a_thousand_keys(store: &dyn Store) {
    let flat: Vec<String> = (0..1030).map(|i| format!("flat/{i:05}")).collect();
    let tree: Vec<String> = (0..1005).map(|i| format!("tree/d{i:05}/f")).collect();
    put_many(store, &flat).await;
    put_many(store, &tree).await;
    put_many(
        store,
        &["tree/d00000/g".to_string(), "tree/top".to_string()],
    )
    .await;

    let first = store.list("flat/", ListOptions::default()).await.unwrap();
    assert_eq!(first.objects.len(), 1000, "a page holds at most 1000 keys");
    assert!(first.next.is_some(), "a full page says there is more");
    let all = store.list_all("flat/", false).await.unwrap();
    let keys: Vec<String> = all.objects.into_iter().map(|o| o.key).collect();
    assert_eq!(keys, flat, "every key once, in order, across pages");

    let delimited = store.list_all("tree/", true).await.unwrap();
    let want_prefixes: Vec<String> = (0..1005).map(|i| format!("tree/d{i:05}/")).collect();
    assert_eq!(
        delimited.prefixes, want_prefixes,
        "one common prefix per directory"
    );
    let objects: Vec<&str> = delimited.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objects, ["tree/top"]);

    // Small pages: tokens land on prefixes and on keys alike.
    let mut small = Vec::new();
    let mut continuation = None;
    loop {
        let options = ListOptions {
            delimited: true,
            continuation,
            max_keys: Some(7),
        };
        let page = store.list("tree/d0000", options).await.unwrap();
        assert!(page.objects.len() + page.prefixes.len() <= 7);
        small.extend(page.prefixes);
        match page.next {
            Some(next) => continuation = Some(next),
            None => break,
        }
    }
    let want_small: Vec<String> = (0..10).map(|i| format!("tree/d{i:05}/")).collect();
    assert_eq!(small, want_small);

    let inside = store.list_all("tree/d00000/", true).await.unwrap();
    let inside: Vec<&str> = inside.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(inside, ["tree/d00000/f", "tree/d00000/g"]);
}

pub async fn concurrent_create_if_absent_has_one_winner(store: &dyn Store) {
    for round in 0..5 {
        let key = format!("lease/{round}");
        let attempt = |who: &'static str| {
            let options = PutOptions {
                metadata: Metadata::new(),
                condition: PutCondition::IfAbsent,
            };
            store.put(&key, Bytes::from_static(who.as_bytes()), options)
        };
        let (a, b) = tokio::join!(attempt("host-a"), attempt("host-b"));
        let winner = match (&a, &b) {
            (Ok(_), Err(e)) if e.kind() == ErrorKind::PreconditionFailed => "host-a",
            (Err(e), Ok(_)) if e.kind() == ErrorKind::PreconditionFailed => "host-b",
            _ => panic!("round {round}: exactly one create must win: {a:?} / {b:?}"),
        };
        assert_eq!(&read(store, &key).await[..], winner.as_bytes());
    }
}

pub async fn replace_if_match_loses_a_race(store: &dyn Store) {
    let first = put(store, "record", "v1").await;
    let if_match = |body: &'static str| {
        let options = PutOptions {
            metadata: Metadata::new(),
            condition: PutCondition::IfMatch(first.clone()),
        };
        store.put("record", Bytes::from_static(body.as_bytes()), options)
    };
    if_match("v2")
        .await
        .expect("the first replace with the current ETag wins");
    let lost = if_match("v3")
        .await
        .expect_err("a replace with a stale ETag loses");
    assert_eq!(lost.kind(), ErrorKind::PreconditionFailed, "{lost}");
    assert_eq!(
        &read(store, "record").await[..],
        b"v2",
        "the loser changed nothing"
    );

    let exists = store
        .put(
            "record",
            Bytes::from_static(b"x"),
            PutOptions {
                metadata: Metadata::new(),
                condition: PutCondition::IfAbsent,
            },
        )
        .await
        .expect_err("create-if-absent of an existing key fails");
    assert_eq!(exists.kind(), ErrorKind::PreconditionFailed, "{exists}");
    let missing = store
        .put(
            "no-record",
            Bytes::from_static(b"x"),
            PutOptions {
                metadata: Metadata::new(),
                condition: PutCondition::IfMatch(first),
            },
        )
        .await
        .expect_err("replace-if-match of a missing key fails");
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
}

pub async fn read_if_match(store: &dyn Store) {
    let old = put(store, "r", "one").await;
    let new = put(store, "r", "two").await;
    let current = store
        .get(
            "r",
            GetOptions {
                range: Some(0..2),
                if_match: Some(new),
            },
        )
        .await
        .expect("a read with the current ETag succeeds");
    assert_eq!(&current.body[..], b"tw");
    let stale = store
        .get(
            "r",
            GetOptions {
                range: Some(0..2),
                if_match: Some(old),
            },
        )
        .await
        .expect_err("a read with a stale ETag fails");
    assert_eq!(stale.kind(), ErrorKind::PreconditionFailed, "{stale}");
}

/// `get_stream` brings, piece by piece, the same bytes and range as `get`, at the edges too,
/// and refuses a stale ETag before any byte.
pub async fn streamed_reads_bring_what_reads_do(store: &dyn Store) {
    use futures::TryStreamExt;
    let body = pattern(3 * 1024 * 1024 + 7, 11);
    let etag = put(store, "s", body.clone()).await;
    let len = body.len() as u64;
    for range in [
        None,
        Some(0..1),
        Some(1000..len - 5),
        Some(len - 3..len + 10),
        Some(len..len + 1),
    ] {
        let options = GetOptions {
            range: range.clone(),
            if_match: Some(etag.clone()),
        };
        let whole = store.get("s", options.clone()).await.unwrap();
        let streamed = store
            .get_stream("s", options)
            .await
            .unwrap_or_else(|e| panic!("stream {range:?}: {e}"));
        assert_eq!(streamed.range, whole.range, "range {range:?}");
        assert_eq!(
            streamed.info.size, len,
            "range {range:?} reports the whole size"
        );
        let pieces: Vec<Bytes> = streamed.body.try_collect().await.unwrap();
        assert!(
            pieces.concat() == whole.body[..],
            "range {range:?}: other bytes"
        );
    }
    let stale = put(store, "s", "replaced").await;
    assert_ne!(stale, etag);
    let refused = store
        .get_stream(
            "s",
            GetOptions {
                range: None,
                if_match: Some(etag),
            },
        )
        .await
        .err()
        .expect("a streamed read with a stale ETag fails");
    assert_eq!(refused.kind(), ErrorKind::PreconditionFailed, "{refused}");
}

pub async fn multipart_with_a_copied_part(store: &dyn Store) {
    let part = MIN_PART_SIZE as usize;
    let source = pattern(part + 1024 * 1024, 1);
    let source_etag = put(store, "mp/source", source.clone()).await;
    let fresh = pattern(part, 2);
    let from_source = |range: std::ops::Range<u64>, if_match: Option<ETag>| PartSource {
        key: "mp/source".into(),
        range,
        if_match,
    };

    let upload = store
        .start_multipart("mp/joined", posix_metadata())
        .await
        .expect("start");
    let stale = store
        .upload_part_copy(
            "mp/joined",
            &upload,
            1,
            &from_source(0..1024, Some(ETag("\"0000\"".into()))),
        )
        .await
        .expect_err("a copy from a version the source no longer has");
    assert_eq!(stale.kind(), ErrorKind::PreconditionFailed, "{stale}");
    let p1 = store
        .upload_part_copy("mp/joined", &upload, 1, &from_source(0..part as u64, None))
        .await
        .expect("part 1 copied from a range of another object");
    let p2 = store
        .upload_part("mp/joined", &upload, 2, fresh.clone())
        .await
        .expect("part 2");
    let tail = part as u64..source.len() as u64;
    let p3 = store
        .upload_part_copy(
            "mp/joined",
            &upload,
            3,
            &from_source(tail.clone(), Some(source_etag.clone())),
        )
        .await
        .expect("part 3 copied");
    store
        .complete_multipart(
            "mp/joined",
            &upload,
            vec![p1, p2, p3],
            PutCondition::IfAbsent,
        )
        .await
        .expect("complete");

    let mut want = Vec::with_capacity(source.len() + fresh.len());
    want.extend_from_slice(&source[..part]);
    want.extend_from_slice(&fresh);
    want.extend_from_slice(&source[tail.start as usize..]);
    let (info, body) = store
        .get_all("mp/joined")
        .await
        .expect("read the joined object");
    assert_eq!(body.len(), want.len());
    assert_eq!(
        digest(&body),
        digest(&want),
        "joined bytes are the parts in order"
    );
    assert_eq!(
        info.metadata,
        posix_metadata(),
        "metadata given at start is the object's"
    );

    // A completion whose condition fails leaves the object alone.
    let again = store
        .start_multipart("mp/joined", Metadata::new())
        .await
        .unwrap();
    let p = store
        .upload_part("mp/joined", &again, 1, Bytes::from_static(b"tiny"))
        .await
        .unwrap();
    let refused = store
        .complete_multipart("mp/joined", &again, vec![p], PutCondition::IfAbsent)
        .await
        .expect_err("create-if-absent completion over an existing object fails");
    assert_eq!(refused.kind(), ErrorKind::PreconditionFailed, "{refused}");
    assert_eq!(
        store.head("mp/joined").await.unwrap().size,
        want.len() as u64
    );
    let _ = store.abort_multipart("mp/joined", &again).await;

    // An aborted upload cannot be completed.
    let aborted = store
        .start_multipart("mp/aborted", Metadata::new())
        .await
        .unwrap();
    let p = store
        .upload_part("mp/aborted", &aborted, 1, Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .abort_multipart("mp/aborted", &aborted)
        .await
        .expect("abort");
    let gone = store
        .complete_multipart("mp/aborted", &aborted, vec![p], PutCondition::Always)
        .await
        .expect_err("completing an aborted upload fails");
    // S3 says NoSuchUpload (not found); moto 5.2 fails with a 500 instead, so only the
    // failure itself and its effect (no object) are part of the contract.
    assert!(!gone.message().is_empty());
    assert!(store.head_opt("mp/aborted").await.unwrap().is_none());
}

pub async fn copy_keeps_or_replaces_metadata(store: &dyn Store) {
    let options = PutOptions::with_metadata(posix_metadata());
    store
        .put("c/src", Bytes::from_static(b"payload"), options)
        .await
        .unwrap();
    store
        .copy("c/src", "c/kept", None)
        .await
        .expect("copy keeping metadata");
    let mut replaced = Metadata::new();
    replaced.insert("mode".into(), "33261".into());
    store
        .copy("c/src", "c/replaced", Some(replaced.clone()))
        .await
        .expect("copy replacing metadata");
    let kept = store.head("c/kept").await.unwrap();
    assert_eq!(kept.metadata, posix_metadata());
    let new = store.head("c/replaced").await.unwrap();
    assert_eq!(new.metadata, replaced);
    assert_eq!(&read(store, "c/replaced").await[..], b"payload");
    assert_eq!(
        &read(store, "c/src").await[..],
        b"payload",
        "the source stays"
    );
    let missing = store.copy("c/none", "c/x", None).await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
}

pub async fn delete_one_and_many(store: &dyn Store) {
    let keys: Vec<String> = (0..5).map(|i| format!("del/{i}")).collect();
    put_many(store, &keys).await;
    store.delete("del/0").await.unwrap();
    let batch = vec![
        keys[1].clone(),
        keys[2].clone(),
        keys[3].clone(),
        "del/missing".into(),
    ];
    store.delete_many(&batch).await.unwrap();
    let left: Vec<String> = store
        .list_all("del/", false)
        .await
        .unwrap()
        .objects
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, ["del/4"]);
    assert_eq!(
        store.head("del/0").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

pub async fn large_object_round_trip(store: &dyn Store) {
    let body = pattern(64 * 1024 * 1024 + 1, 3);
    let want = digest(&body);
    put(store, "big/blob", body.clone()).await;
    assert_eq!(
        store.head("big/blob").await.unwrap().size,
        body.len() as u64
    );
    assert_eq!(
        digest(&read(store, "big/blob").await),
        want,
        "64 MiB + 1 round trip"
    );
    let end = body.len() as u64;
    let tail = store
        .get_range("big/blob", end - 100..end + 100)
        .await
        .unwrap();
    assert_eq!(&tail[..], &body[body.len() - 100..]);
}

pub async fn invalid_requests_are_refused(store: &dyn Store) {
    let long = "k".repeat(super::MAX_KEY_LEN + 1);
    let err = store
        .put(&long, Bytes::new(), PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    let mut bad = Metadata::new();
    bad.insert("Bad Name".into(), "x".into());
    let err = store
        .put("k", Bytes::new(), PutOptions::with_metadata(bad))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(
        store.head_opt("k").await.unwrap().is_none(),
        "nothing was written"
    );
}
