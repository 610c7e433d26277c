//! A Hyperdrive binding instead of `DATABASE_URL`, and statements that need no session state.
//!
//! `wrangler dev` gives the worker a real Hyperdrive binding (workerd's, with its own socket and
//! its `*.hyperdrive.local` host) that it connects to the database named by
//! `CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_<binding>`; locally there is no pooling and no
//! query cache (Hyperdrive's docs say so). Hyperdrive's transaction pooling is stood in for by
//! PgBouncer in transaction mode ([`PgBouncer`]), which the binding can point at as well.

use embsync_e2e::*;
use std::collections::BTreeSet;

/// The password put into connection strings. The test Postgres trusts local connections, so it
/// is carried but not checked: it is there to be looked for in the logs.
const HD_PASSWORD: &str = "hd-Secret-5e1f07";
const URL_PASSWORD: &str = "url-Secret-c39a2d";

/// `url` with `postgres:<password>@` as its user part.
fn with_password(url: &str, password: &str) -> String {
    url.replacen("postgres://postgres@", &format!("postgres://postgres:{password}@"), 1)
}

/// The port of a `postgres://user@host:port/db` URL.
fn port_of(url: &str) -> u16 {
    let hostport = url.split('@').nth(1).and_then(|r| r.split('/').next()).expect("host:port in the URL");
    hostport.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("a port in the URL")
}

/// Four distinct values in `config_option` (five rows: one repeats with padding).
fn option_values(db: &mut TestDb) {
    db.create_default_sources();
    db.insert_strs(OPTION, &["Thermal transfer printing", "Peel-off sensor", " Peel-off sensor ", "Cutter", "RFID encoder"]);
}

/// The `database` events the worker logged.
///
/// The worker's log line can reach wrangler's log a moment after the response (under load, more
/// than a moment), so this waits up to 10 s for the first one.
fn database_events(worker: &Worker) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events = worker.events_of("database");
        if !events.is_empty() || std::time::Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A full sync and a re-sync, with exact counts, and a change in between: what every test here
/// runs through its connection.
fn sync_resync_and_change(db: &mut TestDb, provider: &Provider, worker: &Worker) {
    let plan = worker.dry_run();
    assert_counts("dry run", source_entry(&plan, OPTION.table), &[("total", 4), ("new", 4), ("toEmbed", 4)]);

    let report = worker.sync();
    assert_counts("first sync", source_entry(&report, OPTION.table), &[("total", 4), ("new", 4), ("embedded", 4), ("errors", 0)]);
    assert_eq!(db.cache_count(), 4);
    let sent: BTreeSet<String> = provider.inputs_for(LARGE_MODEL).into_iter().collect();
    let expected: BTreeSet<String> =
        ["Thermal transfer printing", "Peel-off sensor", "Cutter", "RFID encoder"].iter().map(|s| s.to_string()).collect();
    assert_eq!(sent, expected);
    assert_eq!(provider.inputs_for(SMALL_MODEL).len(), 4);

    provider.clear();
    let report = worker.sync();
    assert_counts(
        "re-sync",
        source_entry(&report, OPTION.table),
        &[("total", 4), ("new", 0), ("unchanged", 4), ("embedded", 0), ("stale", 0), ("deleted", 0)],
    );
    assert!(provider.embedding_requests().is_empty(), "a re-sync called the provider: {:?}", provider.embedding_requests());

    db.delete_exact(OPTION, &["Cutter"]);
    db.insert_strs(OPTION, &["Cutter with catch tray", "Linerless media"]);
    let report = worker.sync();
    assert_counts(
        "after a change",
        source_entry(&report, OPTION.table),
        &[("total", 5), ("new", 2), ("stale", 1), ("embedded", 2), ("deleted", 1), ("unchanged", 3)],
    );
    assert_eq!(db.cache_count(), 5);
    let status = worker.status();
    let coverage = source_entry(&status, OPTION.table);
    assert_counts("status", coverage, &[("distinctValues", 5), ("embeddedLarge", 5), ("embeddedSmall", 5), ("pending", 0)]);
}

#[test]
fn a_hyperdrive_binding_alone_syncs_and_resyncs() {
    let mut db = TestDb::create();
    option_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let opts = WorkerOpts::new(&db, &provider).no_database_url().hyperdrive("HYPERDRIVE", &with_password(&db.url, HD_PASSWORD));
    let worker = Worker::start(opts);
    sync_resync_and_change(&mut db, &provider, &worker);

    let events = database_events(&worker);
    assert!(!events.is_empty(), "no database event in the log:\n{}", worker.log_tail(40));
    for e in &events {
        assert_eq!(e["via"], "hyperdrive", "{e}");
        assert_eq!(e["binding"], "HYPERDRIVE", "{e}");
        assert_eq!(e["database"], db.name.as_str(), "{e}");
        assert_eq!(e["user"], "postgres", "{e}");
        assert_eq!(e["databaseUrlIgnored"], false, "{e}");
    }
    assert!(!worker.logs().contains(HD_PASSWORD), "the password is in the log");
}

#[test]
fn the_binding_wins_over_database_url_and_the_log_says_so() {
    let mut db = TestDb::create();
    option_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    // A DATABASE_URL that cannot work: nothing listens on its port.
    let dead = with_password(&db.url, URL_PASSWORD).replacen(&format!(":{}/", port_of(&db.url)), &format!(":{}/", free_port()), 1);
    assert_ne!(dead, with_password(&db.url, URL_PASSWORD));

    // Alone, it fails: the test's DATABASE_URL really is unusable.
    let mut alone = WorkerOpts::new(&db, &provider);
    alone.database_url = dead.clone();
    let alone = Worker::start(alone);
    let (status, body) = alone.get("/dry-run", Some(TOKEN));
    assert_eq!(status, 502, "{body}");
    drop(alone);

    let mut opts = WorkerOpts::new(&db, &provider).hyperdrive("HYPERDRIVE", &with_password(&db.url, HD_PASSWORD));
    opts.database_url = dead;
    let worker = Worker::start(opts);
    let report = worker.sync();
    assert_counts("sync", source_entry(&report, OPTION.table), &[("new", 4), ("embedded", 4), ("errors", 0)]);
    assert_eq!(db.cache_count(), 4);

    let events = database_events(&worker);
    assert!(!events.is_empty(), "no database event in the log:\n{}", worker.log_tail(40));
    for e in &events {
        assert_eq!(e["via"], "hyperdrive", "{e}");
        assert_eq!(e["databaseUrlIgnored"], true, "{e}");
        assert!(e["message"].as_str().unwrap_or_default().contains("DATABASE_URL is set too and is not used"), "{e}");
    }
    let logs = worker.logs();
    for secret in [HD_PASSWORD, URL_PASSWORD] {
        assert!(!logs.contains(secret), "the log contains {secret}");
    }
}

#[test]
fn hyperdrive_binding_names_another_binding_and_never_falls_back() {
    let mut db = TestDb::create();
    option_values(&mut db);
    let provider = Provider::start(Some(API_KEY));
    let hd_url = with_password(&db.url, HD_PASSWORD);

    // A binding under another name is not picked up by itself...
    let worker = Worker::start(WorkerOpts::new(&db, &provider).no_database_url().hyperdrive("EMBSYNC_DB", &hd_url));
    let (status, body) = worker.get("/dry-run", Some(TOKEN));
    assert_eq!(status, 500, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("no database configured: add a Hyperdrive binding named HYPERDRIVE"), "{body}");
    drop(worker);

    // ...but HYPERDRIVE_BINDING names it.
    let worker = Worker::start(
        WorkerOpts::new(&db, &provider).no_database_url().hyperdrive("EMBSYNC_DB", &hd_url).var("HYPERDRIVE_BINDING", "EMBSYNC_DB"),
    );
    let plan = worker.dry_run();
    assert_counts("dry run", source_entry(&plan, OPTION.table), &[("total", 4), ("new", 4)]);
    assert_eq!(database_events(&worker)[0]["binding"], "EMBSYNC_DB");
    drop(worker);

    // A name that is not there is an error, even with a working DATABASE_URL.
    let worker = Worker::start(WorkerOpts::new(&db, &provider).hyperdrive("EMBSYNC_DB", &hd_url).var("HYPERDRIVE_BINDING", "MISSING_DB"));
    let (status, body) = worker.get("/dry-run", Some(TOKEN));
    assert_eq!(status, 500, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("HYPERDRIVE_BINDING is \"MISSING_DB\""), "{body}");
    assert!(database_events(&worker).is_empty(), "it connected anyway");
}

/// The premise of the pooler tests: through [`PgBouncer`], a named prepared statement (what
/// tokio-postgres's `query(&str)` prepares) breaks, and an unnamed one with declared parameter
/// types (`query_typed`, what the worker sends) does not.
#[test]
fn pooler_breaks_named_prepared_statements_but_not_unnamed_ones() {
    let db = TestDb::create();
    let bouncer = PgBouncer::start(&env_var("EMBSYNC_TEST_PG_URL"));
    let url = bouncer.url(&db.name);
    bouncer.warm(&db.name, 3);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect through PgBouncer");

    let named_failures = (0..20)
        .filter_map(|i: i64| client.query("SELECT $1::int8 + 1", &[&i]).err())
        .map(|e| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()))
        .collect::<Vec<_>>();
    assert!(
        named_failures.iter().any(|e| e.contains("prepared statement") && e.contains("does not exist")),
        "named prepared statements all worked through PgBouncer, so it does not stand in for a transaction pooler: {named_failures:?}\n{}",
        bouncer.log()
    );

    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect through PgBouncer");
    for i in 0..20i64 {
        let row = client
            .query_typed_one("SELECT $1 + 1", &[(&i, postgres::types::Type::INT8)])
            .unwrap_or_else(|e| panic!("an unnamed statement failed through PgBouncer: {e}"));
        assert_eq!(row.get::<_, i64>(0), i + 1);
    }
}

/// The worker through a Hyperdrive binding whose database is PgBouncer in transaction mode: the
/// full sync, the re-sync, a change and the status all work, so no statement relies on session
/// state (no named prepared statement, no temp table, no session lock or setting).
#[test]
fn pooler_a_sync_through_hyperdrive_and_a_transaction_pooler() {
    let mut db = TestDb::create();
    option_values(&mut db);
    let bouncer = PgBouncer::start(&env_var("EMBSYNC_TEST_PG_URL"));
    // Several server connections from the start, so that statements spread over them.
    bouncer.warm(&db.name, 3);
    let provider = Provider::start(Some(API_KEY));
    let opts =
        WorkerOpts::new(&db, &provider).no_database_url().hyperdrive("HYPERDRIVE", &with_password(&bouncer.url(&db.name), HD_PASSWORD));
    let worker = Worker::start(opts);
    sync_resync_and_change(&mut db, &provider, &worker);
    assert!(database_events(&worker).iter().all(|e| e["via"] == "hyperdrive"));
}
