//! The sync lease as a fencing token: the limits and the fence of every transaction that writes.

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

/// Begins a transaction with `lease`'s limits ([`LeaseToken::limits`]), `SET LOCAL`.
pub(crate) async fn limited<'a>(client: &'a mut Client, lease: &LeaseToken) -> Result<Transaction<'a>, StoreError> {
    let tx = client.transaction().await.map_err(|e| err("starting a transaction", e))?;
    execute(&tx, &Bound::new(&lease.limits())).await.map_err(|e| err("setting the timeouts", e))?;
    Ok(tx)
}

/// Begins a transaction that writes for the invocation holding `lease`: its limits, then the
/// fence. When the lease is not this invocation's any more (taken over, expired or released),
/// the transaction is rolled back and the error is [`StoreError::lease_lost`]: nothing is written.
pub(crate) async fn fenced<'a>(client: &'a mut Client, lease: Option<&LeaseToken>, what: &str) -> Result<Transaction<'a>, StoreError> {
    let Some(lease) = lease else {
        return Err(StoreError::lease_lost(format!("{what}: this invocation holds no sync lease; nothing was written")));
    };
    let tx = limited(client, lease).await?;
    let fence = sql::Fence { holder: &lease.holder, generation: lease.generation, ttl: lease.ttl };
    let held = execute(&tx, &Bound::new(&fence)).await.map_err(|e| err("checking the sync lease", e))?;
    if held == 0 {
        tx.rollback().await.map_err(|e| err("rolling back", e))?;
        return Err(StoreError::lease_lost(format!(
            "{what}: the sync lease expired or was taken over by another invocation; nothing was written"
        )));
    }
    Ok(tx)
}
