//! The Postgres connection's TCP socket (the Workers socket API) as tokio's `AsyncRead` and
//! `AsyncWrite`, for tokio-postgres.
//!
//! It holds its streams' reader and writer for the socket's whole life. `worker::Socket` takes a
//! reader (`getReader`) or writer and releases it again around every single read and write; in a
//! CPU profile of the worker writing 20,000 values, reading the socket that way was a fifth of
//! the isolate's busy time, most of it in `releaseLock` (BENCHMARKS.md, "Where workerd's CPU
//! goes"). A chunk goes straight into tokio's buffer when it fits, so most reads copy once.

use futures::FutureExt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use worker::js_sys::{self, Reflect, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::web_sys::{ReadableStreamDefaultReader, WritableStreamDefaultWriter};
use worker::worker_sys;

/// Whether a socket is TLS from the start, plain, or plain until [`PgSocket::start_tls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP for good.
    Off,
    /// Plain TCP until [`PgSocket::start_tls`].
    StartTls,
}

/// A socket with its reader and writer (see the module's documentation).
pub struct PgSocket {
    socket: worker_sys::Socket,
    reader: ReadableStreamDefaultReader,
    writer: WritableStreamDefaultWriter,
    /// The read in progress.
    reading: Option<JsFuture>,
    /// What is left of the last chunk read, from `unread_at`.
    unread: Vec<u8>,
    unread_at: usize,
    /// The last write, not known to be done yet: its bytes were accepted.
    writing: Option<JsFuture>,
    closing: Option<JsFuture>,
}

/// A JavaScript error's message.
pub(crate) fn js_message(e: &JsValue) -> String {
    match e.dyn_ref::<js_sys::Error>() {
        Some(error) => String::from(error.message()),
        None => e.as_string().unwrap_or_else(|| format!("{e:?}")),
    }
}

/// A JavaScript error as an I/O error, with its message.
fn io_error(e: JsValue) -> io::Error {
    io::Error::other(js_message(&e))
}

impl PgSocket {
    /// Opens a socket to `host:port` (`connect()` of `cloudflare:sockets`).
    ///
    /// # Errors
    /// The runtime refused the address or the options.
    pub fn connect(host: &str, port: u16, transport: Transport) -> Result<PgSocket, JsValue> {
        let address = js_sys::Object::new();
        Reflect::set(&address, &"hostname".into(), &host.into())?;
        Reflect::set(&address, &"port".into(), &JsValue::from(port))?;
        let options = js_sys::Object::new();
        Reflect::set(&options, &"allowHalfOpen".into(), &JsValue::FALSE)?;
        let secure = match transport {
            Transport::Off => "off",
            Transport::StartTls => "starttls",
        };
        Reflect::set(&options, &"secureTransport".into(), &secure.into())?;
        PgSocket::new(worker_sys::connect(address.into(), options.into())?)
    }

    /// The socket a Hyperdrive binding opens.
    ///
    /// # Errors
    /// The binding refused.
    pub fn hyperdrive(binding: &worker::Hyperdrive) -> Result<PgSocket, JsValue> {
        let sys: &worker_sys::Hyperdrive = binding.as_ref().unchecked_ref();
        PgSocket::new(sys.connect()?)
    }

    pub(crate) fn new(socket: worker_sys::Socket) -> Result<PgSocket, JsValue> {
        let reader: ReadableStreamDefaultReader = socket.readable()?.get_reader().dyn_into()?;
        let writer = socket.writable()?.get_writer()?;
        Ok(PgSocket { socket, reader, writer, reading: None, unread: Vec::new(), unread_at: 0, writing: None, closing: None })
    }

    /// Resolves once the connection is open (for TLS, once the handshake is done).
    ///
    /// # Errors
    /// The connection or its handshake failed.
    pub async fn opened(&self) -> Result<(), JsValue> {
        JsFuture::from(self.socket.opened()?).await.map(|_| ())
    }

    /// Upgrades a [`Transport::StartTls`] socket to TLS: a new socket over the same connection.
    /// Nothing may be unread or still being written.
    ///
    /// # Errors
    /// The runtime refused (not opened with `starttls`).
    pub fn start_tls(self) -> Result<PgSocket, JsValue> {
        self.reader.release_lock();
        self.writer.release_lock();
        PgSocket::new(self.socket.start_tls()?)
    }

    /// Waits for the last write.
    fn poll_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(write) = &mut self.writing {
            let result = ready!(write.poll_unpin(cx));
            self.writing = None;
            result.map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for PgSocket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.unread_at < this.unread.len() {
                let n = buf.remaining().min(this.unread.len() - this.unread_at);
                buf.put_slice(&this.unread[this.unread_at..this.unread_at + n]);
                this.unread_at += n;
                return Poll::Ready(Ok(()));
            }
            let reader = &this.reader;
            let read = this.reading.get_or_insert_with(|| JsFuture::from(reader.read()));
            let result = ready!(read.poll_unpin(cx));
            this.reading = None;
            let chunk = result.map_err(io_error)?;
            if Reflect::get(&chunk, &"done".into()).map_err(io_error)?.is_truthy() {
                // The end of the stream: nothing read is what tokio takes for it.
                return Poll::Ready(Ok(()));
            }
            let value: Uint8Array = Reflect::get(&chunk, &"value".into()).map_err(io_error)?.dyn_into().map_err(io_error)?;
            let len = value.length() as usize;
            if len == 0 {
                continue;
            }
            if len <= buf.remaining() {
                value.copy_to(buf.initialize_unfilled_to(len));
                buf.advance(len);
                return Poll::Ready(Ok(()));
            }
            this.unread = value.to_vec();
            this.unread_at = 0;
        }
    }
}

impl AsyncWrite for PgSocket {
    /// Waits for the previous write, then hands `data` to the stream (copied) and answers at
    /// once; [`AsyncWrite::poll_flush`] waits for it.
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_written(cx))?;
        let chunk = Uint8Array::from(data);
        self.writing = Some(JsFuture::from(self.writer.write_with_chunk(&chunk)));
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_written(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_written(cx))?;
        let this = &mut *self;
        let writer = &this.writer;
        let close = this.closing.get_or_insert_with(|| JsFuture::from(writer.close()));
        let result = ready!(close.poll_unpin(cx));
        result.map_err(io_error)?;
        Poll::Ready(Ok(()))
    }
}
