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
//! A permission is for a call made now: one not used within the grant's
//! time to live (`dispatcher.governor_grant_ttl_ms`) — its message waited
//! for a slot, its claim or its *attempted* event — is given up, and the
//! message takes a fresh one ahead of every other waiter right before its
//! call. So calls, not just grants, keep to the rate: any window sees at
//! most rate × (window + ttl) + burst of them.
//!
//! A throttled message waits in the queue; it is never failed or skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use ledger_runtime::{IdentityConfig, Shutdown};
use ledger_schemas::Priority;
use sqlx::PgPool;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

pub struct Governor {
    identity: String,
    limits: Option<Limits>,
    /// How long a permission stays good for a call.
    ttl: Duration,
    /// This instance's calls in flight at once: every permission holds one.
    slots: Arc<Semaphore>,
    queue: Mutex<FairQueue>,
    wake: Notify,
    shutdown: Shutdown,
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

/// Leave to make one provider call, granted at `granted`, with one of the
/// identity's call slots (given back when this is dropped).
pub struct Permission {
    granted: Instant,
    slot: OwnedSemaphorePermit,
}

/// What the pump hands a waiter: the time of its grant and, unless the
/// waiter holds one already, a call slot.
struct Handout {
    granted: Instant,
    slot: Option<OwnedSemaphorePermit>,
}

type Waiter = oneshot::Sender<Handout>;

#[derive(Default)]
struct FairQueue {
    /// Index 0: messages about to call whose permission went stale (they
    /// hold a slot), 1: transactional, 2: bulk.
    classes: [TenantRing; 3],
    len: usize,
    renewals: usize,
}

#[derive(Default)]
struct TenantRing {
    order: VecDeque<String>,
    waiting: HashMap<String, VecDeque<Waiter>>,
}

impl TenantRing {
    fn push(&mut self, tenant: &str, waiter: Waiter) {
        let q = self.waiting.entry(tenant.to_owned()).or_default();
        if q.is_empty() {
            self.order.push_back(tenant.to_owned());
        }
        q.push_back(waiter);
    }

    /// The next waiter, one tenant after the other.
    fn pop(&mut self) -> Option<Waiter> {
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
    fn push(&mut self, tenant: &str, priority: Priority, waiter: Waiter) {
        let class = match priority {
            Priority::Transactional => 1,
            Priority::Bulk => 2,
        };
        self.classes[class].push(tenant, waiter);
        self.len += 1;
    }

    /// Ahead of everyone: a message whose call is next but whose
    /// permission went stale.
    fn push_renewal(&mut self, tenant: &str, waiter: Waiter) {
        self.classes[0].push(tenant, waiter);
        self.len += 1;
        self.renewals += 1;
    }

    /// The next waiter and whether it needs a slot: renewals first (they
    /// need none), then the others while `slot_free`.
    fn pop(&mut self, slot_free: bool) -> Option<(Waiter, bool)> {
        if let Some(w) = self.classes[0].pop() {
            self.len -= 1;
            self.renewals -= 1;
            return Some((w, false));
        }
        if !slot_free {
            return None;
        }
        let w = self.classes[1..].iter_mut().find_map(TenantRing::pop)?;
        self.len -= 1;
        Some((w, true))
    }
}

impl Governor {
    /// The governor of `identity`; with limits, its pump runs until
    /// `shutdown`.
    pub fn start(identity: &IdentityConfig, ttl: Duration, ops: PgPool, shutdown: Shutdown) -> Arc<Governor> {
        let limited = identity.rate_per_second().is_some() || identity.per_day > 0;
        let limits = limited.then(|| Limits {
            interval: identity.rate_per_second().map(|r| chrono::Duration::nanoseconds((1e9 / r).round() as i64)),
            burst: identity.effective_burst(),
            per_day: identity.per_day,
        });
        let governor = Arc::new(Governor {
            identity: identity.name.clone(),
            limits,
            ttl,
            slots: Arc::new(Semaphore::new(identity.concurrency)),
            queue: Mutex::new(FairQueue::default()),
            wake: Notify::new(),
            shutdown: shutdown.clone(),
        });
        if let Some(limits) = limits {
            let g = governor.clone();
            tokio::spawn(async move { g.pump(limits, ops, shutdown).await });
        }
        governor
    }

    /// Waits for this identity's permission to make one provider call and
    /// a slot to make it in; who is served first is the fair queue's
    /// decision, and a rate-limited identity grants no call before a slot
    /// is free for it. `None` when shutting down.
    /// Whether the identity has a rate or daily limit (otherwise only its
    /// concurrency bounds its calls).
    pub fn is_limited(&self) -> bool {
        self.limits.is_some()
    }

    pub async fn acquire(&self, tenant: &str, priority: Priority) -> Option<Permission> {
        if self.limits.is_none() {
            let slot = tokio::select! {
                slot = self.slots.clone().acquire_owned() => slot.ok()?,
                _ = self.shutdown.wait() => return None,
            };
            return Some(Permission { granted: Instant::now(), slot });
        }
        let handout = self.wait(|q, tx| q.push(tenant, priority, tx)).await?;
        Some(Permission { granted: handout.granted, slot: handout.slot? })
    }

    /// The permission to call now: `permission` if it is still fresh,
    /// otherwise a new one, ahead of every other waiter (the old one is
    /// given up). The last thing before the call, whose *attempted* event
    /// is on the log and whose claim's lease runs: if no new permission
    /// comes within `patience` (a spent day's budget, a rate of a few calls
    /// a minute) or the governor stops (shutting down), the call goes on
    /// the old one rather than let the lease run out and the message turn
    /// ambiguous.
    pub async fn fresh(&self, tenant: &str, permission: Permission, patience: Duration) -> Permission {
        if self.limits.is_none() || permission.granted.elapsed() <= self.ttl {
            return permission;
        }
        metrics::counter!("ledger_governor_permissions_renewed_total", "identity" => self.identity.clone())
            .increment(1);
        match tokio::time::timeout(patience, self.wait(|q, tx| q.push_renewal(tenant, tx))).await {
            Ok(Some(handout)) => Permission { granted: handout.granted, slot: permission.slot },
            Ok(None) => permission,
            Err(_) => {
                tracing::warn!(identity = %self.identity, ?patience, "no fresh permission in time; calling on the stale one");
                permission
            }
        }
    }

    /// The permission is being used: how long it took from grant to call.
    pub fn used(&self, permission: &Permission) {
        if self.limits.is_some() {
            metrics::histogram!("ledger_governor_grant_to_call_seconds", "identity" => self.identity.clone())
                .record(permission.granted.elapsed().as_secs_f64());
        }
    }

    async fn wait(&self, enqueue: impl FnOnce(&mut FairQueue, Waiter)) -> Option<Handout> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if self.shutdown.is_triggered() {
                return None;
            }
            enqueue(&mut q, tx);
            metrics::gauge!("ledger_governor_waiting", "identity" => self.identity.clone()).set(q.len as f64);
        }
        self.wake.notify_one();
        let started = Instant::now();
        let handout = tokio::select! {
            h = rx => h.ok(),
            _ = self.shutdown.wait() => None,
        };
        metrics::histogram!("ledger_governor_wait_seconds", "identity" => self.identity.clone())
            .record(started.elapsed().as_secs_f64());
        handout
    }

    /// Hands a permission that turned out not to be needed (the message was
    /// claimed elsewhere meanwhile) to the next waiter, so that duplicates
    /// seen after a rebalance do not eat the budget. It keeps its grant
    /// time: stale, it is dropped.
    pub fn pass_on(&self, permission: Permission) {
        if self.limits.is_none() || permission.granted.elapsed() > self.ttl {
            return;
        }
        let granted = permission.granted;
        let mut slot = Some(permission.slot);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((waiter, needs_slot)) = q.pop(slot.is_some()) {
            let handout = Handout { granted, slot: if needs_slot { slot.take() } else { None } };
            match waiter.send(handout) {
                Ok(()) => return,
                Err(back) => slot = slot.or(back.slot),
            }
        }
        // Nobody waiting here: the call is lost, never saved up.
    }

    /// Waiting messages, and among them renewals.
    fn waiting(&self) -> (usize, usize) {
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        (q.len, q.renewals)
    }

    async fn pump(self: Arc<Self>, limits: Limits, ops: PgPool, shutdown: Shutdown) {
        let identity = self.identity.clone();
        // Slots taken for calls not yet granted; kept for the next round.
        let mut slots: Vec<OwnedSemaphorePermit> = Vec::new();
        loop {
            let (waiting, renewals) = self.waiting();
            if waiting == 0 {
                tokio::select! {
                    _ = shutdown.wait() => return self.close(),
                    _ = self.wake.notified() => continue,
                }
            }
            // A slot for each waiter that needs one, up to a burst; no
            // budget is reserved for calls that could not be made.
            let wanted_slots = (waiting - renewals).min(limits.burst as usize);
            while slots.len() < wanted_slots {
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => slots.push(slot),
                    Err(_) => break,
                }
            }
            if renewals == 0 && slots.is_empty() {
                tokio::select! {
                    _ = shutdown.wait() => return self.close(),
                    // A renewal needs no slot: look again.
                    _ = self.wake.notified() => continue,
                    slot = self.slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slots.push(slot),
                        Err(_) => return self.close(),
                    },
                }
            }
            let want = ((renewals + slots.len()) as u32).min(limits.burst).max(1);
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
            let granted = Instant::now();
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let mut given = 0;
            while given < grant.calls {
                let Some((waiter, needs_slot)) = q.pop(!slots.is_empty()) else { break };
                let slot = if needs_slot { slots.pop() } else { None };
                match waiter.send(Handout { granted, slot }) {
                    Ok(()) => given += 1,
                    Err(back) => slots.extend(back.slot),
                }
            }
            metrics::counter!("ledger_governor_calls_granted_total", "identity" => identity.clone())
                .increment(u64::from(given));
            metrics::gauge!("ledger_governor_waiting", "identity" => identity.clone()).set(q.len as f64);
        }
    }

    /// Drops every waiter: their `acquire` returns `None`.
    fn close(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.pop(true).is_some() {}
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
        while let Some((w, _)) = q.pop(true) {
            assert!(w.send(Handout { granted: Instant::now(), slot: None }).is_ok(), "send");
            let i = rx.iter_mut().position(|(_, _, r)| r.try_recv().is_ok()).expect("one woke");
            let (t, _, _) = rx.remove(i);
            order.push(t);
        }
        assert_eq!(order, ["c", "a", "b", "a", "a"]);
    }
}
