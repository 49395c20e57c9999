//! The governor of one sender identity: keeps its provider calls within the
//! identity's limits in total over every dispatcher instance, shares them
//! fairly between tenants and lets transactional mail go before bulk.
//!
//! The budget lives in the operational store (`governor_state`): a GCRA
//! theoretical arrival time for the per-second / per-minute rate and a
//! counter per UTC day. Each instance reserves a few calls at a time under
//! the row's lock and hands them out locally, in priority and tenant
//! round-robin order, at the moment the reservation allows. A reservation
//! that nobody is left to use is wasted, never lent to a later burst, and
//! after a restart the budget is where it was: the limit is not exceeded.
//!
//! A throttled message waits in the queue; it is never failed or skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use ledger_runtime::{IdentityConfig, Shutdown};
use ledger_schemas::Priority;
use sqlx::PgPool;
use tokio::sync::{oneshot, Notify};

pub struct Governor {
    identity: String,
    limits: Option<Limits>,
    queue: Mutex<FairQueue>,
    wake: Notify,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Time between two calls at the steady rate.
    interval: Option<chrono::Duration>,
    /// Calls that may go at once.
    burst: u32,
    per_day: u32,
}

/// What a reservation granted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    pub calls: u32,
    /// When they may be made, by the database's clock.
    pub at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

#[derive(Default)]
struct FairQueue {
    /// Index 0: transactional, 1: bulk.
    classes: [TenantRing; 2],
    len: usize,
}

#[derive(Default)]
struct TenantRing {
    order: VecDeque<String>,
    waiting: HashMap<String, VecDeque<oneshot::Sender<()>>>,
}

impl TenantRing {
    fn push(&mut self, tenant: &str, waiter: oneshot::Sender<()>) {
        let q = self.waiting.entry(tenant.to_owned()).or_default();
        if q.is_empty() {
            self.order.push_back(tenant.to_owned());
        }
        q.push_back(waiter);
    }

    /// The next waiter, one tenant after the other.
    fn pop(&mut self) -> Option<oneshot::Sender<()>> {
        let tenant = self.order.pop_front()?;
        let q = self.waiting.get_mut(&tenant)?;
        let waiter = q.pop_front();
        if q.is_empty() {
            self.waiting.remove(&tenant);
        } else {
            self.order.push_back(tenant);
        }
        waiter
    }
}

impl FairQueue {
    fn push(&mut self, tenant: &str, priority: Priority, waiter: oneshot::Sender<()>) {
        let class = match priority {
            Priority::Transactional => 0,
            Priority::Bulk => 1,
        };
        self.classes[class].push(tenant, waiter);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<oneshot::Sender<()>> {
        let waiter = self.classes.iter_mut().find_map(TenantRing::pop)?;
        self.len -= 1;
        Some(waiter)
    }
}

impl Governor {
    /// The governor of `identity`; with limits, its pump runs until
    /// `shutdown`.
    pub fn start(identity: &IdentityConfig, ops: PgPool, shutdown: Shutdown) -> Arc<Governor> {
        let limited = identity.rate_per_second().is_some() || identity.per_day > 0;
        let limits = limited.then(|| Limits {
            interval: identity.rate_per_second().map(|r| chrono::Duration::nanoseconds((1e9 / r).round() as i64)),
            burst: identity.effective_burst(),
            per_day: identity.per_day,
        });
        let governor = Arc::new(Governor {
            identity: identity.name.clone(),
            limits,
            queue: Mutex::new(FairQueue::default()),
            wake: Notify::new(),
        });
        if let Some(limits) = limits {
            let g = governor.clone();
            tokio::spawn(async move { g.pump(limits, ops, shutdown).await });
        }
        governor
    }

    /// Waits for this identity's permission to make one provider call.
    /// Returns `false` if the governor stopped (shutting down).
    pub async fn acquire(&self, tenant: &str, priority: Priority) -> bool {
        if self.limits.is_none() {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.push(tenant, priority, tx);
            metrics::gauge!("ledger_governor_waiting", "identity" => self.identity.clone()).set(q.len as f64);
        }
        self.wake.notify_one();
        let started = std::time::Instant::now();
        let granted = rx.await.is_ok();
        metrics::histogram!("ledger_governor_wait_seconds", "identity" => self.identity.clone())
            .record(started.elapsed().as_secs_f64());
        granted
    }

    /// Hands a permission that turned out not to be needed (the message was
    /// claimed elsewhere meanwhile) to the next waiter, so that duplicates
    /// seen after a rebalance do not eat the budget.
    pub fn pass_on(&self) {
        if self.limits.is_none() {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(waiter) = q.pop() {
            if waiter.send(()).is_ok() {
                return;
            }
        }
        // Nobody waiting here: the call is lost, never saved up.
    }

    fn waiting(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    async fn pump(self: Arc<Self>, limits: Limits, ops: PgPool, shutdown: Shutdown) {
        let identity = self.identity.clone();
        loop {
            while self.waiting() == 0 {
                tokio::select! {
                    _ = shutdown.wait() => return self.close(),
                    _ = self.wake.notified() => {}
                }
            }
            let want = (self.waiting() as u32).min(limits.burst).max(1);
            let grant = match reserve(&ops, &identity, limits, want).await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(identity, error = %e, "governor reservation failed; retrying");
                    tokio::select! {
                        _ = shutdown.wait() => return self.close(),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            let wait = (grant.at - grant.now).to_std().unwrap_or_default();
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.wait() => return self.close(),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let mut given = 0;
            while given < grant.calls {
                let Some(waiter) = q.pop() else { break };
                if waiter.send(()).is_ok() {
                    given += 1;
                }
            }
            metrics::counter!("ledger_governor_calls_granted_total", "identity" => identity.clone())
                .increment(u64::from(given));
            metrics::gauge!("ledger_governor_waiting", "identity" => identity.clone()).set(q.len as f64);
        }
    }

    /// Drops every waiter: their `acquire` returns `false`.
    fn close(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.pop().is_some() {}
    }
}

/// Reserves up to `want` calls of `identity`'s budget. The calls granted
/// may be made at `Grant::at`; none are granted before the next UTC day
/// when the day's budget is spent.
async fn reserve(ops: &PgPool, identity: &str, limits: Limits, want: u32) -> Result<Grant, sqlx::Error> {
    let mut tx = ops.begin().await?;
    sqlx::query(
        "-- dispatcher::governor::reserve (create)
         INSERT INTO governor_state (identity) VALUES ($1) ON CONFLICT (identity) DO NOTHING",
    )
    .bind(identity)
    .execute(&mut *tx)
    .await?;
    let (tat, day, day_used, now): (DateTime<Utc>, NaiveDate, i64, DateTime<Utc>) = sqlx::query_as(
        "-- dispatcher::governor::reserve (lock)
         SELECT tat, day, day_used, clock_timestamp() FROM governor_state WHERE identity = $1 FOR UPDATE",
    )
    .bind(identity)
    .fetch_one(&mut *tx)
    .await?;
    let (grant, new_tat, new_day, new_used) = plan(limits, want, tat, day, day_used, now);
    sqlx::query(
        "-- dispatcher::governor::reserve (advance)
         UPDATE governor_state SET tat = $2, day = $3, day_used = $4, updated_at = now() WHERE identity = $1",
    )
    .bind(identity)
    .bind(new_tat)
    .bind(new_day)
    .bind(new_used)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if limits.per_day > 0 {
        // Shared by every instance: what the identity's day has used so far.
        metrics::gauge!("ledger_identity_day_used", "identity" => identity.to_owned()).set(new_used as f64);
        metrics::gauge!("ledger_identity_day_limit", "identity" => identity.to_owned()).set(f64::from(limits.per_day));
    }
    Ok(grant)
}

/// The pure part of a reservation: what to grant and the new state.
fn plan(
    limits: Limits,
    want: u32,
    tat: DateTime<Utc>,
    day: NaiveDate,
    day_used: i64,
    now: DateTime<Utc>,
) -> (Grant, DateTime<Utc>, NaiveDate, i64) {
    let today = now.date_naive();
    let used = if day == today { day_used } else { 0 };
    let mut calls = want;
    if limits.per_day > 0 {
        let left = (i64::from(limits.per_day) - used).max(0);
        if left == 0 {
            // Spent for today: nothing before midnight UTC.
            let midnight = (today + chrono::Days::new(1)).and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
            return (Grant { calls: 0, at: midnight, now }, tat, today, used);
        }
        calls = calls.min(left as u32);
    }
    let (at, new_tat) = match limits.interval {
        Some(t) => {
            // GCRA: call i of the reservation is due at start + i·T; a burst
            // of `burst` calls may run ahead of that by (burst−1)·T.
            let start = tat.max(now);
            let last_due = start + t * (calls as i32 - 1);
            let at = (last_due - t * (limits.burst as i32 - 1)).max(now);
            (at, start + t * calls as i32)
        }
        None => (now, tat),
    };
    (Grant { calls, at, now }, new_tat, today, used + i64::from(calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: f64, burst: u32, per_day: u32) -> Limits {
        Limits { interval: Some(chrono::Duration::nanoseconds((1e9 / per_second) as i64)), burst, per_day }
    }

    #[test]
    fn a_steady_rate_spaces_reservations_by_the_interval() {
        let now = Utc::now();
        let l = limits(100.0, 1, 0);
        let (g, tat, day, used) = plan(l, 1, now, now.date_naive(), 0, now);
        assert_eq!((g.calls, g.at), (1, now));
        let (g2, tat2, _, _) = plan(l, 1, tat, day, used, now);
        assert_eq!(g2.at, now + chrono::Duration::milliseconds(10));
        assert_eq!(tat2, now + chrono::Duration::milliseconds(20));
    }

    #[test]
    fn a_burst_goes_at_once_after_a_quiet_spell_but_not_twice() {
        let now = Utc::now();
        let l = limits(100.0, 5, 0);
        let (g, tat, day, used) = plan(l, 5, now - chrono::Duration::seconds(10), now.date_naive(), 0, now);
        assert_eq!((g.calls, g.at), (5, now));
        let (g2, _, _, _) = plan(l, 5, tat, day, used, now);
        // The next five are due 50 ms on: no second burst.
        assert_eq!(g2.at, now + chrono::Duration::milliseconds(50));
    }

    #[test]
    fn a_spent_day_waits_for_midnight_and_a_new_day_starts_afresh() {
        let now = "2026-11-24T21:00:00Z".parse::<DateTime<Utc>>().expect("time");
        let l = Limits { interval: None, burst: 1, per_day: 10 };
        let (g, _, _, used) = plan(l, 4, now, now.date_naive(), 8, now);
        assert_eq!((g.calls, used), (2, 10));
        let (g, _, _, _) = plan(l, 4, now, now.date_naive(), 10, now);
        assert_eq!(g.calls, 0);
        assert_eq!(g.at, "2026-11-25T00:00:00Z".parse::<DateTime<Utc>>().expect("time"));
        let yesterday = now.date_naive() - chrono::Days::new(1);
        let (g, _, day, used) = plan(l, 4, now, yesterday, 10, now);
        assert_eq!((g.calls, day, used), (4, now.date_naive(), 4));
    }

    #[test]
    fn tenants_take_turns_and_transactional_goes_first() {
        let mut q = FairQueue::default();
        let mut rx = Vec::new();
        for (tenant, priority) in [
            ("a", Priority::Bulk),
            ("a", Priority::Bulk),
            ("a", Priority::Bulk),
            ("b", Priority::Bulk),
            ("c", Priority::Transactional),
        ] {
            let (tx, r) = oneshot::channel();
            q.push(tenant, priority, tx);
            rx.push((tenant, priority, r));
        }
        let mut order = Vec::new();
        while let Some(w) = q.pop() {
            w.send(()).expect("send");
            let i = rx.iter_mut().position(|(_, _, r)| r.try_recv().is_ok()).expect("one woke");
            let (t, _, _) = rx.remove(i);
            order.push(t);
        }
        assert_eq!(order, ["c", "a", "b", "a", "a"]);
    }
}
