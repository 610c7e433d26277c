//! PgBouncer in transaction mode, the stand-in for Hyperdrive's pooling.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::util::{env_var, free_port, keep_logs, poll, temp_dir};

/// PgBouncer in transaction mode in front of the test Postgres: the stand-in for Hyperdrive's
/// transaction pooling. It hands a server connection to a client for one transaction (or one
/// statement outside a transaction) only, and takes its server connections first in, first out
/// (`server_round_robin`), so two consecutive messages of one client outside a transaction
/// usually land on different server connections: anything that relies on session state, named
/// prepared statements included (PgBouncer before 1.21 does not track them), fails through it.
/// Stopped on drop.
pub struct PgBouncer {
    /// The port it listens on (127.0.0.1).
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer (`EMBSYNC_PGBOUNCER`) for every database of the server at `admin_url`
    /// and waits until it answers.
    pub fn start(admin_url: &str) -> PgBouncer {
        let bin = env_var("EMBSYNC_PGBOUNCER");
        let (host, pg_port) = {
            let rest = admin_url.split_once('@').map_or(admin_url, |(_, r)| r);
            let hostport = rest.split('/').next().unwrap_or(rest);
            let (h, p) = hostport.rsplit_once(':').expect("host:port in the admin URL");
            (h.to_string(), p.to_string())
        };
        let dir = temp_dir("embsync-e2e-pgbouncer");
        let port = free_port();
        let ini = format!(
            "[databases]\n\
             * = host={host} port={pg_port} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             admin_users = postgres\n\
             pool_mode = transaction\n\
             server_round_robin = 1\n\
             default_pool_size = 8\n\
             ignore_startup_parameters = extra_float_digits,options\n"
        );
        let ini_path = dir.join("pgbouncer.ini");
        fs::write(&ini_path, ini).expect("write pgbouncer.ini");
        // PgBouncer refuses to run as root: as root it runs as the user scripts/pg.sh uses.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod the PgBouncer directory");
            fs::set_permissions(&ini_path, fs::Permissions::from_mode(0o644)).expect("chmod pgbouncer.ini");
        }
        let log = File::create(dir.join("pgbouncer.log")).expect("PgBouncer log file");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let user =
                if Command::new("id").args(["-u", "postgres"]).output().is_ok_and(|o| o.status.success()) { "postgres" } else { "nobody" };
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.arg(&ini_path).current_dir("/").stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let bouncer = PgBouncer { port, child: Some(child), dir };
        let url = bouncer.url("postgres");
        poll(Duration::from_secs(20), "PgBouncer to accept connections", || {
            Client::connect(&url, NoTls).ok().and_then(|mut c| c.simple_query("SELECT 1").ok()).map(|_| ())
        });
        bouncer
    }

    /// The URL of `database` through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Makes PgBouncer open `n` server connections for `database` and keep them idle in its
    /// pool: `n` clients each hold one with an open transaction, then commit. Consecutive
    /// statements then land on different ones (first in, first out). Checked with `SHOW POOLS`.
    pub fn warm(&self, database: &str, n: usize) {
        let url = self.url(database);
        let mut clients: Vec<Client> = (0..n)
            .map(|_| {
                let mut c = Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect through PgBouncer: {e}"));
                c.batch_execute("BEGIN; SELECT 1").expect("open a transaction through PgBouncer");
                c
            })
            .collect();
        for c in &mut clients {
            c.batch_execute("COMMIT").expect("commit through PgBouncer");
        }
        drop(clients);
        let servers = self.server_connections(database);
        assert!(servers >= n as i64, "PgBouncer holds {servers} server connections for {database}, not {n}:\n{}", self.log());
    }

    /// How many server connections PgBouncer holds for `database` (`SHOW POOLS`).
    pub fn server_connections(&self, database: &str) -> i64 {
        let mut admin = Client::connect(&self.url("pgbouncer"), NoTls).expect("PgBouncer's admin console");
        admin
            .simple_query("SHOW POOLS")
            .expect("SHOW POOLS")
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some(database) => {
                    let n = |col: &str| r.get(col).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                    Some(n("sv_idle") + n("sv_used") + n("sv_active") + n("sv_tested") + n("sv_login"))
                }
                _ => None,
            })
            .sum()
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT to the process group: PgBouncer itself, not only runuser.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
        if keep_logs() {
            eprintln!("--- PgBouncer log kept in {} ---", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
