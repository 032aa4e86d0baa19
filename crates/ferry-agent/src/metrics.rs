//! Prometheus metrics, served as text on `metrics_listen` (`GET /metrics`).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Migrations that ended, by role and result.
    pub migrations: IntCounterVec,
    /// Migrations in progress on this host (source side).
    pub active: IntGauge,
    /// Raw guest-page bytes moved, by codec.
    pub page_bytes: IntCounterVec,
    /// Bytes written to the data plane, by codec.
    pub wire_bytes: IntCounterVec,
    /// Pages sent, by codec.
    pub pages: IntCounterVec,
    pub downtime: Histogram,
    pub duration: Histogram,
    pub rounds: Histogram,
    /// Dirty rate (pages/s) seen in the latest pre-copy round of any migration.
    pub dirty_rate: Gauge,
    /// Disk copies of incoming migrations that did not commit whose removal failed, as of
    /// the latest try (tried again every `left_behind_retry_s`; paths in the log).
    pub disk_copies_left_behind: IntGauge,
    /// Bytes taken by partial images that failed cold copies kept for a resume, as of the
    /// latest pass of their expiry (`partial_keep_s`).
    pub partial_images_kept_bytes: IntGauge,
    /// Partial images removed because no attempt resumed them within `partial_keep_s`.
    pub partial_images_expired: IntCounter,
    /// Whole images a cold copy that never finished had placed, removed because no VM
    /// used them within `partial_keep_s`.
    pub placed_images_expired: IntCounter,
    /// Passes of that expiry (it runs every quarter of `partial_keep_s`, at most hourly).
    pub expiry_passes: IntCounter,
    /// Copies fenced here: their guest ran here after a migration's commit while that
    /// migration's source took the VM back on its operator's verdict (the VM ran on two
    /// hosts until then). Each is paused and held (`ferryctl vm list` marks it) for the
    /// operator: alert on any increase.
    pub vms_fenced: IntCounter,
    /// The data plane of migrations this host sent: UDP datagrams out, packets QUIC
    /// declared lost, loss events the congestion controller let pass as random (no queue
    /// behind them), and window reductions it stopped at the path's measured BDP. A lossy
    /// link shows as random losses; a congested one as losses that are not.
    pub data_plane: DataPlaneCounters,
}

/// Counters of the source side's QUIC connections, added when each migration's data
/// plane closes ([`Metrics::data_plane`]).
pub struct DataPlaneCounters {
    pub datagrams: IntCounter,
    pub lost_packets: IntCounter,
    pub random_loss_events: IntCounter,
    pub floored_reductions: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Arc<Metrics>, prometheus::Error> {
        let registry = Registry::new_custom(Some("ferry".into()), None)?;
        let migrations = IntCounterVec::new(
            Opts::new(
                "migrations_total",
                "Migrations that ended, by role and result",
            ),
            &["role", "result"],
        )?;
        let active = IntGauge::new(
            "migrations_active",
            "Migrations in progress with this host as source",
        )?;
        let page_bytes = IntCounterVec::new(
            Opts::new("page_bytes_total", "Raw guest page bytes sent"),
            &["codec"],
        )?;
        let wire_bytes = IntCounterVec::new(
            Opts::new("wire_bytes_total", "Bytes written to the data plane"),
            &["codec"],
        )?;
        let pages = IntCounterVec::new(
            Opts::new("pages_sent_total", "Guest pages sent with data"),
            &["codec"],
        )?;
        let ms = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let downtime = ms(
            "downtime_seconds",
            "Guest pause of completed migrations (source STOP to target RESUME)",
            vec![0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
        )?;
        let duration = ms(
            "duration_seconds",
            "Total time of completed migrations",
            prometheus::exponential_buckets(0.25, 2.0, 12)?,
        )?;
        let rounds = ms(
            "rounds",
            "Rounds of completed migrations",
            vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0],
        )?;
        let dirty_rate = Gauge::new(
            "dirty_rate_pages_per_second",
            "Pages written per second during the latest pre-copy round",
        )?;
        for c in [&migrations, &page_bytes, &wire_bytes, &pages] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(active.clone()))?;
        for h in [&downtime, &duration, &rounds] {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(dirty_rate.clone()))?;
        let disk_copies_left_behind = IntGauge::new(
            "disk_copies_left_behind",
            "Disk copies of incoming migrations that did not commit that could not be removed yet",
        )?;
        registry.register(Box::new(disk_copies_left_behind.clone()))?;
        let partial_images_kept_bytes = IntGauge::new(
            "partial_images_kept_bytes",
            "Bytes taken by partial images that failed cold copies kept for a resume",
        )?;
        registry.register(Box::new(partial_images_kept_bytes.clone()))?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let partial_images_expired = counter(
            "partial_images_expired_total",
            "Partial images removed because no attempt resumed them within partial_keep_s",
        )?;
        let placed_images_expired = counter(
            "placed_images_expired_total",
            "Whole images a cold copy that never finished had placed, removed unused after partial_keep_s",
        )?;
        let expiry_passes = counter(
            "kept_images_expiry_passes_total",
            "Passes of the expiry of what failed cold copies left (partial and placed images)",
        )?;
        let vms_fenced = counter(
            "vms_fenced_total",
            "Copies fenced here (paused, held): their guest ran here while a verdict took the VM back to its source",
        )?;
        let data_plane = DataPlaneCounters {
            datagrams: counter(
                "data_plane_datagrams_total",
                "UDP datagrams sent by the data plane of migrations from this host",
            )?,
            lost_packets: counter(
                "data_plane_lost_packets_total",
                "Packets the data plane's QUIC declared lost (migrations from this host)",
            )?,
            random_loss_events: counter(
                "data_plane_random_loss_events_total",
                "Loss events the congestion controller let pass as random (no queue behind them)",
            )?,
            floored_reductions: counter(
                "data_plane_floored_reductions_total",
                "Congestion window reductions stopped at the path's measured bandwidth-delay product",
            )?,
        };
        Ok(Arc::new(Metrics {
            registry,
            migrations,
            active,
            page_bytes,
            wire_bytes,
            pages,
            downtime,
            duration,
            rounds,
            dirty_rate,
            disk_copies_left_behind,
            partial_images_kept_bytes,
            partial_images_expired,
            placed_images_expired,
            expiry_passes,
            vms_fenced,
            data_plane,
        }))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Serves `GET /metrics` until the process ends.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<()> {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let me = me.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        me.render(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await
    }
}
