//! MQTT over WebSocket (section 6 of MQTT 3.1.1 and 5.0): the server side
//! of RFC 6455, written by hand.
//!
//! MQTT needs little of WebSocket: one upgrade request, binary frames both
//! ways, ping, pong and close. A WebSocket crate would bring an HTTP stack
//! and its dependency tree for that; this module keeps the binary small and
//! an idle connection cheap: its read and write buffers are given back to
//! the allocator whenever they run empty.
//!
//! [`accept`] answers the upgrade request and returns a [`WebSocket`], a
//! byte stream like a `TcpStream`: what the client sends in binary frames
//! is read as one stream of bytes (an MQTT packet may span frames, a frame
//! may hold several packets), and every write becomes one binary frame.
//! The caller puts its own timeout around [`accept`]. `handshake.rs` holds
//! the upgrade; this file the framing.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod handshake;
#[cfg(test)]
mod tests;

use handshake::Subprotocol;
pub use handshake::{accept, accept_from, WsError};
#[cfg(test)]
use handshake::{accept_key, base64, MAX_HEAD};

/// The default cap on one incoming frame's payload: the largest MQTT
/// packet the broker would take, with room for its fixed header.
const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024 + 16;
/// The largest frame one `poll_write` makes, and how much may wait in the
/// write buffer before a write waits for it to drain.
const MAX_OUT_FRAME: usize = 64 * 1024;
/// One read from the stream when the bytes may be frame headers. On the
/// stack, so an idle connection waiting for its next frame holds nothing.
const READ_CHUNK: usize = 4 * 1024;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_TOO_BIG: u16 = 1009;

/// A stream framed as WebSocket, from [`accept`]: read and write it like
/// the stream it wraps.
///
/// Reads return the payload of the client's binary frames as one byte
/// stream, and `Ok(0)` once the client closed (its close frame is answered).
/// A breach of the protocol (an unmasked or text frame, a frame over
/// [`set_max_frame`](Self::set_max_frame)...) sends a close frame and fails
/// this read and the next ones with [`io::ErrorKind::InvalidData`].
///
/// Each write becomes one binary frame (of at most 64 KiB: a longer write
/// is cut short), buffered until `flush`. Pongs and close frames go out on
/// the next write, flush or read. `shutdown` sends a close frame first.
pub struct WebSocket<S> {
    io: S,
    /// Received bytes not yet returned: part of a header, or more frames.
    rbuf: BytesMut,
    /// Frames not yet written to `io`.
    wbuf: BytesMut,
    /// How much of the current data frame's payload is still to come.
    payload_left: u64,
    max_frame: usize,
    /// The current data frame's mask, and where its payload is in it.
    mask: [u8; 4],
    mask_offset: u8,
    subprotocol: Subprotocol,
    /// A binary message is open: continuation frames are expected.
    fragmented: bool,
    /// The client's close frame, or the end of the stream, was read.
    closed: bool,
    /// A close frame was queued: nothing more may be sent.
    close_sent: bool,
    /// A control frame was queued and the stream not flushed since.
    control_pending: bool,
    /// The protocol breach that ended reading.
    failed: Option<&'static str>,
}

/// A frame's header, once whole.
struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: [u8; 4],
    size: usize,
}

impl<S> WebSocket<S> {
    fn new(io: S, subprotocol: Subprotocol) -> Self {
        WebSocket {
            io,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            payload_left: 0,
            max_frame: DEFAULT_MAX_FRAME,
            mask: [0; 4],
            mask_offset: 0,
            subprotocol,
            fragmented: false,
            closed: false,
            close_sent: false,
            control_pending: false,
            failed: None,
        }
    }

    /// The subprotocol agreed on in the handshake: `mqtt`, `mqttv3.1`, or
    /// none if the client offered none.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.name()
    }

    /// The stream underneath, e.g. for its peer address.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Caps the payload of one incoming frame (16 MiB + 16 by default): a
    /// bigger frame is refused, with close code 1009, as soon as its header
    /// is read.
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max;
    }

    /// Decodes the frames in `input` into `out` until one or the other is
    /// used up; returns how many bytes of `input` were used. A breach of the
    /// protocol is left in `failed`.
    fn consume(&mut self, input: &mut [u8], out: &mut ReadBuf<'_>) -> usize {
        let mut pos = 0;
        while !self.closed && self.failed.is_none() {
            if self.payload_left > 0 {
                let n = clamp(self.payload_left, (input.len() - pos).min(out.remaining()));
                if n == 0 {
                    break;
                }
                let chunk = &mut input[pos..pos + n];
                unmask(chunk, self.mask, &mut self.mask_offset);
                out.put_slice(chunk);
                pos += n;
                self.payload_left -= n as u64;
                continue;
            }
            let header = match parse_header(&input[pos..]) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err((code, why)) => {
                    self.fail(code, why);
                    break;
                }
            };
            if header.opcode & 0x8 != 0 {
                // Control frames (125 bytes at most) are taken whole.
                let end = pos + header.size + clamp(header.len, usize::MAX);
                let Some(payload) = input.get_mut(pos + header.size..end) else { break };
                unmask(payload, header.mask, &mut 0);
                self.control(header.opcode, payload);
                pos = end;
                continue;
            }
            self.data_header(&header);
            if self.failed.is_none() {
                pos += header.size;
                self.payload_left = header.len;
                self.mask = header.mask;
                self.mask_offset = 0;
            }
        }
        pos
    }

    /// Checks a data frame's header against the message so far.
    fn data_header(&mut self, header: &Header) {
        match header.opcode {
            OP_BINARY if !self.fragmented => {}
            OP_CONTINUATION if self.fragmented => {}
            OP_TEXT => {
                return self.fail(CLOSE_UNSUPPORTED_DATA, "a text frame (MQTT is sent in binary frames)")
            }
            OP_BINARY | OP_CONTINUATION => return self.fail(CLOSE_PROTOCOL_ERROR, "a frame out of sequence"),
            _ => return self.fail(CLOSE_PROTOCOL_ERROR, "an unknown opcode"),
        }
        if header.len > self.max_frame as u64 {
            return self.fail(CLOSE_TOO_BIG, "a frame over the size limit");
        }
        self.fragmented = !header.fin;
    }

    /// Answers a ping or a close; `payload` is unmasked.
    fn control(&mut self, opcode: u8, payload: &[u8]) {
        match opcode {
            // A client that pings faster than it reads gets no more pongs
            // once the write buffer is full (RFC 6455 section 5.5.3 allows
            // answering only the latest).
            OP_PING if !self.close_sent && self.wbuf.len() < MAX_OUT_FRAME => self.queue(OP_PONG, payload),
            OP_PING | OP_PONG => {}
            OP_CLOSE if payload.len() == 1 => self.fail(CLOSE_PROTOCOL_ERROR, "a close frame of 1 byte"),
            OP_CLOSE => {
                self.closed = true;
                if !self.close_sent {
                    self.close_sent = true;
                    self.queue(OP_CLOSE, payload.get(..2).unwrap_or_default());
                }
            }
            _ => self.fail(CLOSE_PROTOCOL_ERROR, "an unknown control opcode"),
        }
    }

    /// Ends reading for a breach of the protocol, telling the client why.
    fn fail(&mut self, code: u16, why: &'static str) {
        if !self.close_sent {
            self.close_sent = true;
            self.queue(OP_CLOSE, &code.to_be_bytes());
        }
        self.failed = Some(why);
        self.rbuf = BytesMut::new();
    }

    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        put_frame(&mut self.wbuf, opcode, payload);
        self.control_pending = true;
    }
}

impl<S: AsyncWrite + Unpin> WebSocket<S> {
    /// Writes out the write buffer, then frees it.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        self.wbuf = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Sends queued pongs and close frames from the read side, so they get
    /// out even while the application only reads. Best effort: a write
    /// error is for the writer to see.
    fn flush_control(&mut self, cx: &mut Context<'_>) {
        if !self.control_pending {
            return;
        }
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => {
                if Pin::new(&mut self.io).poll_flush(cx).is_ready() {
                    self.control_pending = false;
                }
            }
            Poll::Ready(Err(_)) => self.control_pending = false,
            Poll::Pending => {}
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocket<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        loop {
            this.flush_control(cx);
            if let Some(why) = this.failed {
                return Poll::Ready(Err(protocol_error(why)));
            }
            if this.closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.rbuf.is_empty() {
                let mut input = std::mem::take(&mut this.rbuf);
                let used = this.consume(&mut input, buf);
                input.advance(used);
                // Back in place only if it still holds something: else the
                // empty buffer's memory goes back to the allocator.
                if !input.is_empty() && this.failed.is_none() {
                    this.rbuf = input;
                }
                if buf.filled().len() > start {
                    return Poll::Ready(Ok(()));
                }
                if this.closed || this.failed.is_some() {
                    continue;
                }
            }
            if this.payload_left > 0 && this.rbuf.is_empty() {
                // Straight into the reader's buffer, unmasked there: a large
                // payload is neither copied twice nor held here.
                let want = clamp(this.payload_left, buf.remaining());
                let n = {
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(want));
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut direct))?;
                    direct.filled().len()
                };
                if n == 0 {
                    return Poll::Ready(Err(truncated()));
                }
                unmask(buf.initialize_unfilled_to(n), this.mask, &mut this.mask_offset);
                buf.advance(n);
                this.payload_left -= n as u64;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let n = {
                let mut read = ReadBuf::new(&mut chunk);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                read.filled().len()
            };
            if n == 0 {
                if !this.rbuf.is_empty() || this.payload_left > 0 {
                    return Poll::Ready(Err(truncated()));
                }
                // Gone without a close frame: still the end of the stream.
                this.closed = true;
                continue;
            }
            if this.rbuf.is_empty() {
                // Decoded from the stack: only a partial frame is kept.
                let used = this.consume(&mut chunk[..n], buf);
                if used < n && !this.closed && this.failed.is_none() {
                    this.rbuf.extend_from_slice(&chunk[used..n]);
                }
                if buf.filled().len() > start {
                    return Poll::Ready(Ok(()));
                }
            } else {
                this.rbuf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WebSocket<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Back-pressure: a writer that never flushes does not grow the buffer
        // without bound.
        if this.wbuf.len() >= MAX_OUT_FRAME {
            ready!(this.poll_drain(cx))?;
        }
        let n = data.len().min(MAX_OUT_FRAME);
        put_frame(&mut this.wbuf, OP_BINARY, &data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        this.control_pending = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            this.queue(OP_CLOSE, &CLOSE_NORMAL.to_be_bytes());
        }
        ready!(Pin::new(&mut *this).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A frame's header from the start of `b`, `None` until it is all there.
/// The error is the close code and the reason.
fn parse_header(b: &[u8]) -> Result<Option<Header>, (u16, &'static str)> {
    let [b0, b1, ..] = *b else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err((CLOSE_PROTOCOL_ERROR, "reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err((CLOSE_PROTOCOL_ERROR, "an unmasked frame from a client"));
    }
    let (len, at) = match b1 & 0x7f {
        126 => match b.get(2..4).and_then(|x| <[u8; 2]>::try_from(x).ok()) {
            Some(x) => (u64::from(u16::from_be_bytes(x)), 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10).and_then(|x| <[u8; 8]>::try_from(x).ok()) {
            Some(x) => (u64::from_be_bytes(x), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len >> 63 != 0 {
        return Err((CLOSE_PROTOCOL_ERROR, "a 64-bit length with its top bit set"));
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    if opcode & 0x8 != 0 && (!fin || len > 125) {
        return Err((CLOSE_PROTOCOL_ERROR, "a fragmented or oversized control frame"));
    }
    let Some(mask) = b.get(at..at + 4).and_then(|x| <[u8; 4]>::try_from(x).ok()) else { return Ok(None) };
    Ok(Some(Header { fin, opcode, len, mask, size: at + 4 }))
}

/// Appends one unmasked, final frame (servers do not mask).
fn put_frame(buf: &mut BytesMut, opcode: u8, payload: &[u8]) {
    buf.reserve(10 + payload.len());
    buf.put_u8(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => buf.put_u8(len as u8),
        len @ 126..=0xffff => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        len => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
    buf.extend_from_slice(payload);
}

/// XORs `data` with `mask`, `offset` bytes into the payload, and moves the
/// offset past it: a payload may arrive in pieces.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: &mut u8) {
    let mut key = mask;
    key.rotate_left(usize::from(*offset & 3));
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        for (b, k) in chunk.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
    *offset = ((usize::from(*offset) + data.len()) & 3) as u8;
}

/// `len` as a `usize`, at most `max`.
fn clamp(len: u64, max: usize) -> usize {
    usize::try_from(len).map_or(max, |len| len.min(max))
}

fn protocol_error(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket protocol error: {why}"))
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed in the middle of a WebSocket frame")
}
