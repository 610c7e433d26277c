//! Change capture ([`sql::capture`](embsync_core::sql)): installing and dropping the triggers,
//! folding the change log, reconciling by scan.

use super::*;
use embsync_core::config::Changes;
use embsync_core::ident::TableName;
use embsync_core::report::CaptureInfo;
use embsync_core::sync::{CaptureStep, Drift};

/// The state [`sql::CAPTURE_STATE`] reads.
struct Captured {
    id: i32,
    never_reconciled: bool,
    reason: Option<String>,
    settled_tags: Option<String>,
    total: u64,
    age_secs: Option<f64>,
    triggers: i64,
    always: i64,
    disabled: i64,
    body: Option<String>,
    logged: bool,
    truncated: bool,
    log_lost: bool,
}

fn ddl_error(what: &str, table: &str, e: tokio_postgres::Error) -> StoreError {
    if lock_timed_out(&e) {
        StoreError::new(format!(
            "could not get a lock on {table} within 5 s to {what}; something holds it (a long transaction, a pg_dump?): the next run tries again"
        ))
    } else if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        StoreError::new(pg_message(
            &format!("{what} on {table}: embsync's role needs the TRIGGER privilege on the table (GRANT TRIGGER ON {table} TO <role>), or set \"changes\": \"scan\""),
            e,
        ))
    } else {
        err(&format!("{what} on {table}"), e)
    }
}

impl PgStore {
    async fn captured(&mut self, source: &Source) -> Result<Option<Captured>, StoreError> {
        let row = query(&self.client, &Bound::new(&sql::CaptureState { source }))
            .await
            .map_err(|e| err("reading the capture's state", e))?
            .into_iter()
            .next();
        Ok(row.map(|r| Captured {
            id: r.get(0),
            never_reconciled: r.get(1),
            reason: r.get(2),
            settled_tags: r.get(3),
            total: r.get::<_, i64>(4).max(0) as u64,
            age_secs: r.get(5),
            triggers: r.get(6),
            always: r.get(7),
            disabled: r.get(8),
            body: r.get(9),
            logged: r.get(10),
            truncated: r.get(11),
            log_lost: r.get(12),
        }))
    }

    /// Registers the source and installs its triggers, in one fenced transaction (its lock
    /// timeout bounds the wait for the table).
    async fn install(&mut self, source: &Source, why: &str) -> Result<(), StoreError> {
        let table = source.table.to_string();
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "installing the change capture").await?;
        let id: i32 = query_one(&tx, &Bound::new(&sql::RegisterCapture { source, why }))
            .await
            .map_err(|e| err("registering the change capture", e))?
            .get(0);
        tx.batch_execute(&sql::install_capture(source, id)).await.map_err(|e| ddl_error("install the capture triggers", &table, e))?;
        tx.commit().await.map_err(|e| err("committing the capture triggers", e))
    }

    async fn force(&mut self, id: i32, why: &str) -> Result<(), StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "forcing a reconcile").await?;
        execute(&tx, &Bound::new(&sql::ForceReconcile { capture_id: id, why })).await.map_err(|e| err("forcing a reconcile", e))?;
        tx.commit().await.map_err(|e| err("committing", e))
    }

    async fn reconcile(&mut self, source: &Source, why: String, drift_known: bool) -> Result<CaptureStep, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "reconciling the change capture").await?;
        tx.batch_execute(sql::PLAN_WORK_MEM).await.map_err(|e| err("setting work_mem", e))?;
        let row = query_one(&tx, &Bound::new(&sql::Reconcile { source, drift_known }))
            .await
            .map_err(|e| err("reconciling the change capture", e))?;
        tx.commit().await.map_err(|e| err("committing the reconcile", e))?;
        let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        self.written += n(0);
        let drift = drift_known.then(|| Drift { new: n(1), stale: n(2) });
        Ok(CaptureStep::Reconciled { why, drift })
    }

    /// Whether the change log lost its sentinel (see [`sql::LOG_LOST`]); when it did, the
    /// sentinel is back and every capture is forced to reconcile, once `tx` commits.
    async fn log_lost(tx: &tokio_postgres::Transaction<'_>) -> Result<bool, StoreError> {
        Ok(query_one(tx, &Bound::new(&sql::LogLost)).await.map_err(|e| err("checking the change log", e))?.get(0))
    }

    /// Folds the log; `None` when the fold found what forces a reconcile (a TRUNCATE mark, a
    /// count below zero, the log lost), which it then records.
    async fn fold(&mut self, source: &Source) -> Result<Result<u64, (String, bool)>, StoreError> {
        let tx = fenced(&mut self.client, self.fence.as_ref(), None, "reading the change log").await?;
        // In the fold's own transaction: a log emptied since the capture's state was read (a
        // failover between the two) is not taken for a log with nothing in it.
        if Self::log_lost(&tx).await? {
            tx.commit().await.map_err(|e| err("committing the change log's sentinel", e))?;
            return Ok(Err((sql::LOG_LOST_REASON.to_owned(), false)));
        }
        let row = query_one(&tx, &Bound::new(&sql::FoldChanges { source })).await.map_err(|e| err("reading the change log", e))?;
        let consumed = row.get::<_, i64>(0).max(0) as u64;
        let (truncates, negative, gone): (i64, i64, Vec<String>) = (row.get(1), row.get(2), row.get(3));
        if !gone.is_empty() {
            let hashes = gone.iter().map(String::as_str).collect();
            execute(&tx, &Bound::new(&sql::DropGoneValues { source, hashes })).await.map_err(|e| err("dropping values that left", e))?;
        }
        tx.commit().await.map_err(|e| err("committing the change log", e))?;
        self.written += consumed;
        Ok(if truncates > 0 {
            Err(("the table was truncated".to_owned(), false))
        } else if negative > 0 {
            Err((
                format!(
                    "{negative} values were deleted more often than the capture saw them written: changes were made without the triggers"
                ),
                true,
            ))
        } else {
            Ok(consumed)
        })
    }

    pub(crate) async fn capture_step(&mut self, source: &Source) -> Result<CaptureStep, StoreError> {
        let Changes::Capture { reconcile_every_secs } = source.changes else {
            return Err(StoreError::new(format!("source {} is not captured", source.name)));
        };
        let table = source.table.to_string();
        let Some(mut state) = self.captured(source).await? else {
            self.install(source, "the capture was installed").await?;
            return self.reconcile(source, "the capture was installed".to_owned(), false).await;
        };
        if state.log_lost {
            // The log was lost since the last run (no sentinel): every capture reconciles.
            let tx = fenced(&mut self.client, self.fence.as_ref(), None, "checking the change log").await?;
            Self::log_lost(&tx).await?;
            tx.commit().await.map_err(|e| err("committing the change log's sentinel", e))?;
            state.reason = state.reason.or_else(|| Some(sql::LOG_LOST_REASON.to_owned()));
        }
        // What may have been missed forces a reconcile; whether the log's record of the changes
        // is whole decides whether the drift means anything.
        let forced: Option<(String, bool)> = if state.triggers < 4 {
            self.install(source, "the capture's triggers were dropped").await?;
            Some(("its triggers were dropped (reinstalled)".to_owned(), false))
        } else if state.disabled > 0 {
            // Disabled on purpose (a bulk load?): left so, and the source is scanned every run
            // until they are enabled again.
            Some((format!("{} of its triggers are disabled (ALTER TABLE {table} ENABLE ALWAYS TRIGGER ...)", state.disabled), true))
        } else if state.always < 4 {
            let tx = fenced(&mut self.client, self.fence.as_ref(), None, "enabling the capture triggers").await?;
            tx.batch_execute(&sql::enable_capture(source, state.id))
                .await
                .map_err(|e| ddl_error("enable the capture triggers", &table, e))?;
            tx.commit().await.map_err(|e| err("committing the capture triggers", e))?;
            Some(("its triggers were disabled and enabled again (now enabled always)".to_owned(), true))
        } else if state.body.as_deref() != Some(sql::capture_function_body(source, state.id).as_str()) {
            // Installed by another version of embsync: its log rows may mean something else, and
            // its triggers may be of another shape (the update trigger was statement-level with
            // transition tables before it was a row trigger with a WHEN): all are replaced.
            let tx = fenced(&mut self.client, self.fence.as_ref(), None, "replacing the capture function").await?;
            tx.batch_execute(&sql::install_capture(source, state.id))
                .await
                .map_err(|e| ddl_error("replace the capture function and triggers", &table, e))?;
            tx.commit().await.map_err(|e| err("committing the capture function", e))?;
            Some(("its trigger function was replaced by this version of embsync".to_owned(), false))
        } else if let Some(reason) = state.reason.clone() {
            Some((reason.clone(), !state.never_reconciled && reason.contains("without the triggers")))
        } else if state.never_reconciled {
            Some(("it was never reconciled".to_owned(), false))
        } else if state.truncated {
            Some(("the table was truncated".to_owned(), false))
        } else if state.age_secs.is_none_or(|age| age >= reconcile_every_secs as f64) {
            Some((format!("the scheduled reconcile (every {})", embsync_core::config::duration_text(reconcile_every_secs)), true))
        } else {
            None
        };
        if let Some((why, known)) = forced {
            return self.reconcile(source, why, known).await;
        }
        if !state.logged && state.settled_tags.as_deref() == Some(sql::settled_tags(&self.tags).as_str()) {
            return Ok(CaptureStep::Unchanged { total: state.total });
        }
        match self.fold(source).await? {
            Ok(changes) => Ok(CaptureStep::Folded { changes }),
            Err((why, known)) => {
                self.force(state.id, &why).await?;
                self.reconcile(source, why, known).await
            }
        }
    }

    pub(crate) async fn has_capture_tables(&mut self) -> Result<bool, StoreError> {
        Ok(self.client.query_typed_one(sql::HAS_CAPTURE_TABLES, &[]).await.map_err(|e| err("checking the capture tables", e))?.get(0))
    }

    pub(crate) async fn info(&mut self, source: &Source) -> Result<CaptureInfo, StoreError> {
        let reconcile_every = match source.changes {
            Changes::Capture { reconcile_every_secs } => embsync_core::config::duration_text(reconcile_every_secs),
            Changes::Scan => String::new(),
        };
        let mut info = CaptureInfo { reconcile_every, triggers: "not installed".to_owned(), ..CaptureInfo::default() };
        if !self.has_capture_tables().await? {
            return Ok(info);
        }
        let row = query(&self.client, &Bound::new(&sql::CaptureInfo { source }))
            .await
            .map_err(|e| err("reading the change capture", e))?
            .into_iter()
            .next();
        if let Some(r) = row {
            let (present, disabled): (i64, i64) = (r.get(0), r.get(2));
            info.triggers = match (present, disabled) {
                (4, d) if d > 0 => "disabled",
                (4, _) => "enabled",
                _ => "incomplete",
            }
            .to_owned();
            info.last_reconcile = r.get::<_, Option<f64>>(3).map(iso8601);
            info.backlog = r.get::<_, i64>(4).max(0) as u64;
            if let (Some(new), Some(stale)) = (r.get::<_, Option<i64>>(5), r.get::<_, Option<i64>>(6)) {
                info.last_drift = Some(Drift { new: new.max(0) as u64, stale: stale.max(0) as u64 });
            }
        }
        Ok(info)
    }

    pub(crate) async fn release(&mut self, captured: &[&Source]) -> Result<Vec<String>, StoreError> {
        let rows = self.client.query_typed(sql::CAPTURES, &[]).await.map_err(|e| err("reading the captures", e))?;
        let keep = |t: &str, c: &str| captured.iter().any(|s| s.table_key() == t && s.column_key() == c);
        let mut released = Vec::new();
        for row in rows {
            let (id, t, c): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
            if keep(&t, &c) {
                continue;
            }
            let table = TableName::parse(&t).ok();
            let tx = fenced(&mut self.client, self.fence.as_ref(), None, "dropping the change capture").await?;
            let exists = match &table {
                Some(name) => query_one(&tx, &Bound::new(&sql::TableExists { table: name }))
                    .await
                    .map_err(|e| err("looking up the table", e))?
                    .get::<_, bool>(0),
                None => false,
            };
            let drop = sql::drop_capture(table.as_ref().filter(|_| exists), id);
            tx.batch_execute(&drop).await.map_err(|e| ddl_error("drop the capture triggers", &t, e))?;
            execute(&tx, &Bound::new(&sql::ForgetCapture { capture_id: id })).await.map_err(|e| err("forgetting the capture", e))?;
            tx.commit().await.map_err(|e| err("committing", e))?;
            released.push(format!("{t}.{c}"));
        }
        Ok(released)
    }
}
