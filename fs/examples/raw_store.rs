//! The store's own speed, for benches/peers.sh: writes MIB MiB to one object through cairn's
//! store client alone (the AWS SDK; multipart, 8 MiB parts, 8 in flight), then reads it back in
//! ranged GETs of 8 MiB, 8 in flight, twice: at once, and after this machine's page cache is
//! dropped (as the harness does before a mount's cold read, so a server on this machine reads
//! the object from its disk again). Prints `parts SECONDS` (until every part is in), `put
//! SECONDS` (until the upload is complete), `get SECONDS` and `get-cold SECONDS`. Run as root
//! (the page cache is dropped through /proc/sys/vm/drop_caches).
//!
//!     cargo run --release -p cairn-fs --example raw_store -- SPEC MIB

use std::time::Instant;

use bytes::Bytes;
use cairn_fs::store::{GetOptions, PutCondition, SharedStore, StoreSpec, open_store};
use futures::stream::{self, StreamExt, TryStreamExt};

const PART: u64 = 8 << 20;
const IN_FLIGHT: usize = 8;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: raw_store SPEC MIB";
    let spec: StoreSpec = args.next().ok_or(usage)?.parse()?;
    let mib: u64 = args.next().ok_or(usage)?.parse()?;
    let store = open_store(&spec).await?;
    let size = mib << 20;
    let part = Bytes::from(vec![0x5a; PART as usize]);
    let key = "raw-store-bench";

    let started = Instant::now();
    let upload = store.start_multipart(key, Default::default()).await?;
    let parts: Vec<_> = stream::iter((0..size.div_ceil(PART)).map(|n| {
        let len = PART.min(size - n * PART) as usize;
        let (store, upload, body) = (store.clone(), upload.clone(), part.slice(..len));
        async move { store.upload_part(key, &upload, n as u32 + 1, body).await }
    }))
    .buffered(IN_FLIGHT)
    .try_collect()
    .await?;
    println!("parts {:.3}", started.elapsed().as_secs_f64());
    store
        .complete_multipart(key, &upload, parts, PutCondition::Always)
        .await?;
    println!("put {:.3}", started.elapsed().as_secs_f64());

    println!("get {:.3}", read_back(&store, key, size).await?);
    // What the harness does before a cold read: the server's copy leaves the page cache too.
    tokio::task::spawn_blocking(|| {
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .map_err(|e| format!("dropping the page cache (run as root): {e}"))
    })
    .await??;
    println!("get-cold {:.3}", read_back(&store, key, size).await?);
    store.delete(key).await?;
    Ok(())
}

/// Reads `size` bytes of `key` in ranged GETs; returns the seconds it took.
async fn read_back(
    store: &SharedStore,
    key: &str,
    size: u64,
) -> Result<f64, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let got: u64 = stream::iter((0..size.div_ceil(PART)).map(|n| {
        let store = store.clone();
        let range = n * PART..((n + 1) * PART).min(size);
        async move {
            let options = GetOptions {
                range: Some(range),
                if_match: None,
            };
            store
                .get(key, options)
                .await
                .map(|got| got.body.len() as u64)
        }
    }))
    .buffer_unordered(IN_FLIGHT)
    .try_fold(0, |total, len| async move { Ok(total + len) })
    .await?;
    assert_eq!(got, size, "read back all the bytes");
    Ok(started.elapsed().as_secs_f64())
}
