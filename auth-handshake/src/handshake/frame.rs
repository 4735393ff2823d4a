//! The frames carried inside the node-to-node TLS session.
//!
//! ```text
//! frame   = kind:u8  length:u32be  payload[length]          (length <= MAX_FRAME)
//! Prove   = request:u32  initiator:str  responder:str  chain  signature   (client -> server)
//! Proof   = request:u32  chain  signature                                  (server -> client)
//! Refuse  = request:u32  reason:u8                                         (either way)
//! Confirm = request:u32                                                    (client -> server)
//! str     = len:u16 bytes (UTF-8, a SPIFFE ID)     chain = count:u8 (len:u16 der)*
//! signature = len:u16 bytes
//! ```
//!
//! Decoding never panics and never allocates more than the frame it was
//! given: every length is checked against what is left and against its
//! limit first. A frame that breaks a rule is a [`FrameError`], which closes
//! the session; nothing it carried is acted on.

use crate::handshake::Refusal;

/// Largest payload of one frame. A Prove is two SPIFFE IDs (2 KiB each at
/// most), a chain and a signature; four 4 KiB certificates fit with room.
pub const MAX_FRAME: usize = 24 * 1024;
/// Most certificates in a presented chain (leaf and intermediates).
pub const MAX_CHAIN: usize = 4;
/// Largest certificate accepted in a chain.
pub const MAX_CERT: usize = 4096;
/// Largest signature (a DER ECDSA P-384 signature is at most 104 bytes; Ed25519 64).
pub const MAX_SIGNATURE: usize = 512;
/// Bytes before a frame's payload.
pub const HEADER: usize = 5;

const KIND_PROVE: u8 = 1;
const KIND_PROOF: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_CONFIRM: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the {MAX_FRAME}-byte limit: the peer is not speaking meshguard-auth/1")]
    Oversized { len: usize },
    #[error("unknown frame kind {kind}: the peer speaks another protocol version")]
    UnknownKind { kind: u8 },
    #[error("frame {what} is truncated: the peer sent {have} of {need} bytes")]
    Truncated { what: &'static str, have: usize, need: usize },
    #[error("frame {what} is over its limit ({len} > {max})")]
    FieldTooLong { what: &'static str, len: usize, max: usize },
    #[error("frame has {extra} bytes after its last field")]
    Trailing { extra: usize },
    #[error("frame field {what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("refusal reason code {code} is unknown")]
    UnknownReason { code: u8 },
    #[error("the session ended inside a frame ({have} bytes of it buffered)")]
    EndedMidFrame { have: usize },
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Prove { request: u32, initiator: String, responder: String, chain: Vec<Vec<u8>>, signature: Vec<u8> },
    Proof { request: u32, chain: Vec<Vec<u8>>, signature: Vec<u8> },
    Refuse { request: u32, reason: Refusal },
    Confirm { request: u32 },
}

// === impl Frame ===

impl Frame {
    /// Appends the encoded frame to `out`. Fields beyond their limits are the
    /// caller's bug; they are encoded anyway and the peer refuses them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(self.kind());
        out.extend_from_slice(&[0; 4]);
        match self {
            Self::Prove { request, initiator, responder, chain, signature } => {
                out.extend_from_slice(&request.to_be_bytes());
                put_bytes16(out, initiator.as_bytes());
                put_bytes16(out, responder.as_bytes());
                put_chain(out, chain);
                put_bytes16(out, signature);
            }
            Self::Proof { request, chain, signature } => {
                out.extend_from_slice(&request.to_be_bytes());
                put_chain(out, chain);
                put_bytes16(out, signature);
            }
            Self::Refuse { request, reason } => {
                out.extend_from_slice(&request.to_be_bytes());
                out.push(reason.code());
            }
            Self::Confirm { request } => out.extend_from_slice(&request.to_be_bytes()),
        }
        let len = (out.len() - start - HEADER) as u32;
        out[start + 1..start + HEADER].copy_from_slice(&len.to_be_bytes());
    }

    fn kind(&self) -> u8 {
        match self {
            Self::Prove { .. } => KIND_PROVE,
            Self::Proof { .. } => KIND_PROOF,
            Self::Refuse { .. } => KIND_REFUSE,
            Self::Confirm { .. } => KIND_CONFIRM,
        }
    }

    /// The request id the frame is about.
    pub fn request(&self) -> u32 {
        match self {
            Self::Prove { request, .. } | Self::Proof { request, .. } | Self::Refuse { request, .. } | Self::Confirm { request } => {
                *request
            }
        }
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes
    /// are needed, else the frame and how many bytes it used. The header is
    /// checked before the payload arrives, so an oversized frame is refused
    /// without buffering it.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        if !(KIND_PROVE..=KIND_CONFIRM).contains(&kind) {
            return Err(FrameError::UnknownKind { kind });
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::Oversized { len });
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let mut r = Reader { buf: &buf[HEADER..HEADER + len] };
        let request = r.u32("request")?;
        let frame = match kind {
            KIND_PROVE => Self::Prove {
                request,
                initiator: r.str16("initiator")?,
                responder: r.str16("responder")?,
                chain: r.chain()?,
                signature: r.bytes16("signature", MAX_SIGNATURE)?,
            },
            KIND_PROOF => Self::Proof { request, chain: r.chain()?, signature: r.bytes16("signature", MAX_SIGNATURE)? },
            KIND_REFUSE => {
                let code = r.u8("reason")?;
                Self::Refuse { request, reason: Refusal::from_code(code).ok_or(FrameError::UnknownReason { code })? }
            }
            _ => Self::Confirm { request },
        };
        if !r.buf.is_empty() {
            return Err(FrameError::Trailing { extra: r.buf.len() });
        }
        Ok(Some((frame, HEADER + len)))
    }
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
}

fn put_chain(out: &mut Vec<u8>, chain: &[Vec<u8>]) {
    out.push(chain.len().min(u8::MAX as usize) as u8);
    for c in chain.iter().take(u8::MAX as usize) {
        put_bytes16(out, c);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated { what, have: self.buf.len(), need: n });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(what, 1)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        let b = self.take(what, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes16(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, FrameError> {
        let b = self.take(what, 2)?;
        let len = u16::from_be_bytes([b[0], b[1]]) as usize;
        if len > max {
            return Err(FrameError::FieldTooLong { what, len, max });
        }
        Ok(self.take(what, len)?.to_vec())
    }

    fn str16(&mut self, what: &'static str) -> Result<String, FrameError> {
        let b = self.bytes16(what, meshguard_common::spiffe::MAX_SPIFFE_ID_LEN)?;
        String::from_utf8(b).map_err(|_| FrameError::NotUtf8 { what })
    }

    fn chain(&mut self) -> Result<Vec<Vec<u8>>, FrameError> {
        let count = self.u8("chain length")? as usize;
        if count > MAX_CHAIN {
            return Err(FrameError::FieldTooLong { what: "chain", len: count, max: MAX_CHAIN });
        }
        (0..count).map(|_| self.bytes16("certificate", MAX_CERT)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Prove {
                request: 7,
                initiator: "spiffe://td/ns/a/sa/x".into(),
                responder: "spiffe://td/ns/b/sa/y".into(),
                chain: vec![vec![1; 300], vec![2; 10]],
                signature: vec![9; 72],
            },
            Frame::Proof { request: u32::MAX, chain: vec![vec![3; 5]], signature: vec![4; 64] },
            Frame::Refuse { request: 1, reason: Refusal::WrongSpiffeId },
            Frame::Confirm { request: 0 },
        ]
    }

    #[test]
    fn round_trips_and_needs_whole_frames() {
        for f in all() {
            let mut b = Vec::new();
            f.encode(&mut b);
            for cut in 0..b.len() {
                assert_eq!(Frame::decode(&b[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            b.extend_from_slice(b"next");
            let (g, used) = Frame::decode(&b).unwrap().unwrap();
            assert_eq!((g, used), (f, b.len() - 4));
        }
    }

    #[test]
    fn refuses_what_breaks_a_rule() {
        // Oversized: refused from the header alone.
        let mut h = vec![KIND_PROVE];
        h.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert_eq!(Frame::decode(&h), Err(FrameError::Oversized { len: MAX_FRAME + 1 }));
        assert_eq!(Frame::decode(&[0x16, 3, 1, 0, 5]), Err(FrameError::UnknownKind { kind: 0x16 }));
        // A length field that promises more than the frame holds.
        let mut b = vec![KIND_PROOF, 0, 0, 0, 7];
        b.extend_from_slice(&[0, 0, 0, 1, 1, 0xff, 0xff]);
        assert!(matches!(Frame::decode(&b), Err(FrameError::FieldTooLong { what: "certificate", .. })));
        let mut b = vec![KIND_PROOF, 0, 0, 0, 8];
        b.extend_from_slice(&[0, 0, 0, 1, 1, 0, 9, 0]);
        assert!(matches!(Frame::decode(&b), Err(FrameError::Truncated { what: "certificate", .. })));
        // Too many certificates.
        let mut b = vec![KIND_PROOF, 0, 0, 0, 5];
        b.extend_from_slice(&[0, 0, 0, 1, (MAX_CHAIN + 1) as u8]);
        assert!(matches!(Frame::decode(&b), Err(FrameError::FieldTooLong { what: "chain", .. })));
        // Trailing bytes, unknown reasons, bad UTF-8.
        assert_eq!(Frame::decode(&[KIND_CONFIRM, 0, 0, 0, 5, 0, 0, 0, 1, 0]), Err(FrameError::Trailing { extra: 1 }));
        assert_eq!(Frame::decode(&[KIND_REFUSE, 0, 0, 0, 5, 0, 0, 0, 1, 250]), Err(FrameError::UnknownReason { code: 250 }));
        let b = [KIND_PROVE, 0, 0, 0, 8, 0, 0, 0, 1, 0, 2, 0xc3, 0x28];
        assert_eq!(Frame::decode(&b), Err(FrameError::NotUtf8 { what: "initiator" }));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: every prefix of every mutation decodes
        // to a frame, a need for more, or an error.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for f in all() {
            let mut b = Vec::new();
            f.encode(&mut b);
            for _ in 0..2000 {
                let mut m = b.clone();
                let i = (next() as usize) % m.len();
                m[i] = next() as u8;
                let _ = Frame::decode(&m);
            }
        }
    }
}
