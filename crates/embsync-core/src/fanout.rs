//! Fan-out over a queue: a large source's pending snapshot is split into hash ranges
//! (`embedding_sync_ranges`) that queue consumers embed at the same time.
//!
//! The invocation that holds the sync lease plans: once a source's snapshot holds at least
//! [`FanOut::min_values`] values it is split into ranges of [`FanOut::range_values`]
//! ([`Store::plan_ranges`]), and the invocation ends with [`Outcome::FannedOut`] and a
//! [`RangeMessage`] per range for the worker to send. A consumer ([`consume`]) claims its range
//! in Postgres ([`Store::claim_range`]): from then on every write of its store is fenced by the
//! claim instead of the lease, and its pending pages stop at the range's upper bound; it embeds
//! and writes exactly as the driver does (same batches, same counters in the same
//! transaction), and ends the claim: done, handed on (budget spent: the worker sends the
//! message again), or given up. Later lease holders wait while a source has queued ranges and
//! re-send those whose message was lost (the sweeper, [`Store::sweep_ranges`]); once none is
//! queued the source goes on as without fan-out (a pass from the start, then stale removal).
//!
//! [`Outcome::FannedOut`]: crate::sync::Outcome::FannedOut

use crate::config::{Config, Rate};
use crate::hash::ValueHash;
use crate::log::LogEvent;
use crate::report::SourceReport;
use crate::sync::{Budget, RetryPolicy};
use crate::sync::{
    BudgetError, Calls, Embedder, InvocationSpend, Mode, Pause, RunId, Runtime, SourceEnd, SourceRun, SourceState, Stop, Store, StoreError,
    SyncError,
};
use std::num::{NonZeroU64, NonZeroU8};

/// The body of one queue message (JSON): a range of a run's pending snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeMessage {
    /// The run.
    pub run: String,
    /// The range's id (`embedding_sync_ranges.id`).
    pub range: i64,
}

/// Fan-out settings, from the worker's env (without a queue binding there is no fan-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    /// A source whose snapshot holds fewer pending values is synced in-line
    /// (`SYNC_FANOUT_MIN_VALUES`, default 5000).
    pub min_values: u64,
    /// Values per range (`SYNC_FANOUT_RANGE_VALUES`, default 2000).
    pub range_values: u64,
    /// Consumers at the same time (`SYNC_QUEUE_CONSUMERS`, default 4; must equal the consumer's
    /// `max_concurrency`): each takes 1/`consumers` of the config's rate ceilings.
    pub consumers: u32,
}

impl Default for FanOut {
    fn default() -> Self {
        FanOut { min_values: 5000, range_values: 2000, consumers: 4 }
    }
}

/// How long the sweeper leaves a range's message alone after it was sent (or its range
/// claimed) before it sends another: a message is delivered in seconds, retried with backoff
/// in minutes.
pub const RESEND_AFTER_SECS: u64 = 300;

impl FanOut {
    /// Reads `SYNC_FANOUT_MIN_VALUES`, `SYNC_FANOUT_RANGE_VALUES` and `SYNC_QUEUE_CONSUMERS` as
    /// `setting` reads them (`None` or blank: the default).
    ///
    /// # Errors
    /// [`BudgetError::NotPositive`] naming a setting that is not a positive whole number.
    pub fn from_settings(setting: impl Fn(&str) -> Option<String>) -> Result<FanOut, BudgetError> {
        let d = FanOut::default();
        let whole = |name: &'static str, default: u64| -> Result<u64, BudgetError> {
            match setting(name).as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| BudgetError::NotPositive { name, value: v.to_owned() }),
            }
        };
        let consumers = whole("SYNC_QUEUE_CONSUMERS", u64::from(d.consumers))?;
        Ok(FanOut {
            min_values: whole("SYNC_FANOUT_MIN_VALUES", d.min_values)?,
            range_values: whole("SYNC_FANOUT_RANGE_VALUES", d.range_values)?,
            consumers: u32::try_from(consumers).unwrap_or(u32::MAX),
        })
    }

    /// Checks that all consumers together can stay within the config's `rate.maxConcurrency`:
    /// a consumer keeps at least one request in flight, so there may be no more consumers than
    /// it allows.
    ///
    /// # Errors
    /// [`BudgetError::ConsumersOverConcurrency`], which says what to change.
    pub fn check(&self, rate: &Rate) -> Result<(), BudgetError> {
        match rate.max_concurrency {
            Some(c) if u64::from(self.consumers) > u64::from(c.get()) => {
                Err(BudgetError::ConsumersOverConcurrency { consumers: self.consumers, max_concurrency: c.get() })
            }
            _ => Ok(()),
        }
    }

    /// One consumer's share of the config's rate ceilings: requests and tokens per minute, and
    /// requests in flight when the config sets them, divided by [`FanOut::consumers`] (at
    /// least 1 each), so that all consumers together stay within them (for requests in
    /// flight, once [`FanOut::check`] holds: a consumer whose share is one request sends a
    /// batch's models one after the other).
    pub fn share(&self, rate: &Rate) -> Rate {
        let n = u64::from(self.consumers.max(1));
        Rate {
            max_concurrency: rate.max_concurrency.map(|c| NonZeroU8::new((u64::from(c.get()) / n).max(1) as u8).unwrap_or(NonZeroU8::MIN)),
            requests_per_minute: rate.requests_per_minute.map(|r| NonZeroU64::new((r.get() / n).max(1)).unwrap_or(NonZeroU64::MIN)),
            tokens_per_minute: rate.tokens_per_minute.map(|t| NonZeroU64::new((t.get() / n).max(1)).unwrap_or(NonZeroU64::MIN)),
        }
    }
}

/// A run's ranges of one source, by state ([`Store::range_tally`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeTally {
    /// The source's table key.
    pub table: String,
    /// The source's column key.
    pub column: String,
    /// Ranges not settled yet (a consumer may hold one).
    pub queued: u64,
    /// Ranges a consumer finished.
    pub done: u64,
    /// Ranges given up, with their errors (`range <id>: <error>`).
    pub dead: Vec<String>,
}

/// What [`Store::claim_range`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeClaim {
    /// This consumer holds the range now: the store's writes are fenced by the claim and its
    /// pending pages end at the range's upper bound.
    Claimed(ClaimedRange),
    /// Nothing to do, and why (done already, held by a live consumer, run over, unknown).
    Skipped(String),
}

/// A claimed range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRange {
    /// The source's table key.
    pub table: String,
    /// The source's column key.
    pub column: String,
    /// Where to go on: everything up to it was written or recorded (`None`: from the start).
    pub next: Option<ValueHash>,
    /// The run's provider tokens so far, both models (for its token budget).
    pub run_tokens: u64,
}

/// How a consumer ends its claim ([`Store::end_claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEnd {
    /// Every value of the range was written or recorded.
    Done,
    /// Left queued for the next message (the budget is spent, or an error to retry), with the
    /// error to record.
    HandOn(Option<String>),
    /// Given up (the run's token budget, both models refused), with why.
    Dead(String),
}

/// What a queue consumer is asked to do.
#[derive(Debug, Clone)]
pub struct Consume<'a> {
    /// This consumer's claim holder id.
    pub holder: &'a str,
    /// What it may spend (its lease time is the claim's).
    pub budget: Budget,
    /// How provider calls are retried.
    pub retry: RetryPolicy,
    /// The fan-out settings (the consumer's share of the rate ceilings).
    pub fanout: FanOut,
}

/// What a consumer did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumed {
    /// The range is settled: done, or given up for the run's token budget or both models
    /// refused (the run's report says so). `run_ready`: no range of the run is queued any more;
    /// the worker should run the ordinary sync chain ([`crate::sync::invoke`]) at once, which
    /// finishes the sources (a pass from the start, stale removal) and the run.
    Done {
        /// No range of the run is queued any more.
        run_ready: bool,
    },
    /// The budget ran out: the worker enqueues this message again (its progress is in Postgres).
    Continue(RangeMessage),
    /// Nothing to do, ack it: range settled already, claimed by a live consumer, run over or
    /// unknown, claim lost to another consumer.
    Skipped(String),
}

/// What a queue consumer does with one message: claims the range (nothing to do: `Skipped`),
/// embeds and writes its pending values within the budget, fenced by the claim, and ends the
/// claim.
///
/// # Errors
/// The worker retries the message (and after the queue's `max_retries` it reaches the
/// dead-letter queue, see [`dead_letter`]): [`SyncError::Schema`] when the database fails,
/// [`SyncError::Provider`] when the provider refuses every request (a wrong key),
/// [`SyncError::Unavailable`] when it stayed unavailable through every retry. The range keeps
/// its progress.
pub async fn consume<S: Store, E: Embedder, R: Runtime>(
    config: &Config,
    store: &mut S,
    embedder: &E,
    rt: &R,
    inv: &Consume<'_>,
    msg: &RangeMessage,
) -> Result<Consumed, SyncError> {
    let began = rt.now_ms();
    store.ensure_schema(config).await.map_err(SyncError::Schema)?;
    let run = RunId(msg.run.clone());
    let claimed = match store.claim_range(&run, msg.range, inv.holder, inv.budget.lease_ttl).await.map_err(SyncError::Schema)? {
        RangeClaim::Claimed(c) => c,
        RangeClaim::Skipped(why) => {
            rt.log(LogEvent::info("range", format!("Range {} skipped: {why}", msg.range)).run(&run.0).field("range", msg.range));
            return Ok(Consumed::Skipped(why));
        }
    };
    let Some(source) = config.enabled_sources().find(|s| s.table_key() == claimed.table && s.column_key() == claimed.column) else {
        // The config changed: the next lease holder abandons the run.
        let why = format!("source {}.{} is not in the config any more", claimed.table, claimed.column);
        let _ = store.end_claim(RangeEnd::HandOn(Some(why.clone()))).await;
        return Ok(Consumed::Skipped(why));
    };
    rt.log(
        LogEvent::info("range", format!("Range {} of {}: claimed", msg.range, source.name))
            .run(&run.0)
            .field("range", msg.range)
            .field("source", &source.name),
    );
    let rate = inv.fanout.share(&config.rate);
    let spent = InvocationSpend::new(began, inv.budget, &rate);
    // The provider's buckets are shared with the other consumers: pace for a share of them.
    spent.share_provider(inv.fanout.consumers);
    let mut state = SourceState {
        report: SourceReport { name: source.name.clone(), ..SourceReport::default() },
        planned: true,
        planned_batches: 0,
        done: false,
        usage: Default::default(),
    };
    let calls = Calls { config, embedder, rt, retry: inv.retry, run: &run, spent: &spent };
    // The run's token budget: this consumer may spend its share of what is left at its claim
    // (consumers at the same time each see the same run total), so it starts as if the others
    // had spent theirs already; a consumer that spends its share hands the range on, and the
    // next claim divides what is left then.
    let others = config.max_tokens_per_run.map_or(0, |max| {
        let left = max.saturating_sub(claimed.run_tokens);
        left - left.div_ceil(u64::from(inv.fanout.consumers.max(1)))
    });
    let mut ctx = SourceRun {
        config,
        store: &mut *store,
        calls,
        rt,
        state: &mut state,
        run: &run,
        spent: &spent,
        run_tokens: claimed.run_tokens + others,
        mode: Mode::Range,
        fanout: None,
    };
    let outcome = ctx.sync(source, claimed.next).await;
    // What the run has spent, as far as this consumer knows: at its claim, plus its own.
    let run_tokens = ctx.run_tokens - others;
    let event = |what: &str| {
        LogEvent::info(
            "range",
            format!("Range {} of {}: {what} ({} embedded, {} errors)", msg.range, source.name, state.report.embedded, state.report.errors),
        )
        .run(&run.0)
        .field("range", msg.range)
    };
    let lost = |e: StoreError| {
        let why = format!("the claim on range {} was lost (another consumer took it over, or it expired): {e}", msg.range);
        rt.log(LogEvent::warn("range", why.clone()).run(&run.0).field("range", msg.range));
        Consumed::Skipped(why)
    };
    // How the claim ends, and what the consumer answers then.
    enum Then {
        Settled(&'static str),
        Continue(&'static str),
        Unavailable(String),
    }
    let (end, then) = match outcome {
        Ok(SourceEnd::Done) => (RangeEnd::Done, Then::Settled("done")),
        Ok(SourceEnd::TokenBudget) if !config.token_budget_spent(run_tokens) => {
            (RangeEnd::HandOn(None), Then::Continue("its share of the run's token budget is spent; the message is sent again"))
        }
        Ok(SourceEnd::TokenBudget) => (
            RangeEnd::Dead("the run's token budget is spent (maxTokensPerRun); the next run goes on with its values".into()),
            Then::Settled("given up: the run's token budget is spent"),
        ),
        Ok(SourceEnd::Refused) => (
            RangeEnd::Dead("the provider refused both models' requests; the run ends stopped".into()),
            Then::Settled("given up: both models refused"),
        ),
        Ok(SourceEnd::Paused(_)) | Ok(SourceEnd::FannedOut) => match spent.pause.borrow().as_ref() {
            Some(Pause::Outage(why)) => (RangeEnd::HandOn(Some(why.clone())), Then::Unavailable(why.clone())),
            _ => (RangeEnd::HandOn(None), Then::Continue("budget spent; the message is sent again")),
        },
        Err(Stop::LeaseLost(e)) => return Ok(lost(e)),
        Err(Stop::Store(e)) => {
            let _ = store.end_claim(RangeEnd::HandOn(Some(e.to_string()))).await;
            return Err(SyncError::Schema(e));
        }
        Err(Stop::Fatal(e)) => {
            let _ = store.end_claim(RangeEnd::HandOn(Some(e.to_string()))).await;
            return Err(SyncError::Provider(e));
        }
    };
    // The claim may have been lost since the last write: then whoever holds the range now (or
    // the sweeper's next message) ends it.
    let run_ready = match store.end_claim(end).await {
        Ok(ready) => ready,
        Err(e) if e.is_lease_lost() => return Ok(lost(e)),
        Err(e) => return Err(SyncError::Schema(e)),
    };
    match then {
        Then::Settled(what) => {
            rt.log(event(what));
            Ok(Consumed::Done { run_ready })
        }
        Then::Continue(what) => {
            rt.log(event(what));
            Ok(Consumed::Continue(msg.clone()))
        }
        Then::Unavailable(why) => {
            rt.log(event(&format!("the provider is unavailable ({why}); the message is retried")));
            Err(SyncError::Unavailable(why))
        }
    }
}

/// A message that reached the dead-letter queue: its range is marked dead with `reason`
/// (unless it is done, or a consumer holds it unexpired). `/status` shows it; once no range of
/// its source is queued, the next lease holder's pass from the start tries its values once more
/// in-line and the source's report names the dead ranges.
///
/// # Errors
/// [`StoreError`] when the database fails (the worker retries the message).
pub async fn dead_letter<S: Store>(store: &mut S, msg: &RangeMessage, reason: &str) -> Result<(), StoreError> {
    store.dead_letter(&RunId(msg.run.clone()), msg.range, reason).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_and_are_checked() {
        let none = FanOut::from_settings(|_| None).unwrap();
        assert_eq!(none, FanOut { min_values: 5000, range_values: 2000, consumers: 4 });
        let set = FanOut::from_settings(|n| match n {
            "SYNC_FANOUT_MIN_VALUES" => Some("10".into()),
            "SYNC_FANOUT_RANGE_VALUES" => Some(" 3 ".into()),
            "SYNC_QUEUE_CONSUMERS" => Some("".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(set, FanOut { min_values: 10, range_values: 3, consumers: 4 });
        let bad = FanOut::from_settings(|n| (n == "SYNC_QUEUE_CONSUMERS").then(|| "0".into())).unwrap_err();
        assert!(bad.to_string().contains("SYNC_QUEUE_CONSUMERS"), "{bad}");
    }

    #[test]
    fn each_consumer_takes_its_share_of_the_ceilings() {
        let rate = Rate {
            max_concurrency: NonZeroU8::new(5),
            requests_per_minute: NonZeroU64::new(3000),
            tokens_per_minute: NonZeroU64::new(1_000_001),
        };
        let f = FanOut { consumers: 4, ..FanOut::default() };
        let share = f.share(&rate);
        assert_eq!(share.max_concurrency, NonZeroU8::new(1));
        assert_eq!(share.requests_per_minute, NonZeroU64::new(750));
        assert_eq!(share.tokens_per_minute, NonZeroU64::new(250_000));
        assert_eq!(f.share(&Rate::default()), Rate::default());
        assert_eq!(f.check(&rate), Ok(()));
        let many = FanOut { consumers: 10_000, ..f }.share(&rate);
        assert_eq!(many.requests_per_minute, NonZeroU64::new(1));
    }

    #[test]
    fn more_consumers_than_the_concurrency_ceiling_are_refused() {
        let rate = Rate { max_concurrency: NonZeroU8::new(2), ..Rate::default() };
        let e = FanOut { consumers: 3, ..FanOut::default() }.check(&rate).unwrap_err();
        assert_eq!(e, BudgetError::ConsumersOverConcurrency { consumers: 3, max_concurrency: 2 });
        let text = e.to_string();
        assert!(text.contains("SYNC_QUEUE_CONSUMERS is 3") && text.contains("at most 2"), "{text}");
        assert_eq!(FanOut { consumers: 2, ..FanOut::default() }.check(&rate), Ok(()));
        assert_eq!(FanOut { consumers: 50, ..FanOut::default() }.check(&Rate::default()), Ok(()), "no ceiling, no limit");
    }

    #[test]
    fn a_message_is_json() {
        let m = RangeMessage { run: "r1".into(), range: 7 };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(text, r#"{"run":"r1","range":7}"#);
        assert_eq!(serde_json::from_str::<RangeMessage>(&text).unwrap(), m);
    }
}
