//! WebSocket connection I/O whose buffers exist only while bytes are in flight.
//!
//! An idle connection is most connections, so what it keeps decides the server's memory per
//! connection. [`WsSocket`] reads by polling into a stack buffer: bytes are copied to the
//! heap only when a frame is incomplete, and the read buffer is freed as soon as it is empty.
//! Writes are collected in a buffer that the connection frees whenever it goes idle
//! ([`WsSocket::release`]). Nothing keeps its largest size after a burst, unlike a
//! general-purpose WebSocket stream.
//!
//! All methods are cancel-safe: every byte read or written is accounted for in `self` before
//! a poll returns, so the connection task can race them against shutdown and kicks.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::frame::{self, FrameError, Opcode};

/// Bytes read from the socket per poll (on the stack, not kept).
const READ_CHUNK: usize = 4096;

/// A complete message or control frame from the client.
#[derive(Debug)]
pub enum Incoming {
    /// A UTF-8 text message (reassembled if fragmented).
    Text(String),
    /// A binary message (Parlor's protocol has no use for them; the echo mode does).
    Binary(Vec<u8>),
    /// A ping; its payload goes back in a pong.
    Ping(Vec<u8>),
    /// A pong (the answer to the server's ping, or an unsolicited heartbeat).
    Pong,
    /// The client started the closing handshake.
    Close,
}

/// Why reading failed. Every variant ends the connection.
#[derive(Debug)]
pub enum RecvError {
    /// A frame or message above the size limit (close 1009).
    TooLarge,
    /// A protocol violation (close 1002).
    Protocol(&'static str),
    /// A text message that is not UTF-8 (close 1007).
    InvalidUtf8,
    /// The connection broke or the peer closed the TCP stream.
    Gone,
}

/// An upgraded connection's byte stream: the TCP stream itself, shared, so that the hub can
/// write to a parked connection ([`crate::hub::Parked`]); any other stream hyper upgraded
/// (none, as the server listens on TCP) as hyper hands it over.
#[derive(Debug)]
pub enum ServerIo {
    /// The accepted TCP stream.
    Tcp(Arc<TcpStream>),
    /// Another stream, boxed: every idle connection keeps this enum.
    Other(Box<TokioIo<Upgraded>>),
}

impl ServerIo {
    /// The TCP stream, which a parked connection shares with the hub.
    pub fn tcp(&self) -> Option<&Arc<TcpStream>> {
        match self {
            Self::Tcp(stream) => Some(stream),
            Self::Other(_) => None,
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => loop {
                ready!(stream.poll_read_ready(cx))?;
                match stream.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            Self::Other(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => loop {
                ready!(stream.poll_write_ready(cx))?;
                match stream.try_write(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    written => return Poll::Ready(written),
                }
            },
            Self::Other(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(_) => Poll::Ready(Ok(())),
            Self::Other(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Poll::Ready(
                socket2::SockRef::from(stream.as_ref()).shutdown(std::net::Shutdown::Write),
            ),
            Self::Other(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The server end of an upgraded WebSocket connection (over any byte stream `S`; the
/// server's is its TCP stream, tests use in-memory pipes).
pub struct WsSocket<S = ServerIo> {
    io: S,
    /// Received bytes not yet forming a whole frame. Unallocated when empty.
    rbuf: Vec<u8>,
    /// Encoded frames waiting to be written, and how much of them is written.
    wbuf: Vec<u8>,
    wpos: usize,
    /// A fragmented message being reassembled: (is text, bytes so far). Boxed: rare, and
    /// every idle connection keeps the field.
    partial: Option<Box<(bool, Vec<u8>)>>,
    /// Largest frame or reassembled message accepted.
    max_message: usize,
    /// A close frame has been queued; nothing may follow it.
    close_queued: bool,
}

impl<S> std::fmt::Debug for WsSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsSocket")
            .field("pending_write", &(self.wbuf.len() - self.wpos))
            .finish_non_exhaustive()
    }
}

impl WsSocket {
    /// Wraps an upgraded connection: its TCP stream, with the bytes hyper read past the
    /// upgrade request (frames a client sent at once) first.
    pub fn new(io: Upgraded, max_message: usize) -> Self {
        match io.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let mut socket =
                    Self::over(ServerIo::Tcp(Arc::new(parts.io.into_inner())), max_message);
                socket.rbuf.extend_from_slice(&parts.read_buf);
                socket
            }
            Err(io) => Self::over(ServerIo::Other(Box::new(TokioIo::new(io))), max_message),
        }
    }

    /// The TCP stream, for a parked connection ([`crate::hub::Parked`]).
    pub fn tcp(&self) -> Option<&Arc<TcpStream>> {
        self.io.tcp()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSocket<S> {
    /// Speaks WebSocket (as the server) over `io`, taking messages up to `max_message`
    /// bytes.
    pub fn over(io: S, max_message: usize) -> Self {
        Self {
            io,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            partial: None,
            max_message,
            close_queued: false,
        }
    }

    /// The next message or control frame.
    pub async fn recv(&mut self) -> Result<Incoming, RecvError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next message or control frame (what [`Self::recv`] awaits).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, RecvError>> {
        loop {
            if let Some(incoming) = self.take_message()? {
                return Poll::Ready(Ok(incoming));
            }
            // Not zeroed: the reader only exposes what it filled.
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Err(RecvError::Gone)),
                Ok(()) => self.rbuf.extend_from_slice(buf.filled()),
                Err(_) => return Poll::Ready(Err(RecvError::Gone)),
            }
        }
    }

    /// Takes whole frames out of `rbuf` until one completes a message or is a control frame.
    fn take_message(&mut self) -> Result<Option<Incoming>, RecvError> {
        loop {
            let header = match frame::parse_header(&self.rbuf, self.max_message) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(FrameError::TooLarge { .. }) => return Err(RecvError::TooLarge),
                Err(FrameError::Protocol(m)) => return Err(RecvError::Protocol(m)),
            };
            let total = header.header_len + header.payload_len;
            if self.rbuf.len() < total {
                return Ok(None);
            }
            let mut payload = if total == self.rbuf.len() {
                // The usual case: the buffer holds exactly one frame; reuse its allocation.
                let mut whole = std::mem::take(&mut self.rbuf);
                whole.drain(..header.header_len);
                whole
            } else {
                let payload = self.rbuf[header.header_len..total].to_vec();
                self.rbuf.drain(..total);
                payload
            };
            frame::unmask(&mut payload, header.mask, 0);

            match header.opcode {
                Opcode::Ping => return Ok(Some(Incoming::Ping(payload))),
                Opcode::Pong => return Ok(Some(Incoming::Pong)),
                Opcode::Close => {
                    if payload.len() == 1
                        || std::str::from_utf8(payload.get(2..).unwrap_or_default()).is_err()
                    {
                        return Err(RecvError::Protocol("malformed close frame"));
                    }
                    if let [high, low, ..] = payload[..]
                        && !frame::valid_close_code(u16::from_be_bytes([high, low]))
                    {
                        return Err(RecvError::Protocol("invalid close code"));
                    }
                    return Ok(Some(Incoming::Close));
                }
                Opcode::Text | Opcode::Binary => {
                    if self.partial.is_some() {
                        return Err(RecvError::Protocol(
                            "a new message started inside a fragmented one",
                        ));
                    }
                    let text = header.opcode == Opcode::Text;
                    if header.fin {
                        return finish(text, payload).map(Some);
                    }
                    self.partial = Some(Box::new((text, payload)));
                }
                Opcode::Continuation => {
                    let Some((text, mut message)) = self.partial.take().map(|p| *p) else {
                        return Err(RecvError::Protocol("continuation frame without a message"));
                    };
                    if message.len() + payload.len() > self.max_message {
                        return Err(RecvError::TooLarge);
                    }
                    message.extend_from_slice(&payload);
                    if header.fin {
                        return finish(text, message).map(Some);
                    }
                    self.partial = Some(Box::new((text, message)));
                }
            }
        }
    }

    /// Queues a text frame; [`WsSocket::flush`] writes it.
    pub fn queue_text(&mut self, payload: &[u8]) {
        if !self.close_queued {
            frame::encode(&mut self.wbuf, Opcode::Text, payload);
        }
    }

    /// Queues bytes already framed (what a parked connection framed and did not write).
    pub fn queue_framed(&mut self, frames: &[u8]) {
        if !self.close_queued {
            self.wbuf.extend_from_slice(frames);
        }
    }

    /// Queues a pong answering a ping.
    pub fn queue_pong(&mut self, payload: &[u8]) {
        if !self.close_queued {
            frame::encode(&mut self.wbuf, Opcode::Pong, payload);
        }
    }

    /// Queues a ping (the server's liveness check).
    pub fn queue_ping(&mut self) {
        if !self.close_queued {
            frame::encode(&mut self.wbuf, Opcode::Ping, b"");
        }
    }

    /// Queues the close frame; nothing can be queued after it.
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        if !self.close_queued {
            frame::encode_close(&mut self.wbuf, code, reason);
            self.close_queued = true;
        }
    }

    /// Bytes queued but not yet written.
    pub fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Polls [`Self::flush`]: writes what the socket takes now.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.wpos += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Frees the write buffer if nothing waits in it: for a connection about to idle. A
    /// busy one keeps it from flush to flush.
    pub fn release(&mut self) {
        if self.wpos == self.wbuf.len() && self.wbuf.capacity() > 0 {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
    }

    /// Half-closes the TCP stream after the close frame, so the client sees the end.
    pub async fn shutdown(&mut self) {
        let _ = poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await;
    }
}

fn finish(text: bool, payload: Vec<u8>) -> Result<Incoming, RecvError> {
    if text {
        String::from_utf8(payload)
            .map(Incoming::Text)
            .map_err(|_| RecvError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(payload))
    }
}

/// The conformance-test mode of this layer: echoes every message back (text as text,
/// binary as binary), answers pings, and closes with the code Parlor's connections use
/// for each failure. The Autobahn fuzzing suite runs against it (`tests/autobahn.rs`), so
/// the framing, reassembly, UTF-8 and close handling it checks are the production code's.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut socket: WsSocket<S>) {
    let close = loop {
        match socket.recv().await {
            Ok(Incoming::Text(text)) => socket.queue_text(text.as_bytes()),
            Ok(Incoming::Binary(bytes)) => frame::encode(&mut socket.wbuf, Opcode::Binary, &bytes),
            Ok(Incoming::Ping(payload)) => socket.queue_pong(&payload),
            Ok(Incoming::Pong) => continue,
            Ok(Incoming::Close) => break (1000, ""),
            Err(RecvError::TooLarge) => break (super::CLOSE_TOO_BIG, "frame too large"),
            Err(RecvError::Protocol(_)) => break (super::CLOSE_PROTOCOL, "protocol error"),
            Err(RecvError::InvalidUtf8) => {
                break (super::CLOSE_INVALID_DATA, "text frame is not UTF-8");
            }
            Err(RecvError::Gone) => return,
        }
        if socket.flush().await.is_err() {
            return;
        }
    };
    socket.queue_close(close.0, close.1);
    if socket.flush().await.is_ok() {
        socket.shutdown().await;
    }
}
