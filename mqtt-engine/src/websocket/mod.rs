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
//! The caller puts its own timeout around [`accept`].

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

#[cfg(test)]
mod tests;

/// The request line and the headers, blank line included, must fit in this.
const MAX_HEAD: usize = 8 * 1024;
/// The default cap on one incoming frame's payload: the largest MQTT
/// packet the broker would take, with room for its fixed header.
const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024 + 16;
/// The largest frame one `poll_write` makes, and how much may wait in the
/// write buffer before a write waits for it to drain.
const MAX_OUT_FRAME: usize = 64 * 1024;
/// One read from the stream when the bytes may be frame headers. On the
/// stack, so an idle connection waiting for its next frame holds nothing.
const READ_CHUNK: usize = 4 * 1024;
/// RFC 6455 section 1.3: appended to the client's key for the accept key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

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

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const FORBIDDEN: &[u8] = b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const UPGRADE_REQUIRED: &[u8] = b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n\
Connection: close\r\nContent-Length: 0\r\n\r\n";

/// Why an upgrade request was refused.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The stream failed, or closed before the request was complete.
    #[error("WebSocket handshake: {0}")]
    Io(#[from] io::Error),
    /// The request is not HTTP as expected.
    #[error("bad HTTP request: {0}")]
    BadRequest(&'static str),
    /// An HTTP request without `Upgrade: websocket` and `Connection: upgrade`.
    #[error("not a WebSocket upgrade (Upgrade: websocket and Connection: upgrade expected)")]
    NotUpgrade,
    /// A `Sec-WebSocket-Version` other than 13, or none (answered with 426).
    #[error("unsupported Sec-WebSocket-Version {0:?} (13 expected)")]
    UnsupportedVersion(String),
    /// No `Sec-WebSocket-Key`, several, or one that is not base64 of 16 bytes.
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    /// The client offers subprotocols, but neither `mqtt` nor `mqttv3.1`.
    #[error("no MQTT WebSocket subprotocol offered (mqtt or mqttv3.1 expected)")]
    NoSubprotocol,
    /// The request line and headers take more than 8 KiB.
    #[error("HTTP request headers over 8 KiB")]
    HeadersTooLarge,
    /// A browser page from a site not in the allowed origins (answered 403).
    #[error("Origin {0:?} is not an allowed origin (ws_origins)")]
    OriginNotAllowed(String),
}

/// The subprotocol agreed on; a byte rather than a `&str` in every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subprotocol {
    None,
    Mqtt,
    Mqtt31,
}

/// Reads the HTTP upgrade request from `stream` (at most 8 KiB of headers),
/// answers it, and returns the stream framed as WebSocket.
///
/// A request that cannot be upgraded gets a short `400 Bad Request` (or
/// `426 Upgrade Required` for a version other than 13) and the error says
/// why. Any path is accepted. Bytes the client sent after the request are
/// kept for the first reads.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Result<WebSocket<S>, WsError> {
    accept_from(stream, &[]).await
}

/// [`accept`], refusing (403) a request whose `Origin` header is not one of
/// `origins`, when that list is not empty. Browsers send `Origin` with
/// every WebSocket request, so a page from another site cannot use a
/// LAN user's browser to reach the broker; other clients (paho, Node-RED)
/// send none and are not concerned.
pub async fn accept_from<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    origins: &[String],
) -> Result<WebSocket<S>, WsError> {
    let mut head = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(
                io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the request's end").into()
            );
        }
        // The blank line may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + at + 4;
        }
        if head.len() >= MAX_HEAD {
            break usize::MAX;
        }
    };
    let answer = if end > MAX_HEAD { Err(WsError::HeadersTooLarge) } else { upgrade(&head[..end], origins) };
    let (response, subprotocol) = match answer {
        Ok(answer) => answer,
        Err(e) => {
            let refusal = match e {
                WsError::UnsupportedVersion(_) => UPGRADE_REQUIRED,
                WsError::OriginNotAllowed(_) => FORBIDDEN,
                _ => BAD_REQUEST,
            };
            // Best effort: the request is refused whether or not this gets out.
            if stream.write_all(refusal).await.is_ok() {
                let _ = stream.flush().await;
            }
            return Err(e);
        }
    };
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await?;
    let mut ws = WebSocket::new(stream, subprotocol);
    // A client may send its first frame (CONNECT) right behind the request.
    if let Some(rest) = head.get(end..).filter(|rest| !rest.is_empty()) {
        ws.rbuf.extend_from_slice(rest);
    }
    Ok(ws)
}

/// Checks the request (the bytes up to its blank line) and makes the
/// `101 Switching Protocols` answer.
fn upgrade(head: &[u8], origins: &[String]) -> Result<(String, Subprotocol), WsError> {
    let mut lines = head.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line: Vec<&[u8]> = lines.next().unwrap_or_default().split(|&b| b == b' ').collect();
    if !matches!(request_line[..], [b"GET", path, b"HTTP/1.1"] if !path.is_empty()) {
        return Err(WsError::BadRequest("the request line is not GET <path> HTTP/1.1"));
    }
    let (mut upgrade, mut connection, mut version, mut key) = (false, false, None, None);
    let (mut offered, mut mqtt, mut mqtt31) = (false, false, false);
    let mut origin = None;
    for line in lines.filter(|line| !line.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(WsError::BadRequest("a header line without a colon"));
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        // Headers may repeat: token lists then add up (RFC 9110 section 5.3).
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        } else if name.eq_ignore_ascii_case(b"sec-websocket-version") {
            version = Some(value);
        } else if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            if key.replace(value).is_some() {
                return Err(WsError::BadKey);
            }
        } else if name.eq_ignore_ascii_case(b"origin") {
            origin = Some(value);
        } else if name.eq_ignore_ascii_case(b"sec-websocket-protocol") {
            for token in tokens(value) {
                offered = true;
                // Subprotocol names are case-sensitive, and the answer must
                // repeat one of the client's exactly.
                mqtt |= token == b"mqtt";
                mqtt31 |= token == b"mqttv3.1";
            }
        }
    }
    if !upgrade || !connection {
        return Err(WsError::NotUpgrade);
    }
    if version != Some(b"13".as_slice()) {
        let shown = String::from_utf8_lossy(version.unwrap_or_default());
        return Err(WsError::UnsupportedVersion(shown.chars().take(16).collect()));
    }
    let key = key.filter(|key| is_key(key)).ok_or(WsError::BadKey)?;
    if let Some(origin) = origin.filter(|_| !origins.is_empty()) {
        // Origins are ASCII serialisations (scheme://host[:port]).
        if !origins.iter().any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin)) {
            let shown = String::from_utf8_lossy(origin);
            return Err(WsError::OriginNotAllowed(shown.chars().take(100).collect()));
        }
    }
    let subprotocol = match (mqtt, mqtt31, offered) {
        (true, _, _) => Subprotocol::Mqtt,
        (false, true, _) => Subprotocol::Mqtt31,
        (false, false, false) => Subprotocol::None,
        (false, false, true) => return Err(WsError::NoSubprotocol),
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(name) = subprotocol.name() {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(name);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Ok((response, subprotocol))
}

/// The non-empty items of a comma-separated header value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// Whether `key` is base64 of 16 bytes: 22 characters and `==`.
fn is_key(key: &[u8]) -> bool {
    key.len() == 24 && key.ends_with(b"==") && key[..22].iter().all(|c| BASE64.contains(c))
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
fn accept_key(key: &[u8]) -> String {
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key);
    sha1.update(GUID);
    base64(sha1.finish().as_ref())
}

/// Standard base64 with padding; only the 20 bytes of the accept key need
/// it, which is not worth a crate.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let mut three = [0u8; 3];
        three[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from(three[0]) << 16 | u32::from(three[1]) << 8 | u32::from(three[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Subprotocol {
    fn name(self) -> Option<&'static str> {
        match self {
            Subprotocol::None => None,
            Subprotocol::Mqtt => Some("mqtt"),
            Subprotocol::Mqtt31 => Some("mqttv3.1"),
        }
    }
}

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
