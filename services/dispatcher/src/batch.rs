//! Group execution of one kind of operational-store statement: while one
//! statement runs, the requests of other messages in flight queue up and
//! go together in the next one (over arrays, with `UNNEST`). Round trips
//! then grow with batches, not with messages, and a lone message waits for
//! nobody: a batch starts as soon as a slot is free.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

type Reply<Resp> = oneshot::Sender<Result<Resp, Arc<sqlx::Error>>>;

/// Runs requests of type `Req` in batches through one statement. The
/// executor answers a batch with one response per request, in order.
pub struct Batched<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batched<Req, Resp> {
    /// Starts the batching task: at most `max` requests a statement, at
    /// most `parallel` statements at once. It ends when the last handle is
    /// dropped.
    pub fn start<F, Fut>(name: &'static str, max: usize, parallel: usize, exec: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Resp>, sqlx::Error>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Req, Reply<Resp>)>();
        let exec = Arc::new(exec);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Taking the slot before gathering lets requests pile up
                // while every slot is busy: the busier, the larger.
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let mut batch = vec![first];
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                metrics::histogram!("ledger_dispatcher_statement_batch_size", "statement" => name)
                    .record(batch.len() as f64);
                let exec = exec.clone();
                tokio::spawn(async move {
                    let (requests, replies): (Vec<Req>, Vec<Reply<Resp>>) = batch.into_iter().unzip();
                    let n = requests.len();
                    match exec(requests).await {
                        Ok(responses) if responses.len() == n => {
                            for (reply, r) in replies.into_iter().zip(responses) {
                                let _ = reply.send(Ok(r));
                            }
                        }
                        Ok(responses) => {
                            // A bug in an executor, not a state to carry on in.
                            let e = Arc::new(sqlx::Error::Protocol(format!(
                                "{name}: {} responses to {n} requests",
                                responses.len()
                            )));
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                        Err(e) => {
                            let e = Arc::new(e);
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Batched { tx }
    }

    /// Runs one request with whatever else is waiting.
    pub async fn run(&self, request: Req) -> Result<Resp, Arc<sqlx::Error>> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((request, reply)).is_err() {
            return Err(Arc::new(sqlx::Error::PoolClosed));
        }
        answer.await.unwrap_or_else(|_| Err(Arc::new(sqlx::Error::PoolClosed)))
    }
}

/// For each request, whether it is the first with its key in the batch.
/// Statements that take a row lock per key must see each key once: a
/// duplicate (the same record read twice after a rebalance) is answered as
/// having lost the race, and looks again.
pub fn first_of_each<K: Eq + std::hash::Hash>(keys: impl IntoIterator<Item = K>) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    keys.into_iter().map(|k| seen.insert(k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_requests_share_statements_and_each_gets_its_own_answer() {
        let statements = Arc::new(AtomicUsize::new(0));
        let counted = statements.clone();
        let doubler = Arc::new(Batched::start("test", 100, 1, move |xs: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(xs.into_iter().map(|x| x * 2).collect())
            }
        }));
        let tasks: Vec<_> = (0..300u32)
            .map(|i| {
                let d = doubler.clone();
                tokio::spawn(async move { (i, d.run(i).await.expect("answer")) })
            })
            .collect();
        for t in tasks {
            let (i, doubled) = t.await.expect("task");
            assert_eq!(doubled, i * 2);
        }
        let n = statements.load(Ordering::SeqCst);
        assert!((3..=20).contains(&n), "300 requests in batches of at most 100 took {n} statements");
    }

    #[tokio::test]
    async fn a_failed_statement_fails_every_request_in_it() {
        let failing =
            Batched::start("test", 10, 2, |_: Vec<u32>| async { Err::<Vec<u32>, _>(sqlx::Error::RowNotFound) });
        assert!(failing.run(1).await.is_err());
        let short = Batched::start("test", 10, 2, |_: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        assert!(short.run(1).await.is_err(), "a missing answer is an error, not a hang");
    }

    #[test]
    fn only_the_first_of_a_key_goes_into_a_statement() {
        assert_eq!(first_of_each([1, 2, 1, 3, 2]), vec![true, true, false, true, false]);
    }
}
