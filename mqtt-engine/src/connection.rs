//! Framing: bytes from a socket to packets, and packets to bytes.
//!
//! A [`PacketReader`] owns the read buffer. It reads the fixed header,
//! checks the announced size against the maximum packet size *before*
//! reserving room for the body (a client cannot make the broker allocate by
//! announcing 256 MiB), then decodes. A clean close between packets is
//! `Ok(None)`, an expected state, not an error. Reading is cancellation
//! safe, so a client task can wait on it in a `select!` beside its mailbox.
//!
//! A [`PacketWriter`] encodes into a buffer and writes it out on `flush`,
//! so a burst of deliveries becomes one system call.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::packet::{self, DecodeError, Packet, Protocol, ReasonCode};

/// Why a connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes were not a valid packet.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The peer closed the connection in the middle of a packet.
    #[error("the connection closed in the middle of a packet")]
    Truncated,
}

impl ConnectionError {
    /// The reason code a DISCONNECT (or CONNACK) should carry, if any.
    pub fn reason(&self) -> Option<ReasonCode> {
        match self {
            ConnectionError::Decode(e) => Some(e.reason),
            _ => None,
        }
    }
}

/// Read sizes adapt between these: an idle connection holds a small buffer
/// (a thousand idle clients cost little memory), a busy one reads in large
/// chunks (few system calls).
const MIN_READ: usize = 256;
const MAX_READ: usize = 64 * 1024;

/// Bytes read from a peer and not yet decoded, with the framing rules.
///
/// It does not own the stream, so a connection can wait for input beside
/// other things in one small poll function instead of a future per wait.
#[derive(Debug)]
pub(crate) struct Inbox {
    buffer: BytesMut,
    /// How much room the next read gets.
    read_size: u32,
    /// Bytes of the packets decoded since [`take_consumed`](Self::take_consumed).
    consumed: u32,
}

impl Inbox {
    pub(crate) fn new() -> Self {
        Inbox { buffer: BytesMut::new(), read_size: MIN_READ as u32, consumed: 0 }
    }

    /// Reads until a whole packet is buffered and decodes it; `None` when
    /// the peer closed cleanly between packets.
    pub(crate) fn poll_packet<R: AsyncRead + ?Sized>(
        &mut self,
        mut stream: Pin<&mut R>,
        cx: &mut Context<'_>,
        max_packet_size: usize,
        version: Option<Protocol>,
    ) -> Poll<Result<Option<Packet>, ConnectionError>> {
        loop {
            if let Some(packet) = self.parse(max_packet_size, version)? {
                return Poll::Ready(Ok(Some(packet)));
            }
            if ready!(self.poll_fill(stream.as_mut(), cx))? == 0 {
                return Poll::Ready(if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnectionError::Truncated)
                });
            }
        }
    }

    /// One read into the buffer; 0 at the end of the stream.
    fn poll_fill<R: AsyncRead + ?Sized>(
        &mut self,
        stream: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let read_size = self.read_size as usize;
        if self.buffer.is_empty() && self.buffer.capacity() > 4 * read_size {
            // Back to a small buffer once a burst is over.
            self.buffer = BytesMut::new();
        }
        if self.buffer.capacity() - self.buffer.len() < read_size {
            self.buffer.reserve(read_size);
        }
        let room = self.buffer.capacity() - self.buffer.len();
        let n = ready!(tokio_util::io::poll_read_buf(stream, cx, &mut self.buffer))?;
        if n >= room {
            self.read_size = (read_size * 2).min(MAX_READ) as u32;
        } else if n < read_size / 4 {
            self.read_size = (read_size / 2).max(MIN_READ) as u32;
        }
        Poll::Ready(Ok(n))
    }

    /// Whether bytes of a further packet are already buffered.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Whether a whole packet is already buffered: a connection can then
    /// answer it before flushing, so a burst of packets costs one write.
    pub(crate) fn has_complete_packet(&self) -> bool {
        matches!(self.header(), Ok(Some((h, b))) if self.buffer.len() >= h + b)
    }

    /// Bytes of the packets decoded since the last call.
    pub(crate) fn take_consumed(&mut self) -> u32 {
        std::mem::take(&mut self.consumed)
    }

    /// Gives the buffer back to the allocator when it holds nothing: an
    /// idle connection then keeps no read buffer at all.
    pub(crate) fn release(&mut self) {
        if self.buffer.is_empty() {
            self.buffer = BytesMut::new();
        }
    }

    /// A whole packet from the buffer, if one is there.
    fn parse(
        &mut self,
        max_packet_size: usize,
        version: Option<Protocol>,
    ) -> Result<Option<Packet>, ConnectionError> {
        let Some((header_len, body_len)) = self.header()? else { return Ok(None) };
        let total = header_len + body_len;
        if total > max_packet_size {
            return Err(
                DecodeError::new(ReasonCode::PACKET_TOO_LARGE, "a packet larger than the maximum").into()
            );
        }
        if self.buffer.len() < total {
            self.buffer.reserve(total - self.buffer.len());
            return Ok(None);
        }
        let first = self.buffer[0];
        self.consumed = self.consumed.saturating_add(total as u32);
        self.buffer.advance(header_len);
        let body = self.buffer.split_to(body_len).freeze();
        Ok(Some(packet::decode(first, body, version)?))
    }

    /// The fixed header's length and the remaining length, once complete.
    fn header(&self) -> Result<Option<(usize, usize)>, DecodeError> {
        let mut value = 0usize;
        for i in 1..=4 {
            let Some(&byte) = self.buffer.get(i) else { return Ok(None) };
            value |= usize::from(byte & 0x7f) << (7 * (i - 1));
            if byte & 0x80 == 0 {
                return Ok(Some((i + 1, value)));
            }
        }
        Err(DecodeError::new(ReasonCode::MALFORMED_PACKET, "a remaining length longer than four bytes"))
    }
}

/// Encoded packets waiting to be written, so a burst of deliveries becomes
/// one system call. Like [`Inbox`], it does not own the stream.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    buffer: BytesMut,
    /// How much of the buffer is written already.
    written: usize,
    /// Bytes were written and the stream not flushed since (TLS keeps
    /// records until flushed).
    unflushed: bool,
    /// The size of the buffer when it was last released: it comes back at
    /// that size, so a busy connection does not grow it packet by packet
    /// after every release.
    last_size: u32,
}

impl Outbox {
    /// Queues `packet`; nothing is sent before [`poll_flush`](Self::poll_flush).
    pub(crate) fn queue(&mut self, packet: &Packet, version: Protocol) {
        if self.buffer.capacity() == 0 && self.last_size > 0 {
            self.buffer.reserve(self.last_size as usize);
        }
        packet::encode(packet, version, &mut self.buffer);
    }

    /// Bytes queued and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.buffer.len() - self.written
    }

    /// Writes everything queued, then flushes the stream.
    pub(crate) fn poll_flush<W: AsyncWrite + ?Sized>(
        &mut self,
        mut stream: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < self.buffer.len() {
            let n = ready!(stream.as_mut().poll_write(cx, &self.buffer[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.unflushed = true;
        }
        self.buffer.clear();
        self.written = 0;
        if self.unflushed {
            ready!(stream.poll_flush(cx))?;
            self.unflushed = false;
            if self.buffer.capacity() > MAX_READ {
                // A burst is over: do not keep its buffer.
                self.buffer = BytesMut::new();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Gives the buffer back to the allocator when everything was written:
    /// an idle connection then keeps no write buffer at all.
    pub(crate) fn release(&mut self) {
        if self.buffer.is_empty() && self.buffer.capacity() > 0 {
            self.last_size = self.buffer.capacity().min(MAX_READ) as u32;
            self.buffer = BytesMut::new();
        }
    }
}

/// The size `packet` takes encoded for `version`.
pub(crate) fn encoded_len(packet: &Packet, version: Protocol) -> usize {
    let mut scratch = BytesMut::new();
    packet::encode(packet, version, &mut scratch);
    scratch.len()
}

/// The reading half of a connection.
pub struct PacketReader<R> {
    stream: R,
    inbox: Inbox,
    max_packet_size: usize,
    /// Known once CONNECT has been read.
    pub version: Option<Protocol>,
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    /// A reader refusing packets larger than `max_packet_size` bytes.
    pub fn new(stream: R, max_packet_size: usize) -> Self {
        PacketReader { stream, inbox: Inbox::new(), max_packet_size, version: None }
    }

    /// The next packet, or `None` when the peer closed cleanly between packets.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        let PacketReader { stream, inbox, max_packet_size, version } = self;
        std::future::poll_fn(|cx| inbox.poll_packet(Pin::new(&mut *stream), cx, *max_packet_size, *version))
            .await
    }

    /// Whether bytes of a further packet are already buffered.
    pub fn has_buffered(&self) -> bool {
        self.inbox.has_buffered()
    }

    /// Whether a whole packet is already buffered: a connection can then
    /// answer it before flushing, so a burst of packets costs one write.
    pub fn has_complete_packet(&self) -> bool {
        self.inbox.has_complete_packet()
    }
}

/// The writing half of a connection.
pub struct PacketWriter<W> {
    stream: W,
    outbox: Outbox,
    /// The version packets are encoded for.
    pub version: Protocol,
}

impl<W: AsyncWrite + Unpin> PacketWriter<W> {
    /// A writer encoding for `version` (3.1.1 until CONNECT says otherwise).
    pub fn new(stream: W) -> Self {
        PacketWriter { stream, outbox: Outbox::default(), version: Protocol::V311 }
    }

    /// Queues `packet`; nothing is sent before [`flush`](Self::flush).
    pub fn queue(&mut self, packet: &Packet) {
        self.outbox.queue(packet, self.version);
    }

    /// The size `packet` would take, to respect a client's maximum packet size.
    pub fn encoded_len(&self, packet: &Packet) -> usize {
        encoded_len(packet, self.version)
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.outbox.pending()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        let PacketWriter { stream, outbox, .. } = self;
        std::future::poll_fn(|cx| outbox.poll_flush(Pin::new(&mut *stream), cx)).await
    }

    /// Flushes, then shuts the stream down; gives up after a second (a peer
    /// that does not read must not hold the connection's task).
    pub async fn close(&mut self) {
        let limit = std::time::Duration::from_secs(1);
        let _ = tokio::time::timeout(limit, async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn packets_split_across_reads_are_reassembled() {
        let (client, server) = tokio::io::duplex(64);
        let mut reader = PacketReader::new(server, 1024);
        reader.version = Some(Protocol::V311);
        let mut client = client;
        let bytes = [0xc0, 0x00, 0x30, 0x05, 0, 1, b't', b'h', b'i'];
        for chunk in bytes.chunks(2) {
            client.write_all(chunk).await.unwrap();
        }
        drop(client);
        assert_eq!(reader.read_packet().await.unwrap(), Some(Packet::Pingreq));
        assert!(matches!(reader.read_packet().await.unwrap(), Some(Packet::Publish(_))));
        assert_eq!(reader.read_packet().await.unwrap(), None, "a clean close between packets");
    }

    #[tokio::test]
    async fn an_oversized_packet_is_refused_from_its_header_alone() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = PacketReader::new(server, 1024);
        // Announces 268 MB; only the header is ever sent.
        client.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await.unwrap();
        let err = reader.read_packet().await.unwrap_err();
        assert_eq!(err.reason(), Some(ReasonCode::PACKET_TOO_LARGE));
        assert!(reader.inbox.buffer.capacity() < 1 << 20, "nothing was allocated for the body");
    }

    #[tokio::test]
    async fn a_close_inside_a_packet_is_an_error() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = PacketReader::new(server, 1024);
        client.write_all(&[0x30, 0x05, 0, 1]).await.unwrap();
        drop(client);
        assert!(matches!(reader.read_packet().await, Err(ConnectionError::Truncated)));
    }
}
