//! Lets every mainstream gRPC client reach the Workload API over its unix
//! socket. gRPC C-core (Python's `spiffe`, C++, Ruby, PHP), grpc-java and
//! grpc-swift send the socket's path, percent-encoded, as the `:authority`
//! of each request (`tmp%2Fagent.sock`); the HTTP/2 layer under tonic (h2)
//! refuses such a request as malformed (RST_STREAM PROTOCOL_ERROR) before
//! any handler runs. SPIRE's agent serves them all.
//!
//! So, on this socket only, the client's header blocks are re-encoded on
//! their way in: every field as the client sent it, except an `:authority`
//! that is not a valid URI authority, which becomes `localhost` (what
//! grpc-go sends on a unix socket). Nothing the handler checks changes: the
//! `workload.spiffe.io` header, the caller's process and pod.
//!
//! The client compresses headers with HPACK against the server's decoder
//! state, so the blocks are decoded here with a decoder that follows the
//! client's dynamic table, and re-encoded as literals without indexing
//! (which never touch h2's table), split to the default 16 KiB frame size.
//! All other frames pass unchanged. A frame or a header block that does not
//! parse ends the connection with an error; nothing reaches the server.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The client connection preface (RFC 9113, 3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame the server accepts before it says otherwise (h2's default).
const MAX_FRAME: usize = 16_384;
/// The largest header block accepted across HEADERS and CONTINUATION frames.
const MAX_BLOCK: usize = 64 * 1024;
/// What replaces an unusable `:authority`.
const LOCALHOST: &[u8] = b"localhost";

/// A header block in progress: stream, flags of its HEADERS frame, priority
/// bytes, fragments so far.
type Block = (u32, u8, Option<[u8; 5]>, Vec<u8>);

/// Rewrites the client → server byte stream (see the module docs).
pub struct AuthorityFix {
    decoder: hpack::Decoder<'static>,
    preface_left: usize,
    /// Raw bytes not yet a whole frame.
    input: Vec<u8>,
    /// Rewritten bytes not yet read by the server.
    output: Vec<u8>,
    block: Option<Block>,
    /// Authorities rewritten (for the log, once).
    pub rewritten: u64,
}

impl Default for AuthorityFix {
    fn default() -> Self {
        Self { decoder: hpack::Decoder::new(), preface_left: PREFACE_LEN, input: Vec::new(), output: Vec::new(), block: None, rewritten: 0 }
    }
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl AuthorityFix {
    /// Takes bytes read from the client; what can be passed on goes to the output.
    pub fn push(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(bytes.len());
            self.output.extend_from_slice(&bytes[..n]);
            self.preface_left -= n;
            bytes = &bytes[n..];
        }
        self.input.extend_from_slice(bytes);
        let mut at = 0;
        while self.input.len() - at >= FRAME_HEADER {
            let h = &self.input[at..at + FRAME_HEADER];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if len > MAX_FRAME {
                return Err(bad(format!("HTTP/2 frame of {len} bytes is over the {MAX_FRAME}-byte limit")));
            }
            if self.input.len() - at < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let end = at + FRAME_HEADER + len;
            match kind {
                HEADERS => {
                    let payload = self.input[at + FRAME_HEADER..end].to_vec();
                    self.headers(stream, flags, &payload)?;
                }
                CONTINUATION => {
                    let payload = self.input[at + FRAME_HEADER..end].to_vec();
                    self.continuation(stream, flags, &payload)?;
                }
                _ if self.block.is_some() => return Err(bad("a frame interrupted a header block")),
                _ => self.output.extend_from_slice(&self.input[at..end]),
            }
            at = end;
        }
        self.input.drain(..at);
        Ok(())
    }

    fn headers(&mut self, stream: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        if self.block.is_some() {
            return Err(bad("HEADERS inside a header block"));
        }
        let mut p = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            pad = usize::from(*p.first().ok_or_else(|| bad("padded HEADERS without a pad length"))?);
            p = &p[1..];
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let b: [u8; 5] = p.get(..5).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("HEADERS too short for its priority"))?;
            priority = Some(b);
            p = &p[5..];
        }
        let fragment = p.len().checked_sub(pad).map(|n| &p[..n]).ok_or_else(|| bad("HEADERS padding longer than the frame"))?;
        self.block = Some((stream, flags, priority, fragment.to_vec()));
        if flags & END_HEADERS != 0 {
            self.finish()?;
        }
        Ok(())
    }

    fn continuation(&mut self, stream: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        let Some((s, _, _, block)) = self.block.as_mut() else {
            return Err(bad("CONTINUATION without HEADERS"));
        };
        if *s != stream {
            return Err(bad("CONTINUATION on another stream"));
        }
        if block.len() + payload.len() > MAX_BLOCK {
            return Err(bad(format!("header block over {MAX_BLOCK} bytes")));
        }
        block.extend_from_slice(payload);
        if flags & END_HEADERS != 0 {
            self.finish()?;
        }
        Ok(())
    }

    /// Decodes a whole header block, fixes `:authority`, writes it out again.
    fn finish(&mut self) -> io::Result<()> {
        let (stream, flags, priority, block) = self.block.take().expect("a block in progress");
        let mut fields = self.decoder.decode(&block).map_err(|e| bad(format!("header block does not decode: {e:?}")))?;
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = LOCALHOST.to_vec();
                self.rewritten += 1;
            }
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        if let Some(p) = priority {
            out.extend_from_slice(&p);
        }
        for (name, value) in &fields {
            // Literal header field without indexing, new name (RFC 7541, 6.2.2).
            out.push(0);
            string(&mut out, name);
            string(&mut out, value);
        }
        let head_flags = (flags & END_STREAM) | if priority.is_some() { PRIORITY } else { 0 };
        let mut chunks = out.chunks(MAX_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let (kind, mut f) = if first { (HEADERS, head_flags) } else { (CONTINUATION, 0) };
            if last {
                f |= END_HEADERS;
            }
            frame(&mut self.output, kind, f, stream, chunk);
            first = false;
        }
        Ok(())
    }

    /// Moves rewritten bytes into `buf`; how many.
    pub fn take(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let n = self.output.len().min(buf.remaining());
        buf.put_slice(&self.output[..n]);
        self.output.drain(..n);
        n
    }
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits `first`.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A string literal, not Huffman coded.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads through an [`AuthorityFix`].
pub fn poll_read_fixed<R: AsyncRead + Unpin>(
    inner: &mut R,
    fix: &mut AuthorityFix,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        if fix.take(buf) > 0 {
            return Poll::Ready(Ok(()));
        }
        let mut raw = [0u8; 8192];
        let mut rb = ReadBuf::new(&mut raw);
        match Pin::new(&mut *inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => {
                let before = fix.rewritten;
                fix.push(rb.filled())?;
                if before == 0 && fix.rewritten > 0 {
                    tracing::debug!("a client sent an unusable :authority (a socket path); read as localhost");
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn request(enc: &mut hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", authority),
            (b"workload.spiffe.io", b"true"),
            (b"content-type", b"application/grpc"),
        ])
    }

    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = usize::from(bytes[at]) << 16 | usize::from(bytes[at + 1]) << 8 | usize::from(bytes[at + 2]);
            let stream = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap());
            out.push((bytes[at + 3], bytes[at + 4], stream, bytes[at + 9..at + 9 + len].to_vec()));
            at += 9 + len;
        }
        out
    }

    fn run(fix: &mut AuthorityFix, input: &[u8]) -> Vec<u8> {
        // One byte at a time: frames split anywhere are put back together.
        for b in input {
            fix.push(std::slice::from_ref(b)).unwrap();
        }
        std::mem::take(&mut fix.output)
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_everything_else_passes() {
        let mut enc = hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        frame(&mut input, 0x4, 0, 0, &[]); // SETTINGS
        frame(&mut input, HEADERS, END_HEADERS, 1, &request(&mut enc, b"tmp%2Fagent.sock"));
        frame(&mut input, 0x0, END_STREAM, 1, b"\0\0\0\0\0"); // DATA
        // The second request names the authority through the client's
        // dynamic table: the decoder here must follow it.
        frame(&mut input, HEADERS, END_HEADERS | END_STREAM, 3, &request(&mut enc, b"tmp%2Fagent.sock"));
        frame(&mut input, HEADERS, END_HEADERS, 5, &request(&mut enc, b"localhost:8080"));
        let mut fix = AuthorityFix::default();
        let out = run(&mut fix, &input);
        assert_eq!(&out[..24], PREFACE);
        let got = frames(&out[24..]);
        assert_eq!(got.len(), 5);
        assert_eq!((got[0].0, got[2].0), (0x4, 0x0), "other frames unchanged");
        assert_eq!(got[2].3, b"\0\0\0\0\0");
        let mut dec = hpack::Decoder::new();
        for (i, want) in [(1, &b"localhost"[..]), (3, b"localhost"), (4, b"localhost:8080")] {
            let (kind, flags, _, block) = &got[i];
            assert_eq!(*kind, HEADERS);
            assert!(flags & END_HEADERS != 0);
            let fields = dec.decode(block).unwrap();
            let authority = fields.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(authority.1, want);
            assert!(fields.iter().any(|(n, v)| n == b"workload.spiffe.io" && v == b"true"), "the security header is kept");
            assert_eq!(fields.len(), 6);
        }
        assert_eq!(got[3].1 & END_STREAM, END_STREAM, "END_STREAM kept");
        assert_eq!(fix.rewritten, 2);
    }

    #[test]
    fn continuation_padding_and_priority_are_handled() {
        let mut enc = hpack::Encoder::new();
        let block = request(&mut enc, b"tmp%2Fa.sock");
        let (a, b) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, PADDED | PRIORITY, 1, &payload);
        frame(&mut input, CONTINUATION, END_HEADERS, 1, b);
        let mut fix = AuthorityFix::default();
        let got = frames(&run(&mut fix, &input)[24..]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, PRIORITY | END_HEADERS);
        assert_eq!(&got[0].3[..5], &[0, 0, 0, 0, 16]);
        let fields = hpack::Decoder::new().decode(&got[0].3[5..]).unwrap();
        assert!(fields.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut input = PREFACE.to_vec();
        let big = vec![b'x'; 40_000];
        let block = hpack::Encoder::new().encode(vec![(&b":authority"[..], &b"tmp%2Fa.sock"[..]), (b"x-big", &big)]);
        let (a, rest) = block.split_at(16_000);
        let (b, c) = rest.split_at(16_000);
        frame(&mut input, HEADERS, 0, 1, a);
        frame(&mut input, CONTINUATION, 0, 1, b);
        frame(&mut input, CONTINUATION, END_HEADERS, 1, c);
        let mut fix = AuthorityFix::default();
        let got = frames(&run(&mut fix, &input)[24..]);
        assert!(got.len() >= 3 && got.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(got[0].0, HEADERS);
        assert!(got[1..].iter().all(|f| f.0 == CONTINUATION));
        assert!(got[..got.len() - 1].iter().all(|f| f.1 & END_HEADERS == 0) && got.last().unwrap().1 & END_HEADERS != 0);
        let block: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        let fields = hpack::Decoder::new().decode(&block).unwrap();
        assert_eq!(fields[0].1, b"localhost");
        assert_eq!(fields[1].1.len(), 40_000);
    }

    #[test]
    fn bad_input_is_refused_and_nothing_of_it_passes() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage HPACK", {
                let mut v = Vec::new();
                frame(&mut v, HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
                v
            }),
            ("oversized frame", vec![0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]),
            ("CONTINUATION alone", {
                let mut v = Vec::new();
                frame(&mut v, CONTINUATION, END_HEADERS, 1, &[0x82]);
                v
            }),
            ("padding past the end", {
                let mut v = Vec::new();
                frame(&mut v, HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82]);
                v
            }),
            ("a DATA frame inside a header block", {
                let mut v = Vec::new();
                frame(&mut v, HEADERS, 0, 1, &[0x82]);
                frame(&mut v, 0x0, 0, 1, b"x");
                v
            }),
        ];
        for (what, bytes) in cases {
            let mut fix = AuthorityFix::default();
            fix.push(PREFACE).unwrap();
            fix.output.clear();
            assert!(fix.push(&bytes).is_err(), "{what} was accepted");
            assert!(fix.output.is_empty(), "{what}: something was passed on");
        }
    }
}
