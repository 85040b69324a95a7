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

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(u32);

    impl Queued for Item {
        fn size(&self) -> usize {
            1
        }

        fn joins(&self, _first: &Self) -> bool {
            true
        }
    }

    /// While every slot is busy, requests queue; each freed slot takes what
    /// queued, up to `items`, oldest first.
    #[tokio::test]
    async fn queued_requests_wait_for_a_slot_and_go_in_batches_of_at_most_items() {
        let limits = Limits { in_flight: 2, items: 3, bytes: usize::MAX };
        let (tx, rx) = mpsc::channel(64);
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<Vec<u32>>();
        // A batch ends when the test lets it.
        let gate = Arc::new(Semaphore::new(0));
        let running = {
            let gate = gate.clone();
            tokio::spawn(run(rx, limits, move |batch: Vec<Item>| {
                let (seen_tx, gate) = (seen_tx.clone(), gate.clone());
                async move {
                    let _ = seen_tx.send(batch.iter().map(|i| i.0).collect());
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                }
            }))
        };
        tx.send(Item(0)).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), vec![0]);
        tx.send(Item(1)).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), vec![1]);
        for i in 2..9 {
            tx.send(Item(i)).await.unwrap();
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(seen.try_recv().is_err(), "a third batch started while both slots were taken");
        gate.add_permits(1);
        assert_eq!(seen.recv().await.unwrap(), vec![2, 3, 4]);
        gate.add_permits(1);
        assert_eq!(seen.recv().await.unwrap(), vec![5, 6, 7]);
        gate.add_permits(1);
        assert_eq!(seen.recv().await.unwrap(), vec![8]);
        drop(tx);
        gate.add_permits(16);
        tokio::time::timeout(std::time::Duration::from_secs(5), running)
            .await
            .expect("run ends once the queue closes")
            .unwrap();
    }
}
