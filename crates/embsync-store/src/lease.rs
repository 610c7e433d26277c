//! The sync lease, or a fan-out range's claim, as a fencing token: the limits and the fence of
//! every transaction that writes.

use super::*;

/// A lease this store took: who, which generation, for how long. Every write checks that the
/// lease row still holds exactly this holder and generation, unexpired ([`sql::FENCE`]).
#[derive(Debug, Clone)]
pub(crate) struct LeaseToken {
    pub(crate) holder: String,
    pub(crate) generation: i64,
    pub(crate) ttl: Duration,
}

impl LeaseToken {
    /// The limits of each fenced transaction (see [`sql::WRITE_LIMITS`]).
    ///
    /// - `statement_timeout`, a third of the lease: a statement still running when its
    ///   invocation was killed holds the lease row (locked by the fence) no longer than that, and
    ///   one that stalls is cut off long before the lease it renewed expires.
    /// - `idle_in_transaction_session_timeout`, the same: a client that stalls or dies inside a
    ///   transaction is disconnected by the server, so the lease row is free again before the
    ///   lease expires, and a killed invocation blocks the next one no longer than the lease.
    /// - `lock_timeout`, 5 s (at most half the statement timeout): in steady state embsync waits
    ///   for no lock (the lease serialises its writers); a wait means another pipeline holds rows of
    ///   `embedding_cache`, or a DDL statement (queued behind a long reader such as pg_dump)
    ///   holds a table: the statement fails and the next run retries, rather than queueing
    ///   behind it and making every later reader queue behind embsync.
    pub(crate) fn limits(&self) -> sql::WriteLimits {
        let statement = (self.ttl / 3).max(Duration::from_millis(1));
        let lock = (statement / 2).min(Duration::from_secs(5));
        sql::WriteLimits { statement, lock, idle: statement }
    }
}

/// A fan-out range this store claimed ([`Store::claim_range`]): every write checks that the
/// range row still holds exactly this holder and generation, unexpired, queued, with its run
/// open ([`sql::FENCE_RANGE`]).
#[derive(Debug, Clone)]
pub(crate) struct ClaimToken {
    pub(crate) run: String,
    pub(crate) range: i64,
    pub(crate) holder: String,
    pub(crate) generation: i64,
    pub(crate) ttl: Duration,
    /// The range's inclusive upper bound: pending pages stop there.
    pub(crate) hi: ValueHash,
}

/// What fences this store's writes: the sync lease, or a range claim. One code path for every
/// write, whichever it is.
#[derive(Debug, Clone)]
pub(crate) enum Fence {
    Lease(LeaseToken),
    Range(ClaimToken),
}

impl Fence {
    /// The limits of a transaction fenced by it (see [`LeaseToken::limits`]; a claim's time to
    /// live plays the lease's).
    fn limits(&self) -> LeaseToken {
        match self {
            Fence::Lease(l) => l.clone(),
            Fence::Range(c) => LeaseToken { holder: c.holder.clone(), generation: c.generation, ttl: c.ttl },
        }
    }
}

/// Begins a transaction with `lease`'s limits ([`LeaseToken::limits`]), `SET LOCAL`.
pub(crate) async fn limited<'a>(client: &'a mut Client, lease: &LeaseToken) -> Result<Transaction<'a>, StoreError> {
    let tx = client.transaction().await.map_err(|e| err("starting a transaction", e))?;
    execute(&tx, &Bound::new(&lease.limits())).await.map_err(|e| err("setting the timeouts", e))?;
    Ok(tx)
}

/// Begins a transaction that writes for the invocation holding `lease`: its limits, then the
/// fence. When the lease is not this invocation's any more (taken over, expired or released),
/// the transaction is rolled back and the error is [`StoreError::lease_lost`]: nothing is written.
///
/// Fenced by a range claim, the same: the claim is renewed (and the range's progress moved to
/// `next`, when given and further), or the error is [`StoreError::lease_lost`] ("the claim").
pub(crate) async fn fenced<'a>(
    client: &'a mut Client,
    fence: Option<&Fence>,
    next: Option<&ValueHash>,
    what: &str,
) -> Result<Transaction<'a>, StoreError> {
    let Some(fence) = fence else {
        return Err(StoreError::lease_lost(format!("{what}: this invocation holds no sync lease; nothing was written")));
    };
    let limits = fence.limits();
    let tx = limited(client, &limits).await?;
    let held = match fence {
        Fence::Lease(lease) => {
            let fence = sql::Fence { holder: &lease.holder, generation: lease.generation, ttl: lease.ttl };
            execute(&tx, &Bound::new(&fence)).await.map_err(|e| err("checking the sync lease", e))?
        }
        Fence::Range(claim) => {
            let fence = sql::FenceRange { range: claim.range, holder: &claim.holder, generation: claim.generation, ttl: claim.ttl, next };
            execute(&tx, &Bound::new(&fence)).await.map_err(|e| err("checking the range's claim", e))?
        }
    };
    if held == 0 {
        tx.rollback().await.map_err(|e| err("rolling back", e))?;
        return Err(StoreError::lease_lost(match fence {
            Fence::Lease(_) => format!("{what}: the sync lease expired or was taken over by another invocation; nothing was written"),
            Fence::Range(c) => format!(
                "{what}: the claim on range {} expired, was taken over by another consumer, or its run is over; nothing was written",
                c.range
            ),
        }));
    }
    Ok(tx)
}
