//! The tokio runtime a member runs on, and `kvctl` too (its benchmarks send
//! many clients' requests on each connection, as members answer them).
//!
//! tokio's multi-threaded scheduler runs the task woken last before every
//! task already queued (its "LIFO slot"). That suits one request passed from
//! task to task, but it undoes the batching of a gRPC connection: the
//! answers to a log entry's writes wake their requests' tasks together, and
//! each answer, as it is handed to HTTP/2, wakes the connection's task into
//! the slot, so the connection writes one answer per socket write, between
//! every two requests' tasks, instead of all of them at once. With the slot
//! off, the requests' tasks run in the order they were woken and the
//! connection's task after them. Measured under puts from 64 clients over 8
//! connections (docs/performance.md, "The runtime's LIFO slot"), in nine
//! pairs against the same code with the slot on: 5–41% more puts per second
//! (19% on average) and 11–33% less CPU per put; a lone client's put takes
//! about 0.05 ms longer at the median.
//!
//! tokio offers the switch under `--cfg tokio_unstable`, which
//! `.cargo/config.toml` sets; a build without it keeps the slot.

use tokio::runtime::{Builder, Runtime};

/// Builds a member's runtime: `worker_threads` threads (one per CPU when
/// `None`), every driver enabled, the LIFO slot off.
pub fn build(worker_threads: Option<usize>) -> std::io::Result<Runtime> {
    let mut builder = Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// On one worker thread, a task spawns one task and then wakes another.
    /// With the LIFO slot the task woken last would run first; on a member's
    /// runtime they run in the order they were scheduled.
    #[test]
    fn tasks_run_in_the_order_they_were_scheduled() {
        let runtime = super::build(Some(1)).expect("runtime");
        let order = Arc::new(Mutex::new(Vec::new()));
        let note = |order: &Arc<Mutex<Vec<&'static str>>>, what| order.lock().expect("order").push(what);
        runtime.block_on(async {
            let order = order.clone();
            tokio::spawn(async move {
                let (wake, woken) = tokio::sync::oneshot::channel::<()>();
                let waiting = tokio::spawn({
                    let order = order.clone();
                    async move {
                        let _ = woken.await;
                        note(&order, "woken");
                    }
                });
                // The waiting task runs up to its await before this one
                // goes on.
                tokio::task::yield_now().await;
                let spawned = tokio::spawn({
                    let order = order.clone();
                    async move { note(&order, "spawned") }
                });
                let _ = wake.send(());
                spawned.await.expect("spawned");
                waiting.await.expect("waiting");
            })
            .await
            .expect("driver");
        });
        assert_eq!(*order.lock().expect("order"), ["spawned", "woken"]);
    }
}
