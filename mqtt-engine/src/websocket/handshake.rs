//! The WebSocket opening handshake (RFC 6455 section 4.2): one HTTP
//! upgrade request read (at most 8 KiB), checked and answered, the MQTT
//! subprotocol chosen, and optionally the browser's origin checked.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::WebSocket;

/// The request line and the headers, blank line included, must fit in this.
pub(super) const MAX_HEAD: usize = 8 * 1024;
/// RFC 6455 section 1.3: appended to the client's key for the accept key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

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
pub(super) enum Subprotocol {
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
pub(super) fn accept_key(key: &[u8]) -> String {
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key);
    sha1.update(GUID);
    base64(sha1.finish().as_ref())
}

/// Standard base64 with padding; only the 20 bytes of the accept key need
/// it, which is not worth a crate.
pub(super) fn base64(bytes: &[u8]) -> String {
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
    pub(super) fn name(self) -> Option<&'static str> {
        match self {
            Subprotocol::None => None,
            Subprotocol::Mqtt => Some("mqtt"),
            Subprotocol::Mqtt31 => Some("mqttv3.1"),
        }
    }
}
