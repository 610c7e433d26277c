//! How much provider work an invocation keeps in flight.
//!
//! The driver sends the requests of the next batches while it writes earlier ones, so the
//! provider's latency is paid once per window, not once per batch. [`Window`] counts what is in
//! flight and decides whether one more batch may go out; the bounds are the platform's:
//!
//! - Connections: a Workers invocation has at most six connections waiting for response headers
//!   at once; a seventh waits in a queue until one of them gets its headers
//!   (<https://developers.cloudflare.com/workers/platform/limits/#simultaneous-open-connections>).
//!   The database socket is one of them, so at most [`MAX_REQUESTS_IN_FLIGHT`] (five) provider
//!   requests are in flight. A batch takes up to two (one per model), so two full batches fly at
//!   once, a third waits until the first has its answers.
//! - Memory: an isolate has 128 MB. A batch holds at most
//!   [`crate::batch::MAX_VECTOR_BYTES_PER_BATCH`] (8 MiB) of vectors, and holds them about four
//!   times at its peak (the body, the decoded floats, the bound parameters, the request buffer)
//!   while it is decoded and written, one batch at a time. Batches in flight or answered and
//!   waiting for their write hold their vectors once (the decoded floats) plus, while a body
//!   arrives, its text. [`MAX_VECTOR_BYTES_IN_FLIGHT`] (24 MiB, three full batches of the two
//!   OpenAI models, 455 values each at about 18 KB) keeps the sum near 24 MiB + the one batch's
//!   extra copies (about 30 MB), some 55 MB with the wasm heap's slack, well inside 128 MB.
//!
//! A batch is always allowed when nothing is in flight, whatever it holds, so the window never
//! stops the work: it only decides how much overlaps. When the concurrency is below a batch's
//! requests (one, with both models), the driver sends its models one after the other.
//!
//! Within those bounds, [`Control`] adapts to the provider, on a clock it is given (pure, so it
//! is tested with a fake one): it starts at the configured concurrency (`rate.maxConcurrency`,
//! default and at most [`MAX_REQUESTS_IN_FLIGHT`]), halves it on a 429 and starts nothing
//! before the `Retry-After` has passed (additive increase, multiplicative decrease: it grows
//! back by one request per window of successful answers), paces new batches from the
//! `x-ratelimit-*` headers of the answers (OpenAI's buckets refill continuously at their
//! per-minute limit, so a batch waits only until what it lacks has refilled; the reset, when
//! the bucket is full again, is the longest wait; a queue consumer, one of several reading the
//! same buckets, waits for its share of them, [`Control::sharing`]), and keeps to the
//! configured `requestsPerMinute` and `tokensPerMinute`, for a key shared with other services.

use crate::config::Rate;
use crate::provider::RateLimit;
use std::time::Duration;

/// Simultaneous connections of a Workers invocation waiting for response headers.
pub const MAX_CONNECTIONS: usize = 6;

/// Provider requests in flight at most: the connections, less the database socket.
pub const MAX_REQUESTS_IN_FLIGHT: usize = MAX_CONNECTIONS - 1;

/// Decoded vector bytes of the batches launched and not yet written, at most: three full
/// batches (see the module's documentation).
pub const MAX_VECTOR_BYTES_IN_FLIGHT: usize = 3 * crate::batch::MAX_VECTOR_BYTES_PER_BATCH;

/// What one batch takes of the window while it is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Provider requests it sends at once: one per model it asks (0, 1 or 2). Its retries and
    /// split halves go out one after another, in the same slots.
    pub requests: usize,
    /// Bytes of the vectors it asks for (4 per dimension).
    pub vector_bytes: usize,
    /// 1 when it counts as a batch of the invocation's budget (it needs the provider), else 0.
    pub batches: u64,
    /// A conservative estimate of the tokens it pays, over both models.
    pub tokens: u64,
}

/// The batches launched and not yet written: their requests until they are answered, the rest
/// until they are written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    requests: usize,
    vector_bytes: usize,
    batches: u64,
    tokens: u64,
    len: usize,
}

impl Window {
    /// Whether a batch of `load` may go out now with at most `max_requests` requests in flight
    /// (capped by [`MAX_REQUESTS_IN_FLIGHT`]) and the memory bound: always when the window is
    /// empty.
    pub fn admits(&self, load: &Load, max_requests: usize) -> bool {
        self.len == 0
            || (self.requests + load.requests <= max_requests.clamp(1, MAX_REQUESTS_IN_FLIGHT)
                && self.vector_bytes + load.vector_bytes <= MAX_VECTOR_BYTES_IN_FLIGHT)
    }

    /// A batch of `load` went out.
    pub fn launch(&mut self, load: &Load) {
        self.requests += load.requests;
        self.vector_bytes += load.vector_bytes;
        self.batches += load.batches;
        self.tokens += load.tokens;
        self.len += 1;
    }

    /// A batch of `load` has every answer: its connections are free.
    pub fn answered(&mut self, load: &Load) {
        self.requests -= load.requests;
    }

    /// A batch of `load` is written (or dropped): it holds nothing more.
    pub fn written(&mut self, load: &Load) {
        self.vector_bytes -= load.vector_bytes;
        self.batches -= load.batches;
        self.tokens -= load.tokens;
        self.len -= 1;
    }

    /// No batch is launched and unwritten.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batches launched and unwritten that count against the invocation's batch budget.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The estimated tokens of the batches launched and unwritten.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Provider requests of the batches launched and not yet answered.
    pub fn requests(&self) -> usize {
        self.requests
    }
}

/// How long a cut of the concurrency holds off the next one: the 429s of requests that were
/// already in flight when the first came back are one signal, not several.
const CUT_HOLD: Duration = Duration::from_secs(1);

/// A per-minute ceiling as a token bucket that may go into debt: a launch goes when the level is
/// not negative and takes what it needs, so one large request is never blocked for good, and
/// over time the rate stays within the ceiling (plus one second's burst).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    /// Refill per millisecond.
    per_ms: f64,
    /// The most it holds: one second's worth.
    capacity: f64,
    level: f64,
    at_ms: f64,
}

impl Bucket {
    fn per_minute(amount: u64, now_ms: f64) -> Bucket {
        let per_ms = amount as f64 / 60_000.0;
        let capacity = (per_ms * 1000.0).max(1.0);
        Bucket { per_ms, capacity, level: capacity, at_ms: now_ms }
    }

    fn refill(&mut self, now_ms: f64) {
        if now_ms > self.at_ms {
            self.level = (self.level + (now_ms - self.at_ms) * self.per_ms).min(self.capacity);
            self.at_ms = now_ms;
        }
    }

    /// Milliseconds until the level is not negative.
    fn wait_ms(&self, now_ms: f64) -> f64 {
        let level = (self.level + (now_ms - self.at_ms).max(0.0) * self.per_ms).min(self.capacity);
        if level >= 0.0 {
            0.0
        } else {
            -level / self.per_ms
        }
    }

    fn take(&mut self, now_ms: f64, amount: u64) {
        self.refill(now_ms);
        self.level -= amount as f64;
    }
}

/// One of the provider's buckets as its last answer described it: `left` at `at_ms` (less what
/// went out since), refilling at `per_ms` (its per-minute limit; `None` when the provider did
/// not send it), full again at `full_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Level {
    left: f64,
    at_ms: f64,
    per_ms: Option<f64>,
    full_ms: f64,
}

impl Level {
    fn new(left: u64, limit: Option<u64>, reset: Option<Duration>, now_ms: f64) -> Level {
        // Without a reset time, the state is taken to hold for a second.
        let reset_ms = reset.unwrap_or(Duration::from_secs(1)).as_secs_f64() * 1000.0;
        let per_ms = limit.filter(|&l| l > 0).map(|l| l as f64 / 60_000.0);
        Level { left: left as f64, at_ms: now_ms, per_ms, full_ms: now_ms + reset_ms }
    }

    /// When `need` fits: as soon as the missing amount has refilled, at the latest when the
    /// bucket is full again (the whole reset only when the refill rate is unknown); `now_ms`
    /// when it fits now.
    fn fits_at(&self, now_ms: f64, need: f64) -> f64 {
        if now_ms >= self.full_ms {
            return now_ms;
        }
        let elapsed = (now_ms - self.at_ms).max(0.0);
        let level = self.left + self.per_ms.map_or(0.0, |r| elapsed * r);
        if level >= need {
            return now_ms;
        }
        match self.per_ms {
            Some(r) => (now_ms + (need - level) / r).min(self.full_ms),
            None => self.full_ms,
        }
    }
}

/// What the provider's last answer said was left.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Remaining {
    requests: Option<Level>,
    tokens: Option<Level>,
}

/// The adaptive rate of an invocation's provider requests (see the module's documentation).
/// Times are epoch milliseconds from the runtime's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    ceiling: f64,
    limit: f64,
    not_before_ms: f64,
    last_cut_ms: Option<f64>,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    remaining: Remaining,
    /// How many invocations pace from the same provider buckets at once ([`Control::sharing`]).
    sharers: f64,
}

impl Control {
    /// A control for the configured `rate`, at `now_ms`: at its ceiling.
    pub fn new(rate: &Rate, now_ms: f64) -> Control {
        let ceiling = rate.max_concurrency.map_or(MAX_REQUESTS_IN_FLIGHT, |c| usize::from(c.get())).min(MAX_REQUESTS_IN_FLIGHT) as f64;
        Control {
            ceiling,
            limit: ceiling,
            not_before_ms: f64::NEG_INFINITY,
            last_cut_ms: None,
            requests: rate.requests_per_minute.map(|n| Bucket::per_minute(n.get(), now_ms)),
            tokens: rate.tokens_per_minute.map(|n| Bucket::per_minute(n.get(), now_ms)),
            remaining: Remaining { requests: None, tokens: None },
            sharers: 1.0,
        }
    }

    /// This control paces one of `n` invocations that draw on the same provider buckets at
    /// once (queue consumers): each sees the same `x-ratelimit-remaining-*` and would take all
    /// of it, so a batch waits until the bucket holds `n` times what it needs, and the `n`
    /// together take what is there.
    pub fn sharing(mut self, n: u32) -> Control {
        self.sharers = f64::from(n.max(1));
        self
    }

    /// Provider requests that may be in flight now (at least 1).
    pub fn concurrency(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// How long to wait before a batch of `requests` requests and about `tokens` tokens goes
    /// out: until a `Retry-After` has passed, the per-minute ceilings have room, and the
    /// provider's buckets (as its headers said, refilling at their per-minute limits) have room.
    /// `None`: at once.
    pub fn delay(&self, now_ms: f64, requests: usize, tokens: u64) -> Option<Duration> {
        let mut until = self.not_before_ms;
        for bucket in [&self.requests, &self.tokens].into_iter().flatten() {
            until = until.max(now_ms + bucket.wait_ms(now_ms));
        }
        if let Some(level) = &self.remaining.requests {
            until = until.max(level.fits_at(now_ms, requests as f64 * self.sharers));
        }
        if let Some(level) = &self.remaining.tokens {
            until = until.max(level.fits_at(now_ms, tokens as f64 * self.sharers));
        }
        (until > now_ms).then(|| Duration::from_secs_f64((until - now_ms) / 1000.0))
    }

    /// `requests` requests of about `tokens` tokens went out.
    pub fn sent(&mut self, now_ms: f64, requests: usize, tokens: u64) {
        if let Some(b) = &mut self.requests {
            b.take(now_ms, requests as u64);
        }
        if let Some(b) = &mut self.tokens {
            b.take(now_ms, tokens);
        }
        if let Some(level) = &mut self.remaining.requests {
            level.left -= requests as f64;
        }
        if let Some(level) = &mut self.remaining.tokens {
            level.left -= tokens as f64;
        }
    }

    /// An answer came back: the concurrency grows by one request per window of answers (up to
    /// the ceiling), and its rate-limit headers, if any, say what is left until when.
    pub fn answered(&mut self, now_ms: f64, headers: Option<&RateLimit>) {
        self.limit = (self.limit + 1.0 / self.limit).min(self.ceiling);
        if let Some(h) = headers {
            if let Some(n) = h.remaining_requests {
                self.remaining.requests = Some(Level::new(n, h.limit_requests, h.reset_requests, now_ms));
            }
            if let Some(n) = h.remaining_tokens {
                self.remaining.tokens = Some(Level::new(n, h.limit_tokens, h.reset_tokens, now_ms));
            }
        }
    }

    /// The provider answered 429: the concurrency halves (once for a burst of them), and
    /// nothing new starts before `retry_after` has passed.
    pub fn throttled(&mut self, now_ms: f64, retry_after: Option<Duration>) {
        let hold = retry_after.unwrap_or(Duration::ZERO).max(CUT_HOLD).as_secs_f64() * 1000.0;
        if self.last_cut_ms.is_none_or(|at| now_ms - at >= hold) {
            self.limit = (self.limit / 2.0).max(1.0);
            self.last_cut_ms = Some(now_ms);
        }
        if let Some(wait) = retry_after {
            self.not_before_ms = self.not_before_ms.max(now_ms + wait.as_secs_f64() * 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::max_values_per_batch;
    use std::num::{NonZeroU64, NonZeroU8};

    /// A full batch of the two OpenAI models (3072 + 1536 dimensions).
    fn full() -> Load {
        let values = max_values_per_batch(2048, 3072, 1536);
        Load { requests: 2, vector_bytes: values * (3072 + 1536) * 4, batches: 1, tokens: 1000 }
    }

    #[test]
    fn two_full_batches_fly_at_once_within_five_connections_and_the_memory_bound() {
        let mut w = Window::default();
        let b = full();
        assert!(w.admits(&b, 99));
        w.launch(&b);
        assert!(w.admits(&b, 99));
        w.launch(&b);
        // Five connections: a third batch of two requests waits, one of a single request goes.
        assert!(!w.admits(&b, 99));
        assert!(w.admits(&Load { requests: 1, ..b }, 99));
        // Answered, the first frees its connections but holds its vectors until written.
        w.answered(&b);
        assert!(w.admits(&b, 99));
        w.launch(&b);
        w.answered(&b);
        w.answered(&b);
        // Three full batches hold 24 MiB: a fourth waits for a write.
        assert_eq!(w.vector_bytes, 3 * 455 * 18_432);
        assert!(w.vector_bytes <= MAX_VECTOR_BYTES_IN_FLIGHT);
        assert!(!w.admits(&b, 99));
        w.written(&b);
        assert!(w.admits(&b, 99));
        assert_eq!((w.batches(), w.tokens()), (2, 2000));
    }

    #[test]
    fn the_concurrency_asked_for_bounds_requests_and_an_empty_window_admits_anything() {
        let mut w = Window::default();
        let one = Load { requests: 1, vector_bytes: 10, batches: 1, tokens: 1 };
        let huge = Load { requests: 2, vector_bytes: usize::MAX / 2, batches: 1, tokens: 1 };
        assert!(w.admits(&huge, 1));
        w.launch(&one);
        assert!(!w.admits(&one, 1));
        assert!(w.admits(&one, 2));
        // Zero is read as one: the work never stops.
        assert!(!w.admits(&one, 0));
        w.answered(&one);
        w.written(&one);
        assert!(w.is_empty());
        assert!(w.admits(&huge, 0));
    }

    fn rate(concurrency: Option<u8>, rpm: Option<u64>, tpm: Option<u64>) -> Rate {
        Rate {
            max_concurrency: concurrency.and_then(NonZeroU8::new),
            requests_per_minute: rpm.and_then(NonZeroU64::new),
            tokens_per_minute: tpm.and_then(NonZeroU64::new),
        }
    }

    fn ms(d: Option<Duration>) -> Option<u128> {
        d.map(|d| d.as_millis())
    }

    #[test]
    fn a_429_halves_the_concurrency_once_per_burst_and_holds_new_work_until_retry_after() {
        let mut c = Control::new(&rate(Some(4), None, None), 0.0);
        assert_eq!(c.concurrency(), 4);
        assert_eq!(c.delay(0.0, 2, 100), None);
        c.throttled(1000.0, Some(Duration::from_secs(3)));
        assert_eq!(c.concurrency(), 2);
        assert_eq!(ms(c.delay(1000.0, 2, 100)), Some(3000));
        assert_eq!(ms(c.delay(2500.0, 2, 100)), Some(1500));
        // The other requests in flight come back 429 too: one signal, one cut.
        c.throttled(1200.0, Some(Duration::from_secs(3)));
        assert_eq!(c.concurrency(), 2);
        // Past the hold, a new 429 cuts again, never below one request.
        c.throttled(4500.0, None);
        assert_eq!(c.concurrency(), 1);
        c.throttled(6000.0, None);
        assert_eq!(c.concurrency(), 1);
        assert_eq!(c.delay(6000.0, 2, 100), None, "no Retry-After past: no wait");
    }

    #[test]
    fn successes_grow_the_concurrency_back_to_the_ceiling_and_no_further() {
        let mut c = Control::new(&rate(None, None, None), 0.0);
        assert_eq!(c.concurrency(), MAX_REQUESTS_IN_FLIGHT);
        c.throttled(0.0, None);
        assert_eq!(c.concurrency(), 2);
        let mut answers = 0;
        while c.concurrency() < MAX_REQUESTS_IN_FLIGHT {
            c.answered(10.0, None);
            answers += 1;
        }
        // About one more request per window of answers: 2.5 -> 5 takes 2 + 3 + 4 answers or so.
        assert!((7..=10).contains(&answers), "{answers} answers");
        for _ in 0..100 {
            c.answered(10.0, None);
        }
        assert_eq!(c.concurrency(), MAX_REQUESTS_IN_FLIGHT);
        // A ceiling above the connections is the connections.
        assert_eq!(Control::new(&rate(Some(9), None, None), 0.0).concurrency(), MAX_REQUESTS_IN_FLIGHT);
    }

    #[test]
    fn without_the_limits_the_providers_headers_pace_new_batches_until_the_buckets_are_full() {
        let mut c = Control::new(&rate(None, None, None), 0.0);
        let headers = RateLimit {
            limit_requests: None,
            limit_tokens: None,
            remaining_requests: Some(3),
            remaining_tokens: Some(10_000),
            reset_requests: Some(Duration::from_millis(800)),
            reset_tokens: Some(Duration::from_secs(6)),
        };
        c.answered(1000.0, Some(&headers));
        assert_eq!(c.delay(1000.0, 2, 5000), None, "room for both");
        c.sent(1000.0, 2, 5000);
        // One request left: a batch of two waits for the request window's reset.
        assert_eq!(ms(c.delay(1100.0, 2, 10)), Some(700));
        assert_eq!(c.delay(1100.0, 1, 10), None);
        // 5,000 tokens left: a batch of 6,000 waits for the token window's reset.
        assert_eq!(ms(c.delay(1100.0, 1, 6000)), Some(5900));
        // Once reset, what the headers said no longer holds.
        assert_eq!(c.delay(7000.0, 2, 6000), None);
        // A new answer says what is left now.
        c.answered(7000.0, Some(&RateLimit { remaining_requests: Some(0), reset_requests: None, ..headers }));
        assert_eq!(ms(c.delay(7000.0, 1, 1)), Some(1000), "no reset given: a second");
    }

    #[test]
    fn consumers_sharing_the_providers_buckets_each_wait_for_their_share() {
        let headers = RateLimit {
            limit_requests: Some(3000),
            limit_tokens: Some(1_000_000),
            remaining_requests: Some(3000),
            remaining_tokens: Some(20_000),
            reset_requests: Some(Duration::ZERO),
            reset_tokens: Some(Duration::from_secs(59)),
        };
        let mut alone = Control::new(&rate(None, None, None), 0.0);
        alone.answered(0.0, Some(&headers));
        assert_eq!(alone.delay(0.0, 2, 10_000), None, "20,000 tokens left: room for 10,000");
        // One of four consumers that all saw the same 20,000 tokens: a batch of 10,000 waits
        // until the bucket holds 40,000, 20,000 more at 1,000 tokens per 60 ms.
        let mut one_of_four = Control::new(&rate(None, None, None), 0.0).sharing(4);
        one_of_four.answered(0.0, Some(&headers));
        assert_eq!(ms(one_of_four.delay(0.0, 2, 10_000)), Some(1200));
        assert_eq!(one_of_four.delay(0.0, 2, 5_000), None, "a quarter of it fits now");
    }

    #[test]
    fn the_providers_buckets_pace_new_batches_by_their_refill_rate() {
        // OpenAI at 3,000 requests and 1,000,000 tokens a minute: a request comes back every
        // 20 ms, 1,000 tokens every 60 ms; the resets say when the buckets are full again.
        let mut c = Control::new(&rate(None, None, None), 0.0);
        let headers = RateLimit {
            limit_requests: Some(3000),
            limit_tokens: Some(1_000_000),
            remaining_requests: Some(1),
            remaining_tokens: Some(10_000),
            reset_requests: Some(Duration::from_millis(59_980)),
            reset_tokens: Some(Duration::from_millis(59_400)),
        };
        c.answered(1000.0, Some(&headers));
        assert_eq!(c.delay(1000.0, 1, 10_000), None, "room for one request and its tokens");
        // A batch of two requests waits for one to refill: 20 ms, not the 60 s until full.
        assert_eq!(ms(c.delay(1000.0, 2, 100)), Some(20));
        assert_eq!(c.delay(1020.0, 2, 100), None);
        // 16,000 tokens: 6,000 missing refill in 360 ms.
        assert_eq!(ms(c.delay(1000.0, 1, 16_000)), Some(360));
        // What went out since the answer is missing too, and what refilled since is there.
        c.sent(1100.0, 1, 10_000);
        // At 1,100 ms: 1 + 5 refilled - 1 sent = 5 requests, 10,000 + 1,667 - 10,000 tokens.
        assert_eq!(c.delay(1100.0, 5, 1000), None);
        assert_eq!(ms(c.delay(1100.0, 6, 1000)), Some(20));
        assert_eq!(ms(c.delay(1100.0, 1, 3000)), Some(80));
        // Never past the time the bucket is full: a batch larger than the bucket waits that long.
        assert_eq!(ms(c.delay(1100.0, 1, 2_000_000)), Some(59_300));
        // Once full, what the headers said no longer holds.
        assert_eq!(c.delay(61_000.0, 2, 2_000_000), None);
    }

    #[test]
    fn requests_and_tokens_per_minute_are_kept_on_average() {
        // 60 requests a minute: one a second, a second's burst.
        let mut c = Control::new(&rate(None, Some(60), None), 0.0);
        let mut now = 0.0;
        let mut sent = 0;
        while now < 60_000.0 {
            match c.delay(now, 1, 0) {
                None => {
                    c.sent(now, 1, 0);
                    sent += 1;
                }
                Some(d) => now += d.as_secs_f64() * 1000.0,
            }
        }
        assert!((60..=61).contains(&sent), "{sent} requests in a minute");
        // 60,000 tokens a minute, and a request of 5,000: it goes (into debt), then the next
        // waits until the debt is paid.
        let mut c = Control::new(&rate(None, None, Some(60_000)), 0.0);
        assert_eq!(c.delay(0.0, 2, 5000), None);
        c.sent(0.0, 2, 5000);
        assert_eq!(ms(c.delay(0.0, 2, 5000)), Some(4000));
        assert_eq!(c.delay(4000.0, 2, 5000), None);
    }
}
