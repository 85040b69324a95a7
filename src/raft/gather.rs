//! The queue shape the batcher and the forwarder share: requests wait in a
//! channel; a task takes the first, waits for one of a few slots (waiting is
//! what lets the next batch gather), takes what else is queued and may join
//! it, and hands the batch to a task of its own.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

/// A queued request.
pub(crate) trait Queued: Sized {
    /// Its size in bytes, toward a batch's limit.
    fn size(&self) -> usize;
    /// Whether it may go in the same batch as `first`.
    fn joins(&self, first: &Self) -> bool;
}

/// Bounds on one batch.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    /// Batches handled at once.
    pub in_flight: usize,
    /// Most requests in a batch.
    pub items: usize,
    /// A batch closes once its requests add up to this many bytes.
    pub bytes: usize,
}

/// Takes batches from `rx` until it closes, and runs `handle` on each.
pub(crate) async fn run<P, F, Fut>(mut rx: mpsc::Receiver<P>, limits: Limits, handle: F)
where
    P: Queued + Send + 'static,
    F: Fn(Vec<P>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.in_flight));
    // A request taken from the queue that must start the next batch.
    let mut held: Option<P> = None;
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let batch = gather(first, &mut rx, &mut held, limits);
        let work = handle(batch);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

/// The next batch: `first`, then what is queued and joins it, up to the
/// limits; a request that does not join is left in `held`.
pub(crate) fn gather<P: Queued>(first: P, rx: &mut mpsc::Receiver<P>, held: &mut Option<P>, limits: Limits) -> Vec<P> {
    let mut size = first.size();
    let mut batch = vec![first];
    while batch.len() < limits.items && size < limits.bytes {
        match rx.try_recv() {
            Ok(p) if !p.joins(&batch[0]) => {
                *held = Some(p);
                break;
            }
            Ok(p) => {
                size += p.size();
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    batch
}
