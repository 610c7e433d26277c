//! A TCP proxy between tokio-postgres and Postgres that can drop the connection at a chosen
//! frontend message, as a Worker killed mid-invocation (or a network cut) does.
//!
//! After the startup message every frontend message is a type byte and a big-endian `int32`
//! length that counts itself. The proxy forwards whole messages and counts them; at the k-th it
//! cuts. To make a cut replay exactly, it then waits until Postgres has answered every `Sync`
//! and `Query` already forwarded (one `ReadyForQuery` each, the startup's included), withholding
//! those answers from the client, and only then closes both sides. So whether a statement ran is
//! decided by the message number alone, never by timing.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where a cut falls within the k-th frontend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Message k is not sent.
    Before,
    /// Half of message k is sent, then the connection drops.
    Partial,
    /// Message k is sent (and, for a `Sync` or `Query`, run by Postgres), but its answer never
    /// reaches the client: e.g. a `COMMIT` that commits while the client sees an error.
    After,
}

/// Cut the connection at the `at`-th frontend message after startup (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The message number.
    pub at: u64,
    /// Where within it.
    pub mode: CutMode,
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct ProxyState {
    /// Frontend messages forwarded whole.
    pub messages: u64,
    /// The cut happened; the type byte of the message it fell on.
    pub cut_at_type: Option<char>,
    /// Postgres did not answer the forwarded syncs within the safety timeout (the replay may
    /// then not be exact).
    pub timed_out: bool,
}

/// Listens on a free local port and proxies one connection to `upstream`, cutting it per `cut`.
pub async fn start(upstream: (String, u16), cut: Option<Cut>) -> (u16, Arc<Mutex<ProxyState>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
    let port = listener.local_addr().expect("the proxy's address").port();
    let state = Arc::new(Mutex::new(ProxyState::default()));
    let st = state.clone();
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else { return };
        let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await else { return };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        run(client, server, cut, st).await;
    });
    (port, state)
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

async fn run(mut client: TcpStream, mut server: TcpStream, cut: Option<Cut>, state: Arc<Mutex<ProxyState>>) {
    let (mut cbuf, mut sbuf) = (Vec::<u8>::new(), Vec::<u8>::new());
    let (mut cin, mut sin) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut started = false;
    // ReadyForQuery answers expected (the startup's, then one per Sync or Query) and received.
    let (mut syncs, mut ready) = (0u64, 0u64);
    let mut cutting = false;
    let mut messages = 0u64;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if cutting {
            if ready >= syncs {
                break;
            }
            let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(10));
            if tokio::time::Instant::now() >= d {
                state.lock().unwrap().timed_out = true;
                break;
            }
        }
        tokio::select! {
            r = client.read(&mut cin), if !cutting => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                cbuf.extend_from_slice(&cin[..n]);
                let mut out = Vec::new();
                loop {
                    if !started {
                        if cbuf.len() < 4 || cbuf.len() < be32(&cbuf) {
                            break;
                        }
                        let len = be32(&cbuf);
                        out.extend(cbuf.drain(..len));
                        started = true;
                        syncs += 1;
                        continue;
                    }
                    if cbuf.len() < 5 {
                        break;
                    }
                    let len = 1 + be32(&cbuf[1..]);
                    let kind = cbuf[0];
                    if let Some(c) = cut.filter(|c| c.at == messages + 1) {
                        match c.mode {
                            CutMode::Before => {}
                            CutMode::Partial => {
                                let half = (len / 2).max(1).min(cbuf.len());
                                out.extend(cbuf.drain(..half));
                            }
                            CutMode::After => {
                                if cbuf.len() < len {
                                    break;
                                }
                                out.extend(cbuf.drain(..len));
                                if kind == b'S' || kind == b'Q' {
                                    syncs += 1;
                                }
                            }
                        }
                        cutting = true;
                        state.lock().unwrap().cut_at_type = Some(kind as char);
                        break;
                    }
                    if cbuf.len() < len {
                        break;
                    }
                    out.extend(cbuf.drain(..len));
                    messages += 1;
                    if kind == b'S' || kind == b'Q' {
                        syncs += 1;
                    }
                }
                state.lock().unwrap().messages = messages;
                if server.write_all(&out).await.is_err() {
                    break;
                }
            }
            r = server.read(&mut sin) => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                sbuf.extend_from_slice(&sin[..n]);
                while sbuf.len() >= 5 && sbuf.len() >= 1 + be32(&sbuf[1..]) {
                    let len = 1 + be32(&sbuf[1..]);
                    if sbuf[0] == b'Z' {
                        ready += 1;
                    }
                    sbuf.drain(..len);
                }
                if !cutting && client.write_all(&sin[..n]).await.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if cutting => {}
        }
    }
    // Both sockets drop here: the client sees the connection closed, Postgres sees EOF and rolls
    // back whatever transaction was open.
}
