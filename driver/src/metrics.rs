//! The Prometheus endpoint of `cairn serve` (off unless the config names `metrics_address`):
//! `GET /metrics` asks every mount process on this host for its counters and answers them in the
//! OpenMetrics text format, labelled with the volume's name. Scraping asks the mount processes and
//! the local disk only, never the store.

use std::sync::Arc;

use bytes::Bytes;
use cairn_fs::metrics::{LATENCY_BUCKETS, Latency};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::volumes::{Driver, MountFigures};

/// What Prometheus is told the answer is.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers `GET /metrics` on `listener` (until the task is aborted).
pub async fn serve(driver: Arc<Driver>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("accepting a metrics connection: {err}");
                continue;
            }
        };
        let driver = Arc::clone(&driver);
        let service = service_fn(move |request| answer(Arc::clone(&driver), request));
        tokio::spawn(async move {
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                tracing::debug!("metrics connection: {err}");
            }
        });
    }
}

async fn answer(
    driver: Arc<Driver>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Ok(Response::builder()
            .status(status)
            .header(CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response"))
    };
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        let why = "cairn serves metrics at GET /metrics\n".to_string();
        return reply(StatusCode::NOT_FOUND, "text/plain", why);
    }
    match driver.mounted_figures().await {
        Ok(figures) => reply(StatusCode::OK, OPENMETRICS, render(figures)),
        Err(err) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{err}\n"),
        ),
    }
}

/// The figures of the mounted volumes in the OpenMetrics text format.
pub fn render(figures: Vec<MountFigures>) -> String {
    let mut registry = Registry::with_prefix("cairn");
    registry.register_collector(Box::new(Mounts(figures)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String does not fail");
    text
}

#[derive(Debug)]
struct Mounts(Vec<MountFigures>);

/// One metric family: its name, help and type, and a value per label set.
struct Family<'a, T> {
    name: &'a str,
    help: &'a str,
    kind: MetricType,
    samples: Vec<(Vec<(&'a str, &'a str)>, T)>,
}

/// A value of a family: how it writes itself once its labels are written.
trait Sample {
    fn write(&self, encoder: MetricEncoder) -> std::fmt::Result;
}

impl Sample for u64 {
    fn write(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_gauge(&(*self as i64))
    }
}

/// A counter's value (a `u64` writes itself as a gauge).
struct Total(u64);

impl Sample for Total {
    fn write(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&self.0, None)
    }
}

impl Sample for &Latency {
    fn write(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum_seconds,
            self.count,
            &buckets,
            None,
        )
    }
}

impl<T: Sample> Family<'_, T> {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        if self.samples.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in &self.samples {
            value.write(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

fn gauge<'a>(
    name: &'a str,
    help: &'a str,
    figures: &'a [MountFigures],
    value: impl Fn(&MountFigures) -> u64,
) -> Family<'a, u64> {
    Family {
        name,
        help,
        kind: MetricType::Gauge,
        samples: figures
            .iter()
            .map(|f| (vec![("volume", f.volume.as_str())], value(f)))
            .collect(),
    }
}

fn status_figure(figures: &MountFigures, key: &str) -> u64 {
    match &figures.status[key] {
        Value::Bool(flag) => u64::from(*flag),
        other => other.as_u64().unwrap_or(0),
    }
}

impl Collector for Mounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let figures = &self.0;
        gauge("mounted", "Volumes mounted by this host", figures, |_| 1).encode(&mut encoder)?;
        gauge(
            "cache_bytes",
            "Disk the volume's cache takes",
            figures,
            |f| f.cache_bytes,
        )
        .encode(&mut encoder)?;
        gauge(
            "dirty_bytes",
            "Changed bytes not yet in the store",
            figures,
            |f| status_figure(f, "pending_bytes"),
        )
        .encode(&mut encoder)?;
        gauge(
            "upload_queue_changes",
            "Changes waiting to be applied to the store",
            figures,
            |f| status_figure(f, "pending_changes"),
        )
        .encode(&mut encoder)?;
        gauge(
            "oldest_dirty_seconds",
            "How long the oldest waiting change has been due",
            figures,
            |f| status_figure(f, "oldest_pending_seconds"),
        )
        .encode(&mut encoder)?;
        gauge(
            "upload_failing",
            "1 while applying changes to the store fails",
            figures,
            |f| status_figure(f, "failing"),
        )
        .encode(&mut encoder)?;
        let totals = |name, help, value: fn(&MountFigures) -> u64| Family {
            name,
            help,
            kind: MetricType::Counter,
            samples: figures
                .iter()
                .map(|f| (vec![("volume", f.volume.as_str())], Total(value(f))))
                .collect(),
        };
        totals(
            "uploaded_bytes",
            "Bytes written to the store since the mount started",
            |f| status_figure(f, "uploaded_bytes"),
        )
        .encode(&mut encoder)?;
        totals("cache_hits", "Reads answered from the cache alone", |f| {
            f.counters.cache_hits
        })
        .encode(&mut encoder)?;
        totals(
            "cache_misses",
            "Reads that fetched bytes from the store",
            |f| f.counters.cache_misses,
        )
        .encode(&mut encoder)?;
        totals(
            "direct_opens",
            "Opens the kernel serves from the cache file itself (passthrough)",
            |f| f.counters.direct_opens,
        )
        .encode(&mut encoder)?;
        totals(
            "fsyncs_logged",
            "fsyncs made durable by one small record in the fsync log, not a whole upload",
            |f| f.counters.fsyncs_logged,
        )
        .encode(&mut encoder)?;

        Family {
            name: "fuse_operation_seconds",
            help: "FUSE operations and how long they took to answer",
            kind: MetricType::Histogram,
            samples: figures
                .iter()
                .flat_map(|f| {
                    f.counters.fuse.iter().map(|(op, latency)| {
                        (
                            vec![("volume", f.volume.as_str()), ("op", op.as_str())],
                            latency,
                        )
                    })
                })
                .collect(),
        }
        .encode(&mut encoder)?;
        let store_calls = || {
            figures.iter().flat_map(|f| {
                f.counters.store.iter().map(move |(op, calls)| {
                    (
                        vec![("volume", f.volume.as_str()), ("op", op.as_str())],
                        calls,
                    )
                })
            })
        };
        Family {
            name: "store_request_seconds",
            help: "Store requests (failed ones too) and how long they took",
            kind: MetricType::Histogram,
            samples: store_calls()
                .map(|(labels, calls)| (labels, &calls.latency))
                .collect(),
        }
        .encode(&mut encoder)?;
        let store_totals = |name, help, value: fn(&cairn_fs::metrics::StoreCalls) -> u64| Family {
            name,
            help,
            kind: MetricType::Counter,
            samples: store_calls()
                .map(|(labels, calls)| (labels, Total(value(calls))))
                .collect(),
        };
        store_totals(
            "store_errors",
            "Store requests that failed (a missing object is an answer, not an error)",
            |calls| calls.errors,
        )
        .encode(&mut encoder)?;
        store_totals("store_sent_bytes", "Bytes sent to the store", |calls| {
            calls.bytes_sent
        })
        .encode(&mut encoder)?;
        store_totals(
            "store_received_bytes",
            "Bytes received from the store",
            |calls| calls.bytes_received,
        )
        .encode(&mut encoder)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_fs::metrics::Metrics;
    use std::time::Duration;

    #[test]
    fn figures_become_openmetrics_text() {
        let metrics = Metrics::default();
        metrics.fuse_operation("write", Duration::from_millis(2));
        metrics.store_request("put", 4096, 0, false, Duration::from_millis(30));
        metrics.cache_read(true);
        let text = render(vec![MountFigures {
            volume: "db".into(),
            status: serde_json::json!({"pending_bytes": 7, "pending_changes": 2, "failing": true}),
            counters: metrics.snapshot(),
            cache_bytes: 8192,
        }]);
        for line in [
            "cairn_mounted{volume=\"db\"} 1",
            "cairn_dirty_bytes{volume=\"db\"} 7",
            "cairn_upload_queue_changes{volume=\"db\"} 2",
            "cairn_upload_failing{volume=\"db\"} 1",
            "cairn_cache_bytes{volume=\"db\"} 8192",
            "cairn_cache_hits_total{volume=\"db\"} 1",
            "cairn_fuse_operation_seconds_count{volume=\"db\",op=\"write\"} 1",
            "cairn_fuse_operation_seconds_bucket{le=\"0.0025\",volume=\"db\",op=\"write\"} 1",
            "cairn_store_request_seconds_count{volume=\"db\",op=\"put\"} 1",
            "cairn_store_sent_bytes_total{volume=\"db\",op=\"put\"} 4096",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
