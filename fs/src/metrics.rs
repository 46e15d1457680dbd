//! What a mount process counts for Prometheus: FUSE operations and their latency, store
//! requests with their bytes, errors and latency, and cache hits and misses of reads. The mount
//! keeps the counters; its control socket hands a [`MetricsSnapshot`] to the plugin daemon, which
//! serves them with the volume's name as a label (one scrape address for every mount).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the latency buckets; a last bucket takes everything slower.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// How long calls of one kind took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub sum_seconds: f64,
    /// Calls per bucket (not cumulative): one per [`LATENCY_BUCKETS`] entry, then the rest.
    pub buckets: Vec<u64>,
}

impl Latency {
    fn observe(&mut self, took: Duration) {
        if self.buckets.len() != LATENCY_BUCKETS.len() + 1 {
            self.buckets = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

/// Requests of one store operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreCalls {
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Every request, failed ones included (its count is the number of requests).
    pub latency: Latency,
}

/// Everything counted since the mount started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// By FUSE operation (`lookup`, `read`, `write`, ...).
    pub fuse: BTreeMap<String, Latency>,
    /// By store operation (`get`, `put`, `upload_part`, ...).
    pub store: BTreeMap<String, StoreCalls>,
    /// Reads answered from the cache alone.
    pub cache_hits: u64,
    /// Reads that had to fetch some of their bytes from the store.
    pub cache_misses: u64,
    /// Opens the kernel serves from the cache file itself, without this mount (passthrough).
    #[serde(default)]
    pub direct_opens: u64,
    /// fsyncs made durable by one record in the fsync log instead of a whole upload.
    #[serde(default)]
    pub fsyncs_logged: u64,
}

/// The live counters of one mount.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<MetricsSnapshot>,
}

impl Metrics {
    fn counts(&self) -> std::sync::MutexGuard<'_, MetricsSnapshot> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One FUSE operation, answered after `took`.
    pub fn fuse_operation(&self, op: &str, took: Duration) {
        let mut counts = self.counts();
        match counts.fuse.get_mut(op) {
            Some(latency) => latency.observe(took),
            None => {
                let mut latency = Latency::default();
                latency.observe(took);
                counts.fuse.insert(op.to_string(), latency);
            }
        }
    }

    /// One store request: what it sent and received, whether it failed, and how long it took.
    pub fn store_request(&self, op: &str, sent: u64, received: u64, failed: bool, took: Duration) {
        let mut counts = self.counts();
        let calls = counts.store.entry(op.to_string()).or_default();
        calls.bytes_sent += sent;
        calls.bytes_received += received;
        calls.errors += u64::from(failed);
        calls.latency.observe(took);
    }

    /// One open served by the kernel from the cache file itself.
    pub fn direct_open(&self) {
        self.counts().direct_opens += 1;
    }

    /// One fsync made durable by a record in the fsync log.
    pub fn fsync_logged(&self) {
        self.counts().fsyncs_logged += 1;
    }

    /// One read: from the cache alone (`true`) or partly from the store.
    pub fn cache_read(&self, hit: bool) {
        let mut counts = self.counts();
        if hit {
            counts.cache_hits += 1;
        } else {
            counts.cache_misses += 1;
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        self.counts().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_their_buckets() {
        let metrics = Metrics::default();
        metrics.fuse_operation("read", Duration::from_micros(50));
        metrics.fuse_operation("read", Duration::from_millis(3));
        metrics.fuse_operation("read", Duration::from_secs(60));
        let read = &metrics.snapshot().fuse["read"];
        assert_eq!(read.count, 3);
        assert_eq!(read.buckets[0], 1);
        assert_eq!(read.buckets[5], 1, "3 ms is in the 5 ms bucket");
        assert_eq!(
            read.buckets[LATENCY_BUCKETS.len()],
            1,
            "a minute is past the last bound"
        );
        assert!((read.sum_seconds - 60.00305).abs() < 1e-9);
    }

    #[test]
    fn store_requests_add_up() {
        let metrics = Metrics::default();
        metrics.store_request("put", 100, 0, false, Duration::from_millis(1));
        metrics.store_request("put", 50, 0, true, Duration::from_millis(1));
        metrics.cache_read(true);
        metrics.cache_read(false);
        metrics.cache_read(true);
        let snapshot = metrics.snapshot();
        let put = &snapshot.store["put"];
        assert_eq!((put.latency.count, put.errors, put.bytes_sent), (2, 1, 150));
        assert_eq!((snapshot.cache_hits, snapshot.cache_misses), (2, 1));
    }
}
