//! Where the worker's Postgres connection comes from: a Hyperdrive binding or `DATABASE_URL`.
//!
//! A Hyperdrive binding (named `HYPERDRIVE`, or what `HYPERDRIVE_BINDING` says) wins over
//! `DATABASE_URL` when both are there: the binding is the deliberate production setup (pooled
//! connections near the database), while a `DATABASE_URL` left over from before, or set for local
//! runs, is easy to forget. The log says which one is used and that the other is ignored.
//!
//! The Worker's side of a Hyperdrive connection is plain TCP: the socket goes to Hyperdrive's
//! proxy inside the Workers runtime (workerd gives it no TLS to start, and the binding's own
//! `connectionString` ends in `?sslmode=disable`), and Hyperdrive itself speaks TLS to the origin
//! database, as its configuration says (`--sslmode require` by default). `DATABASE_URL`'s
//! `sslmode` is the worker's business only when it connects directly ([`crate::dburl`]).
//!
//! The credentials of a Hyperdrive binding are read from its `user`, `password` and `database`
//! fields rather than parsed from its `connectionString`: workerd writes that string without
//! percent-encoding, so a password with `@`, `/` or `#` in it would not parse as a URL.

use crate::dburl::Tls;
use crate::log::LogEvent;

/// The binding name used when `HYPERDRIVE_BINDING` is not set.
pub const DEFAULT_BINDING: &str = "HYPERDRIVE";

/// The variable that names another Hyperdrive binding (for instance a second configuration).
pub const BINDING_VAR: &str = "HYPERDRIVE_BINDING";

/// How the worker's socket to a Hyperdrive binding is secured: never with TLS (see the module
/// documentation); Hyperdrive does TLS to the origin.
pub const HYPERDRIVE_TLS: Tls = Tls::Off;

/// The name of a Hyperdrive binding: a JavaScript identifier, as wrangler's binding names are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingName(String);

impl BindingName {
    /// Checks a binding name: an ASCII letter, `_` or `$`, then letters, digits, `_` or `$`.
    ///
    /// # Errors
    /// [`DatabaseError::BindingName`] naming the variable it came from.
    pub fn parse(name: &str) -> Result<BindingName, DatabaseError> {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$');
        if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            Ok(BindingName(name.to_owned()))
        } else {
            Err(DatabaseError::BindingName(name.to_owned()))
        }
    }

    /// [`DEFAULT_BINDING`].
    pub fn default_name() -> BindingName {
        BindingName(DEFAULT_BINDING.to_owned())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the environment has under the binding's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingState {
    /// Nothing.
    Absent,
    /// A Hyperdrive binding.
    Hyperdrive,
    /// Something else (a variable, a KV namespace, ...); the text says what.
    Other(String),
}

/// What the worker found in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The binding name looked for.
    pub binding: BindingName,
    /// Whether `HYPERDRIVE_BINDING` named it (then it must exist).
    pub named: bool,
    /// What is under that name.
    pub state: BindingState,
    /// Whether `DATABASE_URL` is set (and not empty).
    pub database_url: bool,
}

/// The connection the worker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The Hyperdrive binding.
    Hyperdrive {
        /// Its name.
        binding: BindingName,
        /// `DATABASE_URL` is set as well, and not used.
        url_ignored: bool,
    },
    /// `DATABASE_URL`, directly.
    DatabaseUrl,
}

/// Why the worker has no database to connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseError {
    /// Neither a Hyperdrive binding nor `DATABASE_URL`.
    #[error(
        "no database configured: add a Hyperdrive binding named {DEFAULT_BINDING} ([[hyperdrive]] in wrangler.toml, \
         see the README), or set DATABASE_URL with `wrangler secret put DATABASE_URL` (a postgres:// URL)"
    )]
    NoDatabase,
    /// `HYPERDRIVE_BINDING` names a binding the worker does not have.
    #[error(
        "{BINDING_VAR} is {binding:?}, but the worker has no binding of that name: add [[hyperdrive]] with \
         binding = \"{binding}\" to wrangler.toml, or unset {BINDING_VAR}"
    )]
    BindingMissing {
        /// The name.
        binding: String,
    },
    /// The binding exists but is not a Hyperdrive binding.
    #[error(
        "the binding {binding:?} is not a Hyperdrive binding ({found}): declare it with [[hyperdrive]] in \
         wrangler.toml, or set {BINDING_VAR} to the name of the Hyperdrive binding"
    )]
    NotHyperdrive {
        /// The name.
        binding: String,
        /// What it is instead.
        found: String,
    },
    /// `HYPERDRIVE_BINDING` is not a binding name.
    #[error("{BINDING_VAR} is {0:?}, which is not a binding name: use letters, digits and _ (e.g. HYPERDRIVE)")]
    BindingName(String),
}

/// Decides which connection to use: the Hyperdrive binding when there is one, else
/// `DATABASE_URL`.
///
/// # Errors
/// [`DatabaseError`] when there is neither, when `HYPERDRIVE_BINDING` names a binding that does
/// not exist (an explicit choice never falls back to `DATABASE_URL`), or when the binding is not
/// a Hyperdrive binding.
pub fn choose(found: &Found) -> Result<Choice, DatabaseError> {
    match &found.state {
        BindingState::Hyperdrive => Ok(Choice::Hyperdrive { binding: found.binding.clone(), url_ignored: found.database_url }),
        BindingState::Other(what) => Err(DatabaseError::NotHyperdrive { binding: found.binding.0.clone(), found: what.clone() }),
        BindingState::Absent if found.named => Err(DatabaseError::BindingMissing { binding: found.binding.0.clone() }),
        BindingState::Absent if found.database_url => Ok(Choice::DatabaseUrl),
        BindingState::Absent => Err(DatabaseError::NoDatabase),
    }
}

/// The connection as it may be logged: who and where, never the password (this type cannot hold
/// one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Through a Hyperdrive binding.
    Hyperdrive {
        /// The binding's name.
        binding: String,
        /// The database user.
        user: String,
        /// The database name.
        database: String,
        /// `DATABASE_URL` is set too and is not used.
        database_url_ignored: bool,
    },
    /// Directly to `DATABASE_URL`.
    DatabaseUrl {
        /// The database user.
        user: String,
        /// The server's host name.
        host: String,
        /// Its port.
        port: u16,
        /// The database name.
        database: String,
        /// Whether the connection is TLS.
        tls: bool,
    },
}

impl Endpoint {
    /// How the worker's socket is secured: plain TCP to Hyperdrive ([`HYPERDRIVE_TLS`]); for
    /// `DATABASE_URL`, what its `sslmode` asked for.
    pub fn tls(&self) -> Tls {
        match self {
            Endpoint::Hyperdrive { .. } => HYPERDRIVE_TLS,
            Endpoint::DatabaseUrl { tls: true, .. } => Tls::Required,
            Endpoint::DatabaseUrl { tls: false, .. } => Tls::Off,
        }
    }

    /// The `database` log event: which connection this invocation uses (`via`: `hyperdrive` or
    /// `DATABASE_URL`, with who and where).
    pub fn log_event(&self) -> LogEvent {
        match self {
            Endpoint::Hyperdrive { binding, user, database, database_url_ignored } => {
                let ignored = if *database_url_ignored { "; DATABASE_URL is set too and is not used" } else { "" };
                LogEvent::info("database", format!("Database: Hyperdrive binding {binding} (user {user}, database {database}){ignored}"))
                    .field("via", "hyperdrive")
                    .field("binding", binding)
                    .field("user", user)
                    .field("database", database)
                    .field("databaseUrlIgnored", database_url_ignored)
            }
            Endpoint::DatabaseUrl { user, host, port, database, tls } => {
                let security = if *tls { "TLS" } else { "no TLS" };
                LogEvent::info(
                    "database",
                    format!("Database: DATABASE_URL (user {user} at {host}:{port}, database {database}, {security})"),
                )
                .field("via", "DATABASE_URL")
                .field("user", user)
                .field("host", host)
                .field("port", port)
                .field("database", database)
                .field("tls", tls)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(named: Option<&str>, state: BindingState, database_url: bool) -> Found {
        let binding = named.map_or_else(BindingName::default_name, |n| BindingName::parse(n).unwrap());
        Found { binding, named: named.is_some(), state, database_url }
    }

    fn check(found: Found, expect: expect_test::Expect) {
        let actual = match choose(&found) {
            Ok(Choice::Hyperdrive { binding, url_ignored }) => format!("hyperdrive {} url_ignored={url_ignored}", binding.as_str()),
            Ok(Choice::DatabaseUrl) => "DATABASE_URL".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn the_binding_wins_and_database_url_is_the_fallback() {
        use expect_test::expect;
        check(found(None, BindingState::Hyperdrive, false), expect!["hyperdrive HYPERDRIVE url_ignored=false"]);
        check(found(None, BindingState::Hyperdrive, true), expect!["hyperdrive HYPERDRIVE url_ignored=true"]);
        check(found(Some("DB_NO_CACHE"), BindingState::Hyperdrive, true), expect!["hyperdrive DB_NO_CACHE url_ignored=true"]);
        check(found(None, BindingState::Absent, true), expect!["DATABASE_URL"]);
    }

    #[test]
    fn a_missing_or_wrong_binding_is_an_error_that_says_what_to_do() {
        use expect_test::expect;
        check(
            found(None, BindingState::Absent, false),
            expect![[
                r#"error: no database configured: add a Hyperdrive binding named HYPERDRIVE ([[hyperdrive]] in wrangler.toml, see the README), or set DATABASE_URL with `wrangler secret put DATABASE_URL` (a postgres:// URL)"#
            ]],
        );
        // Named explicitly: no silent fallback to DATABASE_URL.
        check(
            found(Some("DB"), BindingState::Absent, true),
            expect![[
                r#"error: HYPERDRIVE_BINDING is "DB", but the worker has no binding of that name: add [[hyperdrive]] with binding = "DB" to wrangler.toml, or unset HYPERDRIVE_BINDING"#
            ]],
        );
        check(
            found(None, BindingState::Other("Binding cannot be cast to the type Hyperdrive from String".into()), true),
            expect![[
                r#"error: the binding "HYPERDRIVE" is not a Hyperdrive binding (Binding cannot be cast to the type Hyperdrive from String): declare it with [[hyperdrive]] in wrangler.toml, or set HYPERDRIVE_BINDING to the name of the Hyperdrive binding"#
            ]],
        );
    }

    #[test]
    fn binding_names_are_identifiers() {
        for good in ["HYPERDRIVE", "DB_2", "_x", "$db"] {
            assert_eq!(BindingName::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "2DB", "DB-2", "DB 2", "Dé"] {
            assert_eq!(BindingName::parse(bad), Err(DatabaseError::BindingName(bad.to_owned())), "{bad:?}");
        }
        expect_test::expect![[
            r#"HYPERDRIVE_BINDING is "my-db", which is not a binding name: use letters, digits and _ (e.g. HYPERDRIVE)"#
        ]]
        .assert_eq(&BindingName::parse("my-db").unwrap_err().to_string());
    }

    #[test]
    fn hyperdrive_is_plain_tcp_whatever_database_url_asks_for() {
        let hd = Endpoint::Hyperdrive { binding: "HYPERDRIVE".into(), user: "u".into(), database: "d".into(), database_url_ignored: true };
        assert_eq!(hd.tls(), Tls::Off);
        let url = |tls| Endpoint::DatabaseUrl { user: "u".into(), host: "h".into(), port: 5432, database: "d".into(), tls };
        assert_eq!(url(true).tls(), Tls::Required);
        assert_eq!(url(false).tls(), Tls::Off);
    }

    #[test]
    fn the_log_says_which_connection_is_used() {
        let hd = Endpoint::Hyperdrive {
            binding: "HYPERDRIVE".into(),
            user: "embsync".into(),
            database: "app".into(),
            database_url_ignored: true,
        };
        expect_test::expect![[r#"{"level":"info","event":"database","message":"Database: Hyperdrive binding HYPERDRIVE (user embsync, database app); DATABASE_URL is set too and is not used","binding":"HYPERDRIVE","database":"app","databaseUrlIgnored":true,"user":"embsync","via":"hyperdrive"}"#]]
        .assert_eq(&hd.log_event().to_json());
        let url = Endpoint::DatabaseUrl {
            user: "embsync".into(),
            host: "ep-x.eu-central-1.aws.neon.tech".into(),
            port: 5432,
            database: "neondb".into(),
            tls: true,
        };
        expect_test::expect![[r#"{"level":"info","event":"database","message":"Database: DATABASE_URL (user embsync at ep-x.eu-central-1.aws.neon.tech:5432, database neondb, TLS)","database":"neondb","host":"ep-x.eu-central-1.aws.neon.tech","port":5432,"tls":true,"user":"embsync","via":"DATABASE_URL"}"#]]
        .assert_eq(&url.log_event().to_json());
    }
}
