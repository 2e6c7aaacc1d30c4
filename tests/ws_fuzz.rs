//! Property tests of the WebSocket reader: the production framing, reassembly, UTF-8 and
//! close handling ([`WsSocket`]) fed from memory, in chunks cut at random places.
//!
//! - **Any bytes**: whatever a client sends, reading ends in a message, a refusal or the
//!   end of the stream; never a panic, never more messages than bytes.
//! - **Any valid conversation**: text and binary messages, fragmented at random points with
//!   pings and pongs between the fragments, each frame under a random mask, arrive whole and
//!   in order however the stream is cut.
//! - **Frame headers**: [`frame::parse_header`] on any bytes never panics, and on a valid
//!   header reads back exactly what was encoded.
//!
//! CI runs proptest's default 256 cases of each. The long run recorded in
//! `docs/security.md` sets `PROPTEST_CASES` (see there).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use parlor::transport::ws::frame::{self, Opcode};
use parlor::transport::ws::socket::{Incoming, RecvError, WsSocket};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client stream held in memory: reads give the chunks in turn, then the end of the
/// stream; writes are discarded.
struct Chunks {
    chunks: std::collections::VecDeque<Vec<u8>>,
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut chunk) = self.chunks.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunks {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `bytes` cut at `cuts` (positions, any order, out-of-range ones ignored).
fn cut(bytes: &[u8], cuts: &[usize]) -> std::collections::VecDeque<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = std::collections::VecDeque::new();
    let mut from = 0;
    for to in at.into_iter().chain([bytes.len()]) {
        if to > from {
            out.push_back(bytes[from..to].to_vec());
            from = to;
        }
    }
    out
}

/// What the reader made of a stream: its messages, then how it ended.
#[derive(Debug, PartialEq)]
enum Read {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close,
}

fn read_all(chunks: std::collections::VecDeque<Vec<u8>>, max: usize) -> (Vec<Read>, RecvError) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut socket = WsSocket::over(Chunks { chunks }, max);
        let mut got = Vec::new();
        loop {
            match socket.recv().await {
                Ok(Incoming::Text(t)) => got.push(Read::Text(t)),
                Ok(Incoming::Binary(b)) => got.push(Read::Binary(b)),
                Ok(Incoming::Ping(p)) => got.push(Read::Ping(p)),
                Ok(Incoming::Pong) => got.push(Read::Pong),
                Ok(Incoming::Close) => got.push(Read::Close),
                Err(e) => return (got, e),
            }
        }
    })
}

/// A masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    frame::encode_client(if fin { 0x80 } else { 0 } | opcode, payload, mask)
}

/// One message of a generated conversation, with where it is cut into fragments and the
/// control frames sent between them.
#[derive(Debug, Clone)]
struct Sent {
    text: bool,
    payload: Vec<u8>,
    /// Fragment boundaries (positions in `payload`).
    splits: Vec<usize>,
    /// Pings (Some) and pongs (None) after each fragment but the last.
    between: Vec<Option<Vec<u8>>>,
    mask: [u8; 4],
}

fn sent() -> impl Strategy<Value = Sent> {
    let text = ".{0,300}".prop_map(|s: String| (true, s.into_bytes()));
    let binary = prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (false, b));
    (
        prop_oneof![text, binary],
        prop::collection::vec(any::<usize>(), 0..4),
        prop::collection::vec(
            prop::option::of(prop::collection::vec(any::<u8>(), 0..125)),
            0..4,
        ),
        any::<[u8; 4]>(),
    )
        .prop_map(|((text, payload), splits, between, mask)| Sent {
            text,
            payload,
            splits,
            between,
            mask,
        })
}

impl Sent {
    /// The frames, and what the reader must make of them.
    fn encode(&self, out: &mut Vec<u8>, expect: &mut Vec<Read>) {
        // Splits inside UTF-8 characters are fine: fragments are reassembled first.
        let mut at: Vec<usize> = self
            .splits
            .iter()
            .map(|s| s % (self.payload.len() + 1))
            .collect();
        at.sort_unstable();
        at.dedup();
        at.retain(|&p| p > 0 && p < self.payload.len());
        let bounds: Vec<usize> = [0]
            .into_iter()
            .chain(at)
            .chain([self.payload.len()])
            .collect();
        let fragments = bounds.len() - 1;
        for (i, pair) in bounds.windows(2).enumerate() {
            let opcode = match (i, self.text) {
                (0, true) => 0x1,
                (0, false) => 0x2,
                _ => 0x0,
            };
            let last = i + 1 == fragments;
            out.extend(client_frame(
                last,
                opcode,
                &self.payload[pair[0]..pair[1]],
                self.mask,
            ));
            if !last && let Some(control) = self.between.get(i) {
                match control {
                    Some(ping) => {
                        out.extend(client_frame(true, 0x9, ping, self.mask));
                        expect.push(Read::Ping(ping.clone()));
                    }
                    None => {
                        out.extend(client_frame(true, 0xA, b"", self.mask));
                        expect.push(Read::Pong);
                    }
                }
            }
        }
        expect.push(if self.text {
            Read::Text(String::from_utf8(self.payload.clone()).unwrap())
        } else {
            Read::Binary(self.payload.clone())
        });
    }
}

proptest! {
    #[test]
    fn any_bytes_end_in_messages_a_refusal_or_the_end(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (got, _) = read_all(cut(&bytes, &cuts), 1024);
        // Every message took at least a two-byte header.
        prop_assert!(got.len() * 2 <= bytes.len());
    }

    #[test]
    fn frames_with_any_header_bits_are_read_or_refused(
        head in prop::collection::vec(any::<u8>(), 2..14),
        payload in prop::collection::vec(any::<u8>(), 0..200),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        // Random first bytes (opcodes, reserved bits, lengths, masks) before a payload:
        // the inputs a byte-level fuzzer spends most of its time finding.
        let mut bytes = head;
        bytes.extend(payload);
        let (got, end) = read_all(cut(&bytes, &cuts), 1024);
        prop_assert!(got.len() * 2 <= bytes.len());
        if bytes[1] & 0x80 == 0 {
            // An unmasked client frame is always a protocol error, first thing.
            prop_assert!(got.is_empty() && matches!(end, RecvError::Protocol(_)), "{got:?} {end:?}");
        }
    }

    #[test]
    fn valid_conversations_arrive_whole_and_in_order_however_cut(
        messages in prop::collection::vec(sent(), 0..8),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut bytes = Vec::new();
        let mut expect = Vec::new();
        for m in &messages {
            m.encode(&mut bytes, &mut expect);
        }
        bytes.extend(client_frame(true, 0x8, &1000u16.to_be_bytes(), [1, 2, 3, 4]));
        expect.push(Read::Close);
        let (got, end) = read_all(cut(&bytes, &cuts), 1 << 16);
        prop_assert_eq!(got, expect);
        prop_assert!(matches!(end, RecvError::Gone));
    }

    #[test]
    fn frame_headers_parse_back_or_are_refused(
        bytes in prop::collection::vec(any::<u8>(), 0..20),
        fin: bool,
        opcode in prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        len in prop_oneof![0usize..126, 126usize..70_000, 70_000usize..200_000],
        mask: [u8; 4],
    ) {
        // Any bytes: no panic.
        let _ = frame::parse_header(&bytes, 1 << 20);
        // A valid header reads back as encoded (a control frame is final and short).
        let control = matches!(opcode, 8..=10);
        let (fin, len) = if control { (true, len % 126) } else { (fin, len) };
        let payload = vec![0u8; len];
        let encoded = client_frame(fin, opcode, &payload, mask);
        let header = frame::parse_header(&encoded, 1 << 20).unwrap().unwrap();
        prop_assert_eq!(header.fin, fin);
        prop_assert_eq!(header.mask, mask);
        prop_assert_eq!(header.payload_len, len);
        prop_assert_eq!(header.header_len + len, encoded.len());
        let expected = match opcode {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            _ => Opcode::Pong,
        };
        prop_assert_eq!(header.opcode, expected);
        // Too large for the limit: refused from the header alone.
        if len > 0 {
            let refused = frame::parse_header(&encoded[..header.header_len], len - 1);
            let too_large = matches!(refused, Err(frame::FrameError::TooLarge { .. }));
            prop_assert!(too_large, "{:?}", refused);
        }
    }
}
