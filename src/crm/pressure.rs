//! The gate every CRM call of a process passes: the request rate (`crm.requests_per_second`)
//! and an adaptive concurrency limit, how many requests may be in flight at once, between 1
//! and `crm.max_concurrent_requests`.
//!
//! Rate: slots are granted at most `requests_per_second` a second, evenly spaced (no burst: a
//! CRM counting calls per second never sees more than the rate), and only when granted is
//! a call's turn taken, so the order of the queue below is the order calls go out.
//!
//! Additive increase, multiplicative decrease (the rule TCP's congestion control made
//! common): every answer that came back well adds `1 / limit` to the limit (one more request
//! per round trip); an answer that says the CRM is overloaded (HTTP 429, a 5xx, a timeout or
//! a broken connection) halves it, and an answer whose latency rose to more than twice the
//! lowest latency seen (both smoothed, and by 100 ms at least) takes a fifth off. A decrease
//! happens at most once per smoothed round trip, so a burst of failures of requests sent
//! together counts once. The limit starts at its maximum: the rate paces a healthy CRM, and
//! this limit only keeps a CRM that slows down or refuses from being pushed harder.
//!
//! A pause ([`Pressure::pause`]: a 429's `Retry-After`, a 503's) stops the whole process's
//! traffic: the rate's next turn moves to the pause's end, so nothing is granted before it,
//! and a call granted before the pause was set but not yet sent gives its slot back and
//! queues again. After the pause the queue goes out at the rate, never as a burst of the calls
//! that waited (and a slot is not held through the pause).
//!
//! Slots are granted first come, first served within two classes: a call in the foreground
//! (a stream's steady-state cycle, an open window, the servers list, a login – these two
//! even when a backfill's call asks for them: [`in_foreground`]) goes before
//! every call in the background (a backfill's concurrent windows, a reconciliation sweep:
//! reads run inside [`in_background`]). So however many windows a backfill keeps open, a
//! steady-state call waits at most for the next turn of the rate and a slot to come back,
//! never behind the backfill's queue. Within the background, a read's next page goes before
//! any first page (a window's pages come one after the other: a queue wait between them
//! would make the densest windows, a backfill's most recent ones, its tail), and first pages
//! go by the window's first day, the oldest first whatever the stream: the streams'
//! backfills move through time together and the cursors move steadily.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The smallest latency rise taken for pressure: the smoothed latency above this multiple
/// of the lowest smoothed latency seen, and by at least [`LATENCY_RISE_MIN`] seconds (the
/// jitter of answers of a few milliseconds is no pressure).
const LATENCY_RISE: f64 = 2.0;
/// See [`LATENCY_RISE`]: 100 ms.
const LATENCY_RISE_MIN: f64 = 0.1;

tokio::task_local! {
    static BACKGROUND: Option<u64>;
}

/// Runs `work` with its CRM calls in the background class, ranked `rank` (lower first; a
/// window's first day, see the module header).
pub async fn in_background<F: Future>(rank: u64, work: F) -> F::Output {
    BACKGROUND.scope(Some(rank), work).await
}

/// Runs `work` with its CRM calls in the foreground class, even inside [`in_background`]:
/// a login (which every call of the process waits for while it holds the token) and the
/// servers list never queue behind a backfill.
pub async fn in_foreground<F: Future>(work: F) -> F::Output {
    BACKGROUND.scope(None, work).await
}

/// The background rank of the current task's calls; `None` in the foreground.
pub fn background_rank() -> Option<u64> {
    BACKGROUND.try_with(|rank| *rank).ok().flatten()
}

/// How an answer went, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that says nothing about load (a 4xx other than 429, a redirect, a
    /// cancelled call).
    Neutral,
    /// A usable answer, with the time from sending the request to its headers.
    Answered(Duration),
    /// HTTP 429, a 5xx, a timeout or a connection error.
    Overloaded,
}

/// The adaptive concurrency limit of a process's CRM calls (see the module header).
#[derive(Debug)]
pub struct Pressure {
    max: u32,
    /// The time between two grants (`1 / requests_per_second`).
    spacing: Duration,
    state: Mutex<State>,
    /// Wakes the calls waiting when a slot came back the rate could not hand out yet.
    changed: tokio::sync::Notify,
    /// The current limit (whole requests), for the metrics.
    limit_now: AtomicU64,
    /// Requests holding a slot now (in flight, or through a 429 pause).
    in_flight: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// The limit, fractional so additive increase can be `1 / limit` per answer.
    limit: f64,
    /// Slots held now.
    held: u32,
    /// Calls of the foreground waiting for a slot, first come first served.
    foreground: VecDeque<oneshot::Sender<()>>,
    /// Calls of the background waiting for a slot, by rank and arrival; served after the
    /// foreground.
    background: BTreeMap<(u64, u64), oneshot::Sender<()>>,
    /// Arrivals in the background so far (ties of a rank go first come, first served).
    arrivals: u64,
    /// Smoothed latency of usable answers, in seconds.
    latency: Option<f64>,
    /// The lowest smoothed latency seen since the limit was last lowered, in seconds.
    lowest: Option<f64>,
    /// When the limit was last lowered.
    lowered: Option<Instant>,
    /// The earliest instant of the next grant (the rate, and the end of a pause).
    next_turn: Instant,
    /// Until when every call of the process waits (a 429's `Retry-After`).
    paused_until: Option<Instant>,
}

impl State {
    fn capacity(&self) -> u32 {
        self.limit.floor().max(1.0) as u32
    }

    /// Whether a slot can be granted at `now`: one is free and it is the rate's turn.
    fn can_grant(&self, now: Instant) -> bool {
        self.held < self.capacity() && self.next_turn <= now
    }

    /// Takes a slot and the rate's turn.
    fn take(&mut self, now: Instant, spacing: Duration) {
        self.held += 1;
        self.next_turn = now.max(self.next_turn) + spacing;
    }

    /// Hands a free slot to the first call waiting (foreground first) if it is the rate's
    /// turn.
    fn grant(&mut self, spacing: Duration) {
        let now = Instant::now();
        while self.can_grant(now) {
            let Some(waiter) = self
                .foreground
                .pop_front()
                .or_else(|| self.background.pop_first().map(|(_, waiter)| waiter))
            else {
                return;
            };
            // A waiter that went away (its call was cancelled) gets nothing.
            if waiter.send(()).is_ok() {
                self.take(now, spacing);
            }
        }
    }
}

/// A slot of [`Pressure`], given back when dropped with the outcome last set
/// ([`Outcome::Neutral`] unless [`Slot::set`] was called).
#[derive(Debug)]
pub struct Slot<'a> {
    pressure: &'a Pressure,
    outcome: Outcome,
}

impl Slot<'_> {
    /// Records how the slot's request went (reported when the slot is dropped).
    pub fn set(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// Gives the slot back with the outcome of its request.
    pub fn done(mut self, outcome: Outcome) {
        self.set(outcome);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pressure.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.pressure.release(self.outcome);
    }
}

/// A call waiting for a slot; a slot granted to it after it was cancelled goes back.
struct Waiting<'a> {
    pressure: &'a Pressure,
    granted: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut granted) = self.granted.take() {
            granted.close();
            if granted.try_recv().is_ok() {
                self.pressure.release(Outcome::Neutral);
            }
        }
    }
}

impl Pressure {
    /// A gate of `requests_per_second` (at least 1) and at most `max` requests in flight
    /// (at least 1), the limit starting at `max`.
    pub fn new(max: u32, requests_per_second: u32) -> Self {
        let max = max.max(1);
        // Rounded up: `1 s / 3` truncated spaces four grants within one second.
        let rate = u64::from(requests_per_second.max(1));
        Pressure {
            max,
            spacing: Duration::from_nanos(1_000_000_000u64.div_ceil(rate)),
            changed: tokio::sync::Notify::new(),
            state: Mutex::new(State {
                limit: f64::from(max),
                held: 0,
                foreground: VecDeque::new(),
                background: BTreeMap::new(),
                arrivals: 0,
                latency: None,
                lowest: None,
                lowered: None,
                next_turn: Instant::now(),
                paused_until: None,
            }),
            limit_now: AtomicU64::new(u64::from(max)),
            in_flight: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a slot: in the foreground class unless the task runs [`in_background`].
    pub async fn acquire(&self) -> Slot<'_> {
        self.acquire_as(background_rank()).await
    }

    /// Waits for a slot in the foreground (`None`) or in the background with a rank; never
    /// returns while a pause ([`Pressure::pause`]) lasts.
    pub async fn acquire_as(&self, background: Option<u64>) -> Slot<'_> {
        loop {
            let slot = self.acquire_once(background).await;
            // Granted before a pause was set: the slot goes back and the call queues again,
            // to be granted at the rate after the pause (the next turn is at its end).
            let paused = self
                .lock()
                .paused_until
                .is_some_and(|until| until > Instant::now());
            if !paused {
                return slot;
            }
            drop(slot);
        }
    }

    /// Makes every call of the process wait `pause` from now (a longer pause already set
    /// stands): nothing is granted before its end, and calls granted but not sent yet queue
    /// again (see the module header).
    pub fn pause(&self, pause: Duration) {
        let until = Instant::now() + pause;
        let mut state = self.lock();
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
        state.next_turn = state.next_turn.max(until);
        drop(state);
        // Waiters sleeping until an earlier turn look again.
        self.changed.notify_waiters();
    }

    /// Until when calls wait (a pause set by [`Pressure::pause`]), if that is in the future.
    pub fn paused_until(&self) -> Option<Instant> {
        self.lock()
            .paused_until
            .filter(|until| *until > Instant::now())
    }

    async fn acquire_once(&self, background: Option<u64>) -> Slot<'_> {
        let granted = {
            let mut state = self.lock();
            let ahead = state.foreground.len()
                + match background {
                    Some(_) => state.background.len(),
                    None => 0,
                };
            let now = Instant::now();
            if ahead == 0 && state.can_grant(now) {
                state.take(now, self.spacing);
                None
            } else {
                let (tx, rx) = oneshot::channel();
                match background {
                    None => state.foreground.push_back(tx),
                    Some(rank) => {
                        state.arrivals += 1;
                        let arrival = state.arrivals;
                        state.background.insert((rank, arrival), tx);
                    }
                }
                Some(rx)
            }
        };
        if let Some(rx) = granted {
            let mut waiting = Waiting {
                pressure: self,
                granted: Some(rx),
            };
            loop {
                // The rate's next turn while a slot is free: whoever wakes first hands it
                // out. With every slot held, the one given back hands it out, or wakes the
                // waiters to wait for the turn.
                let changed = self.changed.notified();
                let turn = {
                    let state = self.lock();
                    (state.held < state.capacity()).then_some(state.next_turn)
                };
                let Some(rx) = waiting.granted.as_mut() else {
                    break;
                };
                let far = Instant::now() + Duration::from_secs(3600);
                tokio::select! {
                    // The sender is only dropped unsent when the whole `Pressure` is.
                    _ = rx => break,
                    _ = tokio::time::sleep_until(turn.unwrap_or(far).into()) => {
                        self.lock().grant(self.spacing);
                    }
                    _ = changed => {}
                }
            }
            waiting.granted = None;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Slot {
            pressure: self,
            outcome: Outcome::Neutral,
        }
    }

    /// The current limit, in whole requests.
    pub fn limit(&self) -> u64 {
        self.limit_now.load(Ordering::Relaxed)
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls waiting for a slot now (both classes).
    pub fn queued(&self) -> usize {
        let state = self.lock();
        state.foreground.len() + state.background.len()
    }

    /// The largest limit (`crm.max_concurrent_requests`).
    pub fn max(&self) -> u32 {
        self.max
    }

    fn release(&self, outcome: Outcome) {
        let mut state = self.lock();
        state.held = state.held.saturating_sub(1);
        let now = Instant::now();
        let round_trip = Duration::from_secs_f64(state.latency.unwrap_or(0.1).clamp(0.05, 60.0));
        let may_lower = state.lowered.is_none_or(|t| now - t >= round_trip);
        let lowered = match outcome {
            Outcome::Neutral => None,
            Outcome::Overloaded if may_lower => Some((state.limit / 2.0).max(1.0)),
            Outcome::Overloaded => None,
            Outcome::Answered(took) => {
                let took = took.as_secs_f64();
                let latency = state.latency.map_or(took, |l| 0.8 * l + 0.2 * took);
                state.latency = Some(latency);
                let lowest = state.lowest.map_or(latency, |l| l.min(latency));
                state.lowest = Some(lowest);
                let risen = latency > LATENCY_RISE * lowest && latency > lowest + LATENCY_RISE_MIN;
                if risen && may_lower && state.limit > 1.0 {
                    Some((state.limit * 0.8).max(1.0))
                } else {
                    state.limit = (state.limit + 1.0 / state.limit).min(f64::from(self.max));
                    None
                }
            }
        };
        if let Some(limit) = lowered {
            state.limit = limit;
            state.lowered = Some(now);
            // The latency measured before the pressure no longer says what is normal.
            state.lowest = state.latency;
        }
        self.limit_now
            .store(u64::from(state.capacity()), Ordering::Relaxed);
        state.grant(self.spacing);
        if !state.foreground.is_empty() || !state.background.is_empty() {
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overload_halves_the_limit_and_answers_raise_it_again() {
        let pressure = Pressure::new(16, 1000);
        assert_eq!(pressure.limit(), 16);
        pressure.acquire().await.done(Outcome::Overloaded);
        assert_eq!(pressure.limit(), 8);
        // A second overload within the round trip counts as the same one.
        pressure.acquire().await.done(Outcome::Overloaded);
        assert_eq!(pressure.limit(), 8);
        // 1/limit per answer: 8 answers bring 8 to 8.95, the ninth past 9.
        for _ in 0..8 {
            pressure
                .acquire()
                .await
                .done(Outcome::Answered(Duration::from_millis(10)));
        }
        assert_eq!(pressure.limit(), 8);
        pressure
            .acquire()
            .await
            .done(Outcome::Answered(Duration::from_millis(10)));
        assert_eq!(pressure.limit(), 9, "one more per round trip of answers");
        assert_eq!(pressure.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_lowered_limit_holds_back_slots_still_held() {
        let pressure = Pressure::new(4, 1000);
        let held: Vec<Slot<'_>> = vec![
            pressure.acquire().await,
            pressure.acquire().await,
            pressure.acquire().await,
        ];
        assert_eq!(pressure.in_flight(), 3);
        pressure.acquire().await.done(Outcome::Overloaded);
        assert_eq!(pressure.limit(), 2);
        drop(held);
        // Two slots now: a third waits.
        let a = pressure.acquire().await;
        let b = pressure.acquire().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), pressure.acquire())
                .await
                .is_err(),
            "a third slot was granted above the limit"
        );
        drop((a, b));
    }

    #[tokio::test]
    async fn rising_latency_lowers_the_limit() {
        let pressure = Pressure::new(10, 1000);
        for _ in 0..5 {
            pressure
                .acquire()
                .await
                .done(Outcome::Answered(Duration::from_millis(100)));
        }
        assert_eq!(pressure.limit(), 10);
        for _ in 0..10 {
            pressure
                .acquire()
                .await
                .done(Outcome::Answered(Duration::from_millis(1_000)));
        }
        assert!(pressure.limit() < 10, "limit {}", pressure.limit());
    }

    #[tokio::test]
    async fn a_foreground_call_goes_before_the_background_queue() {
        let pressure = std::sync::Arc::new(Pressure::new(1, 1000));
        let held = pressure.acquire_as(None).await;
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // A later window's first page, an earlier window's next page, a steady-state call.
        for (name, background) in [
            ("backfill-later", Some(7)),
            ("backfill-earlier", Some(3)),
            ("leads", None),
        ] {
            let (shared, order) = (pressure.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = shared.acquire_as(background).await;
                order.lock().unwrap().push(name);
                drop(slot);
            }));
            // Each is queued before the next is spawned.
            while {
                let state = pressure.lock();
                state.foreground.len() + state.background.len()
            } < tasks.len()
            {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["leads", "backfill-earlier", "backfill-later"]
        );
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_its_slot_back() {
        let pressure = Pressure::new(1, 1000);
        let held = pressure.acquire().await;
        let waiting = tokio::time::timeout(Duration::from_millis(20), pressure.acquire()).await;
        assert!(waiting.is_err());
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(1), pressure.acquire()).await;
        assert!(again.is_ok(), "the slot was lost");
        assert_eq!(pressure.lock().held, 1);
    }

    #[tokio::test]
    async fn slots_are_granted_at_the_rate_without_a_burst() {
        let pressure = Pressure::new(64, 50);
        let started = Instant::now();
        for _ in 0..11 {
            pressure.acquire().await.done(Outcome::Neutral);
        }
        // Ten spacings of 20 ms after the first.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
    }

    #[tokio::test]
    async fn nothing_is_granted_during_a_pause_and_the_rate_resumes_at_its_end() {
        let pressure = Pressure::new(8, 10);
        pressure.acquire().await.done(Outcome::Overloaded);
        let started = Instant::now();
        pressure.pause(Duration::from_millis(300));
        assert!(pressure.paused_until().is_some());
        pressure.acquire().await.done(Outcome::Neutral);
        let first = started.elapsed();
        assert!(
            first >= Duration::from_millis(300),
            "granted during the pause: {first:?}"
        );
        // The next one a spacing (100 ms) later: no burst of the calls that waited.
        pressure.acquire().await.done(Outcome::Neutral);
        let second = started.elapsed();
        assert!(
            second >= first + Duration::from_millis(95),
            "{first:?} {second:?}"
        );
        assert_eq!(pressure.paused_until(), None);
    }

    #[test]
    fn the_spacing_is_rounded_up() {
        // 1 s / 3 truncated would put four grants within one second.
        assert!(Pressure::new(1, 3).spacing * 3 >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn jitter_of_milliseconds_is_no_pressure() {
        let pressure = Pressure::new(10, 1000);
        for ms in [1, 9, 1, 12, 2, 15, 1, 20] {
            pressure
                .acquire()
                .await
                .done(Outcome::Answered(Duration::from_millis(ms)));
        }
        assert_eq!(pressure.limit(), 10);
    }
}
