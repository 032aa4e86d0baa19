//! The data plane's own thread: every QUIC endpoint and connection of the process, and
//! the tasks that read and write page streams, run on one single-threaded tokio runtime.
//!
//! On the multi-threaded runtime each batch of datagrams went through two or three
//! threads: the worker parked in `epoll` woke for the socket, ran the endpoint driver,
//! which woke the connection's driver, which woke the stream's reader, each wake another
//! worker's futex. A far migration's target spent 1.14 CPU-s of 4.5 on those switches
//! (benches/RESULTS.md, fifteenth session). Here one thread takes the datagrams, runs
//! quinn and hands the stream's bytes to its reader without a switch. What costs CPU per
//! byte (compressing, decompressing, writing guest RAM) still runs on the runtime's
//! blocking pool, so the thread only runs protocol work; quinn drives each connection
//! from one task anyway, so one migration loses little parallelism to it (its endpoint
//! driver and connection driver no longer overlap). Several migrations at once, in or out,
//! share the thread: their packet work is done one after another (two at once on the
//! 2-core benchmark host lost nothing, `benches/concurrent.sh`; a bigger host with faster
//! links is where it could show).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::TransportError;

static DATA_PLANE: OnceLock<Result<Handle, String>> = OnceLock::new();

/// The data plane's runtime, started on first use (a thread named `ferry-quic`).
pub fn data_plane() -> Result<Handle, TransportError> {
    DATA_PLANE
        .get_or_init(start)
        .clone()
        .map_err(TransportError::DataPlane)
}

fn start() -> Result<Handle, String> {
    // The runtime is built and dropped on its own thread: dropping one (should the
    // thread fail to start) inside the caller's async context would panic.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ferry-quic".into())
        .spawn(move || {
            let built = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("ferry-quic-work")
                .build();
            match built {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("building the data plane's runtime: {e}")));
                }
            }
        })
        .map_err(|e| format!("starting the data plane's thread: {e}"))?;
    // A one-time wait of well under a millisecond, the first time QUIC is used.
    rx.recv()
        .map_err(|_| "the data plane's thread ended before its runtime started".to_string())?
}

/// Runs `task` on the data plane's thread (on the caller's runtime if that thread could
/// not start, in which case no QUIC endpoint exists either).
pub fn spawn<F>(task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match data_plane() {
        Ok(h) => h.spawn(task),
        Err(_) => tokio::spawn(task),
    }
}

/// quinn's tokio runtime, bound to the data plane's thread: drivers are spawned there and
/// sockets and timers registered with its I/O and time drivers, whoever calls.
#[derive(Debug)]
pub(crate) struct DataPlaneRuntime(Handle);

impl DataPlaneRuntime {
    pub(crate) fn new() -> Result<Arc<Self>, TransportError> {
        Ok(Arc::new(DataPlaneRuntime(data_plane()?)))
    }
}

impl quinn::Runtime for DataPlaneRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        let _in = self.0.enter();
        quinn::TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _in = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_data_plane_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let name = rt
            .block_on(spawn(async {
                std::thread::current().name().map(str::to_string)
            }))
            .unwrap();
        assert_eq!(name.as_deref(), Some("ferry-quic"));
    }
}
