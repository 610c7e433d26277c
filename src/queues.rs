//! Fan-out over Cloudflare Queues: sending a run's ranges (the producer binding `SYNC_QUEUE`) and
//! consuming them (the `queue` handler). What a range is, who may work on it and when a run is
//! ready to finish is decided by `embsync_core::fanout`; this module only moves messages.
//!
//! The handler dispatches by queue name: a queue whose name ends in `-dlq` is the dead-letter
//! queue (its messages mark their range dead), any other is a ranges queue. The messages of one
//! batch are consumed side by side, each with its own connection and holder id.

use embsync_core::config::Config;
use embsync_core::fanout::{self, Consume, Consumed, FanOut, RangeMessage};
use embsync_core::log::LogEvent;
use embsync_core::report::Trigger;
use embsync_core::sync::{BudgetError, RetryPolicy, Runtime};
use worker::{Env, MessageBatch, MessageExt, Queue, RawMessage};

use crate::{budget, connect, new_id, openai, run_sync, settings, AppError, WorkerRuntime};

/// The producer binding of the ranges queue. Without it there is no fan-out.
pub(crate) const BINDING: &str = "SYNC_QUEUE";

/// At most this many messages go in one `sendBatch` call (the Queues limit).
const SEND_BATCH_MAX: usize = 100;

/// The producer binding, if the worker has one.
pub(crate) fn producer(env: &Env) -> Option<Queue> {
    env.queue(BINDING).ok()
}

/// The fan-out settings (`SYNC_FANOUT_MIN_VALUES`, `SYNC_FANOUT_RANGE_VALUES`,
/// `SYNC_QUEUE_CONSUMERS`), checked by the core, also against the config's `rate` ceilings.
pub(crate) fn settings(env: &Env, config: &Config) -> Result<FanOut, BudgetError> {
    let fanout = FanOut::from_settings(|name| settings::string(env, name))?;
    fanout.check(&config.rate)?;
    Ok(fanout)
}

/// Sends `messages`, at most [`SEND_BATCH_MAX`] per call. A message that is not sent is not lost:
/// the sweeper of a later invocation sends its range again.
pub(crate) async fn send(queue: &Queue, messages: &[RangeMessage]) -> Result<(), AppError> {
    for chunk in messages.chunks(SEND_BATCH_MAX) {
        queue.send_batch(chunk.to_vec()).await.map_err(|e| AppError::Queue(e.to_string()))?;
    }
    Ok(())
}

/// The body of a raw message as a range message: the JSON the producer sent.
fn parse(message: &RawMessage) -> Result<RangeMessage, String> {
    let body = message.body();
    let text = match body.as_string() {
        Some(text) => text,
        None => js_sys::JSON::stringify(&body).map(String::from).map_err(|_| "a body that is not JSON".to_string())?,
    };
    serde_json::from_str(&text).map_err(|e| format!("{e} in {text:.200}"))
}

/// The `queue` handler: every message of `batch`, side by side; each is acked or retried on its
/// own. A body that is not a range message is logged and acked (it would fail every time).
pub(crate) async fn handle(batch: MessageBatch<serde_json::Value>, env: &Env) {
    let queue = batch.queue();
    let dead = queue.ends_with("-dlq");
    let messages: Vec<RawMessage> = batch.raw_iter().collect();
    let work = messages.iter().map(|message| async {
        let msg = match parse(message) {
            Ok(msg) => msg,
            Err(e) => {
                WorkerRuntime.log(
                    LogEvent::error("queue", format!("Dropping a message of queue {queue} that is not a range message: {e}"))
                        .field("queue", &queue)
                        .field("messageId", message.id()),
                );
                message.ack();
                return;
            }
        };
        if dead {
            dead_letter(env, &queue, message, &msg).await
        } else {
            consume(env, &queue, message, &msg).await
        }
    });
    futures::future::join_all(work).await;
}

/// A message of the dead-letter queue: its range is marked dead (`/status` shows it), then acked.
async fn dead_letter(env: &Env, queue: &str, message: &RawMessage, msg: &RangeMessage) {
    let rt = WorkerRuntime;
    let reason =
        format!("the queue gave up on it after max_retries failed attempts (message {} in the dead-letter queue {queue})", message.id());
    let result = async {
        let config = settings::config(env)?;
        let mut conn = connect(&settings::database(env)?, &config).await?;
        let result = fanout::dead_letter(&mut conn.store, msg, &reason).await;
        conn.close().await;
        Ok::<_, AppError>(result?)
    }
    .await;
    match result {
        Ok(()) => {
            rt.log(
                LogEvent::error("dead", format!("Range {} of run {} is dead: {reason}", msg.range, msg.run))
                    .run(&msg.run)
                    .field("range", msg.range),
            );
            message.ack();
        }
        Err(e) => {
            rt.log(LogEvent::error("queue", format!("Could not mark range {} of run {} dead ({e}); retrying", msg.range, msg.run)));
            message.retry();
        }
    }
}

/// A message of the ranges queue: the core consumes the range, then the message is acked,
/// enqueued again (the budget ran out: the range goes on in another invocation) or retried (an
/// error: after `max_retries` it goes to the dead-letter queue).
async fn consume(env: &Env, queue: &str, message: &RawMessage, msg: &RangeMessage) {
    let rt = WorkerRuntime;
    let result = async {
        let config = settings::config(env)?;
        let inv_budget = budget(env)?;
        let fanout = settings(env, &config)?;
        let db = settings::database(env)?;
        let endpoint = settings::endpoint(env, &config.models)?;
        let embedder = openai::OpenAi::new(endpoint, settings::api_key(env)?);
        let holder = new_id("range");
        rt.log(
            LogEvent::info(
                "consume",
                format!("Consuming range {} of run {} (message {}, holder {holder})", msg.range, msg.run, message.id()),
            )
            .run(&msg.run)
            .field("range", msg.range)
            .field("holder", &holder),
        );
        let inv = Consume { holder: &holder, budget: inv_budget, retry: RetryPolicy::default(), fanout };
        let mut conn = connect(&db, &config).await?;
        let result = fanout::consume(&config, &mut conn.store, &embedder, &rt, &inv, msg).await;
        // Two consumers that settle the last ranges at once may both be told the run is ready.
        // Only one that still finds the run open starts the chain: the other's would find it
        // finished and start a new run. (Both may still start it: the second then finds the
        // lease held, `Busy`.)
        let open = match &result {
            Ok(Consumed::Done { run_ready: true }) => match conn.store.current_run().await {
                Ok(current) => current.is_some_and(|r| r.run_id == msg.run),
                Err(_) => true,
            },
            _ => false,
        };
        conn.close().await;
        Ok::<_, AppError>((result?, open))
    }
    .await;
    let what = format!("range {} of run {}", msg.range, msg.run);
    let (result, open) = match result {
        Ok((consumed, open)) => (Ok(consumed), open),
        Err(e) => (Err(e), false),
    };
    let outcome = match &result {
        Ok(Consumed::Done { .. }) => "done",
        Ok(Consumed::Continue(_)) => "continue",
        Ok(Consumed::Skipped(_)) => "skipped",
        Err(_) => "failed",
    };
    rt.log(
        LogEvent::info("consumed", format!("Consumed {what}: {outcome}")).run(&msg.run).field("range", msg.range).field("outcome", outcome),
    );
    match result {
        Ok(Consumed::Continue(next)) => match producer(env) {
            Some(q) => match send(&q, std::slice::from_ref(&next)).await {
                Ok(()) => message.ack(),
                Err(e) => {
                    rt.log(LogEvent::warn("queue", format!("Could not enqueue the rest of {what} ({e}); retrying the message")));
                    message.retry();
                }
            },
            None => {
                rt.log(LogEvent::warn("queue", format!("The rest of {what} waits for the sweeper: the {BINDING} binding is missing")));
                message.ack();
            }
        },
        Ok(Consumed::Done { run_ready }) => {
            message.ack();
            if run_ready && !open {
                rt.log(LogEvent::info("queue", format!("Run {} is over already: another consumer finished it", msg.run)).run(&msg.run));
            } else if run_ready {
                // The last range: the ordinary chain removes stale values and finishes the run.
                rt.log(LogEvent::info("queue", format!("The last range of run {} is done; finishing the run", msg.run)).run(&msg.run));
                if let Err(e) = run_sync(env, Trigger::Cron).await {
                    rt.log(LogEvent::warn("queue", format!("Run {} is left for the next trigger to finish: {e}", msg.run)));
                }
            }
        }
        Ok(Consumed::Skipped(why)) => {
            rt.log(LogEvent::info("queue", format!("Skipped {what}: {why}")).run(&msg.run).field("range", msg.range));
            message.ack();
        }
        Err(e) => {
            rt.log(
                LogEvent::warn("queue", format!("Consuming {what} failed ({e}); the queue {queue} retries it"))
                    .run(&msg.run)
                    .field("range", msg.range),
            );
            message.retry();
        }
    }
}
