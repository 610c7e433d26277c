//! `embsync-local-provider`: runs the OpenAI-compatible embeddings server
//! until the process is killed. See `--help` and the crate's README.

use std::io::Write as _;
use std::process::ExitCode;

use local_provider::cli::{self, Command};
use local_provider::Server;

fn main() -> ExitCode {
    let config = match cli::parse_args(std::env::args().skip(1)) {
        Ok(Command::Serve(config)) => config,
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("embsync-local-provider: {message}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    // Before it listens: whoever waits for the port then gets answers at full speed.
    local_provider::tokens::warm_up();
    let server = match Server::bind(&config) {
        Ok(server) => server,
        Err(err) => {
            eprintln!("embsync-local-provider: {err}");
            return ExitCode::FAILURE;
        }
    };
    let addr = match server.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("embsync-local-provider: cannot read the listening address: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts read the port from this first line, so it is flushed at once.
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on http://{addr}").and_then(|()| stdout.flush()).is_err() {
        eprintln!("embsync-local-provider: cannot write to stdout");
        return ExitCode::FAILURE;
    }
    drop(stdout);
    let err = server.run();
    eprintln!("embsync-local-provider: cannot run the server: {err}");
    ExitCode::FAILURE
}
