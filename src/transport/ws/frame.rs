//! RFC 6455 framing for the server side: decode masked client frames, encode unmasked server
//! frames. Pure functions over byte slices, no I/O; [`super::socket`] owns the buffers.

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Close, with an optional code and reason.
    Close,
    /// Ping; answered with a pong carrying the same payload.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Control frames may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The frame announces more payload than allowed (close code 1009).
    TooLarge {
        /// Announced payload length.
        len: u64,
    },
    /// A protocol violation (close code 1002).
    Protocol(&'static str),
}

/// A decoded frame: header fields plus where its payload lies in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Final fragment of a message.
    pub fin: bool,
    /// Frame type.
    pub opcode: Opcode,
    /// Masking key (always present on client frames).
    pub mask: [u8; 4],
    /// Bytes of header before the payload.
    pub header_len: usize,
    /// Payload length.
    pub payload_len: usize,
}

/// Parses the header at the start of `buf`. `Ok(None)` means more bytes are needed. Payload
/// above `max_payload` is refused from the header alone, before any of it is buffered.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol(
            "reserved bits set without a negotiated extension",
        ));
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::Protocol("unknown opcode"))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(FrameError::Protocol("payload length has its top bit set"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    let payload_len = match usize::try_from(len) {
        Ok(l) if l <= max_payload => l,
        _ => return Err(FrameError::TooLarge { len }),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    at += 4;
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

/// Unmasks `payload` in place; `offset` is the payload position of `payload[0]`.
pub fn unmask(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) & 3];
    }
}

/// Appends an unmasked, final frame to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    head(out, 0x80 | opcode.bits(), payload.len(), 0);
    out.extend_from_slice(payload);
}

/// A frame as a client sends it, masked with `mask`; `first` is the whole first byte (FIN,
/// reserved bits, opcode), so that tests and tools can also build the frames a server must
/// refuse. The server itself never sends one.
pub fn encode_client(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    head(&mut out, first, payload.len(), 0x80);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask, 0);
    out
}

/// The first byte, then the length (with `mask_bit` set in its first byte).
fn head(out: &mut Vec<u8>, first: u8, len: usize, mask_bit: u8) {
    out.push(first);
    if len < 126 {
        // `len < 126` fits in the 7 bits.
        out.push(mask_bit | u8::try_from(len).unwrap_or(125));
    } else if let Ok(short) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a close frame with `code` and a reason cut to fit a control frame.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len().min(123));
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(out, Opcode::Close, &payload);
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4): the defined codes
/// 1000–1003 and 1007–1014, and 3000–4999 for libraries and applications. 1004–1006 and
/// 1015 are reserved and never sent; everything else is unassigned.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_a_peer_may_send() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(valid_close_code(code), "{code}");
        }
        // Autobahn 7.9.1-7.9.9 and the reserved ones.
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!valid_close_code(code), "{code}");
        }
    }

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        encode_client(if fin { 0x80 } else { 0 } | opcode, payload, mask)
    }

    #[test]
    fn decodes_masked_frames_of_every_length_encoding() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = client_frame(true, 0x1, &payload, [9, 8, 7, 6]);
            let h = parse_header(&frame, 1 << 20).unwrap().unwrap();
            assert_eq!((h.fin, h.opcode, h.payload_len), (true, Opcode::Text, len));
            let mut body = frame[h.header_len..].to_vec();
            unmask(&mut body, h.mask, 0);
            assert_eq!(body, payload);
            // Every strict prefix of the header asks for more bytes.
            for cut in 0..h.header_len {
                assert_eq!(
                    parse_header(&frame[..cut], 1 << 20),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn unmask_with_offset_matches_whole() {
        let mask = [1, 2, 3, 4];
        let mut whole = b"hello world".to_vec();
        unmask(&mut whole, mask, 0);
        let mut split = b"hello world".to_vec();
        let (a, b) = split.split_at_mut(5);
        unmask(a, mask, 0);
        unmask(b, mask, 5);
        assert_eq!(whole, split);
    }

    #[test]
    fn refuses_bad_frames() {
        let too_big = client_frame(true, 0x1, &[0; 200], [1, 1, 1, 1]);
        assert_eq!(
            parse_header(&too_big, 100),
            Err(FrameError::TooLarge { len: 200 })
        );
        let mut unmasked = client_frame(true, 0x1, b"x", [0; 4]);
        unmasked[1] &= 0x7F;
        assert!(matches!(
            parse_header(&unmasked, 100),
            Err(FrameError::Protocol(_))
        ));
        let rsv = client_frame(true, 0x1 | 0x40, b"x", [1; 4]);
        assert!(matches!(
            parse_header(&rsv, 100),
            Err(FrameError::Protocol(_))
        ));
        let opcode = client_frame(true, 0x3, b"x", [1; 4]);
        assert!(matches!(
            parse_header(&opcode, 100),
            Err(FrameError::Protocol(_))
        ));
        let fragmented_ping = client_frame(false, 0x9, b"x", [1; 4]);
        assert!(matches!(
            parse_header(&fragmented_ping, 100),
            Err(FrameError::Protocol(_))
        ));
        let long_ping = client_frame(true, 0x9, &[0; 126], [1; 4]);
        assert!(matches!(
            parse_header(&long_ping, 1000),
            Err(FrameError::Protocol(_))
        ));
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            parse_header(&huge, 100),
            Err(FrameError::Protocol(_))
        ));
        // 10 MB announced: refused from the header alone.
        let mut big = vec![0x81, 0x80 | 127];
        big.extend_from_slice(&(10u64 << 20).to_be_bytes());
        assert_eq!(
            parse_header(&big, 1 << 20),
            Err(FrameError::TooLarge { len: 10 << 20 })
        );
    }

    #[test]
    fn encodes_server_frames() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let mut out = Vec::new();
            encode(&mut out, Opcode::Text, &vec![b'a'; len]);
            assert_eq!(out[0], 0x81);
            let (n, at) = match out[1] {
                126 => (usize::from(u16::from_be_bytes([out[2], out[3]])), 4),
                127 => (
                    usize::try_from(u64::from_be_bytes(out[2..10].try_into().unwrap())).unwrap(),
                    10,
                ),
                n => (usize::from(n), 2),
            };
            assert_eq!((n, out.len() - at), (len, len));
        }
        let mut close = Vec::new();
        encode_close(&mut close, 1009, &"é".repeat(100));
        assert_eq!(close[0], 0x88);
        assert!(usize::from(close[1]) <= 125);
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1009);
        assert!(
            std::str::from_utf8(&close[4..]).is_ok(),
            "reason cut on a char boundary"
        );
    }
}
