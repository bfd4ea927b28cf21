//! Idle connections parked outside tokio.
//!
//! A connection that runs as a tokio task costs its task (384 bytes for
//! ours) and tokio's registration of its socket (256): twice what
//! mosquitto spends on a whole idle client. Most connections of an edge
//! broker are idle nearly all the time (a sensor that publishes once a
//! minute, a dashboard that waits), so an idle connection does not stay a
//! task: it is parked here. Its socket goes into one epoll set of the
//! lot's own (no allocation per socket: the kernel keeps it), its client
//! state into a slab, and its session's mailbox is told to wake the lot
//! instead of a task. When its socket becomes readable (a packet, or the
//! peer leaving) or its mailbox is signalled (mail, a takeover, the keep
//! alive expiring, the broker stopping), the connection becomes a task
//! again and carries on where it stopped.
//!
//! When to park (`serve.rs` decides): a fresh connection at its first idle
//! moment after CONNACK, so a storm of connections never holds a task
//! each; a resumed one once a [`TICK`] passed without it doing anything,
//! found by a ticker that asks it, so a busy connection is not parked and
//! resumed at every message.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rustix::event::epoll;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::mailbox::Mailbox;
use super::serve::Parked;
use super::{Broker, Shared};

/// How often connections that were resumed are asked whether they did
/// anything since they were last asked; those that did not are parked.
pub(super) const TICK: Duration = Duration::from_secs(1);

/// A stream whose connection can be parked: plain TCP. TLS and WebSocket
/// streams keep state of their own above the socket (rustls' buffers and
/// keys), so they stay tasks.
pub trait Parkable: Sized {
    /// Whether the stream can be parked at all.
    const PARKABLE: bool = false;

    /// The socket, taken from tokio's reactor.
    fn into_socket(self) -> io::Result<std::net::TcpStream> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// The stream again, registered with tokio's reactor.
    fn from_socket(socket: std::net::TcpStream) -> io::Result<Self> {
        drop(socket);
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Parkable for TcpStream {
    const PARKABLE: bool = true;

    fn into_socket(self) -> io::Result<std::net::TcpStream> {
        // Deregistered from tokio; still non-blocking.
        self.into_std()
    }

    fn from_socket(socket: std::net::TcpStream) -> io::Result<Self> {
        TcpStream::from_std(socket)
    }
}

impl<T> Parkable for tokio_rustls::server::TlsStream<T> {}
impl<T> Parkable for crate::websocket::WebSocket<T> {}
impl<T: ?Sized> Parkable for std::pin::Pin<Box<T>> {}
impl Parkable for tokio::io::DuplexStream {}

/// A broker's parked connections.
pub(super) struct ParkingLot {
    /// The epoll set of the parked sockets, each under its token.
    epoll: AsyncFd<OwnedFd>,
    slab: Mutex<Slab>,
    /// How many are parked, for `$SYS` and tests.
    parked: AtomicUsize,
    /// Where resumed connections run, and are waited for at shutdown.
    tracker: TaskTracker,
    /// Resuming may be asked from outside the runtime.
    runtime: Handle,
    /// The broker the connections are resumed into (weak: the broker
    /// keeps the lot).
    broker: Weak<Shared>,
    /// Signalled when the last parked connection leaves.
    emptied: Notify,
    /// False once the lot stopped watching its sockets (its epoll failed,
    /// or the broker stopped): nothing parks any more.
    open: AtomicBool,
    asks: Mutex<Asks>,
}

/// Parked connections by index; a token is the index and the slot's
/// generation, so a late wake-up for a connection that left (and whose
/// slot was reused) finds nothing. Slots come in chunks that never move:
/// one vector doubling as it grows would leave the memory it moved from
/// behind, touched and kept by the allocator.
#[derive(Default)]
struct Slab {
    chunks: Vec<Box<[Slot]>>,
    free: Vec<u32>,
}

const CHUNK: usize = 64;

impl Slab {
    /// The slot of a token's index, if there is one.
    fn slot(&mut self, index: u32) -> Option<&mut Slot> {
        let index = index as usize;
        self.chunks.get_mut(index / CHUNK)?.get_mut(index % CHUNK)
    }

    /// A slot [`take_free`](Self::take_free) gave.
    fn slot_taken(&mut self, index: u32) -> &mut Slot {
        let index = index as usize;
        &mut self.chunks[index / CHUNK][index % CHUNK]
    }

    /// A free slot's index.
    fn take_free(&mut self) -> u32 {
        if let Some(index) = self.free.pop() {
            return index;
        }
        let first = self.chunks.len() * CHUNK;
        self.chunks.push((0..CHUNK).map(|_| Slot::default()).collect());
        // Taken from the end, so the chunk's first slot goes first.
        self.free.extend((first + 1..first + CHUNK).rev().map(|i| i as u32));
        first as u32
    }
}

#[derive(Default)]
struct Slot {
    generation: u32,
    parked: Option<Parked>,
}

fn token(index: u32, generation: u32) -> u64 {
    u64::from(generation) << 32 | u64::from(index)
}

/// Connections to ask at the next tick whether they are idle.
#[derive(Default)]
struct Asks {
    waiting: Vec<(Arc<Mailbox>, u64)>,
    /// Whether the ticker runs (it stops when nobody waits).
    ticking: bool,
}

impl ParkingLot {
    /// An empty lot for `broker`, watched by a task of the current runtime
    /// until the broker shuts down.
    pub(super) fn start(broker: &Broker) -> io::Result<Arc<Self>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // SAFETY: `register_with_interest` needs the descriptor open, and the
        // same, for as long as the AsyncFd lives. The AsyncFd owns the
        // OwnedFd, which closes it only when dropped (with the AsyncFd), and
        // whose `as_raw_fd` always returns the descriptor it owns.
        #[allow(unsafe_code)]
        let epoll =
            unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }.map_err(io::Error::from)?;
        let lot = Arc::new(ParkingLot {
            epoll,
            slab: Mutex::default(),
            parked: AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            runtime: Handle::current(),
            broker: Arc::downgrade(&broker.shared),
            emptied: Notify::new(),
            open: AtomicBool::new(true),
            asks: Mutex::default(),
        });
        tokio::spawn(lot.clone().watch(broker.shared.shutdown.clone()));
        Ok(lot)
    }

    fn slab(&self) -> MutexGuard<'_, Slab> {
        // Each update is one slot and the free list: a poisoned slab is whole.
        self.slab.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many connections are parked.
    pub(super) fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Whether connections may park.
    pub(super) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Parks a connection, or resumes it at once if its mailbox was
    /// signalled since it last looked (the signal would be lost otherwise),
    /// or if the lot closed.
    pub(super) fn park(self: &Arc<Self>, parked: Parked) {
        let mut slab = self.slab();
        // Under the slab lock, as `close` sets it: no connection is parked
        // once the lot closed (a shutdown waits for parked ones to resume).
        if !self.is_open() {
            drop(slab);
            self.resume(parked);
            return;
        }
        let index = slab.take_free();
        let token = token(index, slab.slot_taken(index).generation);
        // Under the slab lock, so a wake-up for this token (which needs
        // the lock) finds the connection in its slot.
        if !parked.mailbox().park(self, token) {
            slab.free.push(index);
            drop(slab);
            self.resume(parked);
            return;
        }
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        if let Err(e) =
            epoll::add(self.epoll.get_ref(), &parked.socket, epoll::EventData::new_u64(token), flags)
        {
            // Likely for every socket (fs.epoll.max_user_watches): parking stops.
            tracing::warn!(error = %e, "cannot watch an idle connection's socket; idle connections stay tasks from now on");
            self.open.store(false, Ordering::Release);
            parked.mailbox().unparked(token);
            // A wake-up already sent for this token must not reach the slot's next one.
            let slot = slab.slot_taken(index);
            slot.generation = slot.generation.wrapping_add(1);
            slab.free.push(index);
            drop(slab);
            self.resume(parked);
            return;
        }
        slab.slot_taken(index).parked = Some(parked);
        self.parked.fetch_add(1, Ordering::AcqRel);
    }

    /// Resumes the connection parked under `token`, if it still is.
    pub(super) fn unpark(&self, token: u64) {
        let (index, generation) = (token as u32, (token >> 32) as u32);
        let mut slab = self.slab();
        let Some(slot) = slab.slot(index) else { return };
        if slot.generation != generation {
            return;
        }
        let Some(parked) = slot.parked.take() else { return };
        slot.generation = slot.generation.wrapping_add(1);
        slab.free.push(index);
        // Before it goes back to tokio, which registers it for itself.
        let _ = epoll::delete(self.epoll.get_ref(), &parked.socket);
        parked.mailbox().unparked(token);
        drop(slab);
        // Spawned before it stops counting as parked: a shutdown waiting
        // for the lot to empty then waits for the task too. The task
        // registers the socket with tokio: this may run under the router's
        // lock (a delivery woke the mailbox), which must stay short.
        self.resume(parked);
        if self.parked.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }

    fn resume(&self, parked: Parked) {
        // Gone only once nothing holds it, which a parked connection does
        // not: then there is nothing to resume into.
        let Some(shared) = self.broker.upgrade() else { return };
        self.tracker.spawn_on(parked.resume(Broker { shared }), &self.runtime);
    }

    /// Watches the parked sockets until `shutdown` (which wakes every
    /// connection through its mailbox); then, or if epoll fails, the lot
    /// closes.
    async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        self.watch_until(shutdown).await;
        self.close();
    }

    /// Closes the lot: nothing parks any more, and what is parked resumes.
    fn close(&self) {
        let tokens: Vec<u64> = {
            let slab = self.slab();
            self.open.store(false, Ordering::Release);
            let mut tokens = Vec::new();
            for (c, chunk) in slab.chunks.iter().enumerate() {
                for (i, slot) in chunk.iter().enumerate() {
                    if slot.parked.is_some() {
                        tokens.push(token((c * CHUNK + i) as u32, slot.generation));
                    }
                }
            }
            tokens
        };
        tokens.into_iter().for_each(|t| self.unpark(t));
    }

    async fn watch_until(&self, shutdown: CancellationToken) {
        loop {
            let mut ready = tokio::select! {
                ready = self.epoll.readable() => match ready {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::error!(error = %e, "the parked connections' epoll failed");
                        return;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            match self.resume_ready() {
                Ok(true) => {}
                Ok(false) => ready.clear_ready(),
                Err(e) => {
                    tracing::error!(error = %e, "the parked connections' epoll failed");
                    return;
                }
            }
        }
    }

    /// Resumes the connections whose sockets are ready; true when there
    /// may be more.
    fn resume_ready(&self) -> io::Result<bool> {
        const BATCH: usize = 64;
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); BATCH];
        let now = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        let (found, _) = match epoll::wait(self.epoll.get_ref(), &mut events[..], Some(&now)) {
            Ok(found) => found,
            Err(rustix::io::Errno::INTR) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        for event in found.iter() {
            self.unpark(event.data.u64());
        }
        Ok(found.len() == BATCH)
    }

    /// Asks `mailbox`'s connection (the claim `generation`) at the next
    /// tick whether it is idle: see [`Mailbox::request_park`].
    pub(super) fn ask_later(self: &Arc<Self>, mailbox: Arc<Mailbox>, generation: u64) {
        let mut asks = self.asks.lock().unwrap_or_else(|p| p.into_inner());
        asks.waiting.push((mailbox, generation));
        if !asks.ticking {
            asks.ticking = true;
            let _runtime = self.runtime.enter();
            tokio::spawn(self.clone().tick());
        }
    }

    async fn tick(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TICK).await;
            let waiting = {
                let mut asks = self.asks.lock().unwrap_or_else(|p| p.into_inner());
                if asks.waiting.is_empty() {
                    // Nothing to do while every connection is parked.
                    asks.ticking = false;
                    return;
                }
                std::mem::take(&mut asks.waiting)
            };
            for (mailbox, generation) in waiting {
                if !mailbox.taken_over(generation) && mailbox.is_online() {
                    mailbox.request_park();
                }
            }
        }
    }

    /// Waits until no connection is parked and every resumed one ended:
    /// at shutdown, once every connection was told to go.
    pub(super) async fn drained(&self) {
        self.close();
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.parked() == 0 {
                break;
            }
            emptied.await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parked_connection_takes_136_bytes_in_the_slab() {
        // Its client at rest, socket, connection slot, slot generation; the
        // session (about 450 bytes with the table's share) is kept either way.
        let size = std::mem::size_of::<super::Slot>();
        assert!(size <= 136, "a parked connection grew to {size} bytes");
    }
}
