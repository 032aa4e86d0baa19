//! QMP events and helpers to wait for them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::QmpError;

/// An asynchronous QMP event, e.g. `STOP`, `RESUME`, `MIGRATION`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name as QEMU sends it (`"MIGRATION"`).
    pub name: String,
    /// The event's `data` member; an empty object when QEMU sent none.
    pub data: Value,
    /// When QEMU emitted the event (QMP's `timestamp.seconds/microseconds`,
    /// host wall clock). Comparing STOP on the source with RESUME on the
    /// target gives the downtime across hosts.
    pub timestamp: SystemTime,
}

impl QmpEvent {
    /// Decodes one event line (`{"event":..,"data":..,"timestamp":..}`).
    pub(crate) fn from_json(v: &Value) -> Option<QmpEvent> {
        let name = v.get("event")?.as_str()?.to_owned();
        let data = v
            .get("data")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let ts = v.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_i64);
        let micros = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_i64);
        // QEMU sends -1/-1 when it could not read the clock; fall back to now.
        let timestamp = match (secs, micros) {
            (Some(s), Some(us)) if s >= 0 && us >= 0 => {
                UNIX_EPOCH + Duration::from_secs(s as u64) + Duration::from_micros(us as u64)
            }
            _ => SystemTime::now(),
        };
        Some(QmpEvent {
            name,
            data,
            timestamp,
        })
    }

    /// For a `MIGRATION` event, its `data.status` (`"active"`, `"completed"`, ...).
    pub fn migration_status(&self) -> Option<&str> {
        if self.name != "MIGRATION" {
            return None;
        }
        self.data.get("status").and_then(Value::as_str)
    }
}

/// Waits until an event satisfying `pred` arrives on `rx`.
///
/// Events not matching are skipped. Fails with [`QmpError::Timeout`] after
/// `timeout` and with [`QmpError::Disconnected`] when the connection closed.
/// If the receiver lagged (more than the channel's capacity of unread
/// events), the lost events are logged and skipped: subscribe close to the
/// wait and keep receivers drained.
pub async fn wait_for_event<F>(
    rx: &mut broadcast::Receiver<QmpEvent>,
    timeout: Duration,
    mut pred: F,
) -> Result<QmpEvent, QmpError>
where
    F: FnMut(&QmpEvent) -> bool + Send,
{
    wait_inner(rx, timeout, &mut pred, || "a matching QMP event".to_owned()).await
}

/// Waits for a `MIGRATION` event whose `data.status` is one of `statuses`.
///
/// Typical sets: `&["pre-switchover", "completed", "failed", "cancelled"]` on
/// the source, `&["completed", "failed"]` on the target. The whole event is
/// returned so the caller also gets its timestamp; use
/// [`QmpEvent::migration_status`] to read the status. Requires the `events`
/// migration capability.
pub async fn wait_migration_status(
    rx: &mut broadcast::Receiver<QmpEvent>,
    timeout: Duration,
    statuses: &[&str],
) -> Result<QmpEvent, QmpError> {
    let mut pred = |ev: &QmpEvent| ev.migration_status().is_some_and(|s| statuses.contains(&s));
    wait_inner(rx, timeout, &mut pred, || {
        format!("MIGRATION event with status in {statuses:?}")
    })
    .await
}

async fn wait_inner(
    rx: &mut broadcast::Receiver<QmpEvent>,
    timeout: Duration,
    pred: &mut (dyn FnMut(&QmpEvent) -> bool + Send),
    what: impl FnOnce() -> String,
) -> Result<QmpEvent, QmpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(QmpError::Timeout(what())),
            Ok(Ok(ev)) => {
                if pred(&ev) {
                    return Ok(ev);
                }
            }
            Ok(Err(RecvError::Lagged(n))) => {
                tracing::warn!(missed = n, "QMP event receiver lagged; events were lost");
            }
            Ok(Err(RecvError::Closed)) => return Err(QmpError::Disconnected),
        }
    }
}
