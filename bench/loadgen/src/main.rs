//! `mqtt-loadgen`: drives any MQTT broker with one scenario and prints one
//! line of JSON: messages delivered per second, latency percentiles, and
//! how many messages were lost.
//!
//! It runs on one thread (`bench/broker` pins it to one core, the broker to
//! the other). Each payload carries its send time, so latency is end to
//! end, publisher to subscriber. Publishers keep at most a window of
//! messages undelivered, so a broker is measured at the rate it sustains,
//! not driven into dropping messages; QoS 1 publishers also keep at most a
//! window of unacknowledged PUBLISHes.
//!
//! Usage: `mqtt-loadgen PORT SCENARIO QOS MESSAGES`, SCENARIO one of
//! `fan-in` (8 publishers, 1 subscriber), `fan-out` (1 publisher, 8
//! subscribers), `pairs` (16 publisher/subscriber pairs), `idle` (open
//! 1,000 connections, hold them until stdin closes).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_engine::connection::{PacketReader, PacketWriter};
use mqtt_engine::packet::{
    Ack, Connect, Packet, Properties, Protocol, Publish, Subscribe, SubscriptionOptions,
};
use mqtt_engine::QoS;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Messages a run may have sent and not yet seen delivered, unless
/// `MQTT_LOADGEN_WINDOW` says otherwise.
const WINDOW: u64 = 2_000;

/// A fixed total rate (messages/s) from `MQTT_LOADGEN_RATE`: latency is
/// then measured below saturation, where it is the broker's and not the
/// depth of a queue.
fn rate() -> Option<f64> {
    std::env::var("MQTT_LOADGEN_RATE").ok().and_then(|r| r.parse().ok()).filter(|r: &f64| *r > 0.0)
}

fn window() -> u64 {
    std::env::var("MQTT_LOADGEN_WINDOW").ok().and_then(|w| w.parse().ok()).unwrap_or(WINDOW)
}
/// QoS 1 PUBLISHes a publisher may have unacknowledged.
const INFLIGHT: usize = 200;
const PAYLOAD: usize = 64;

type Reader = PacketReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = PacketWriter<tokio::net::tcp::OwnedWriteHalf>;

/// Counters shared by the tasks of a run (one thread: no atomics needed).
#[derive(Default)]
struct Progress {
    sent: u64,
    received: u64,
    latencies_us: Vec<u32>,
    /// Each message is delivered this many times (subscribers per topic).
    fan: u64,
    /// How many publishers share the rate.
    publishers: usize,
}

fn publishers_of(shared: &Shared) -> usize {
    shared.0.borrow().publishers.max(1)
}

type Shared = Rc<(RefCell<Progress>, Notify)>;

async fn connect(port: u16, id: &str) -> std::io::Result<(Reader, Writer)> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut reader = PacketReader::new(r, 1 << 20);
    reader.version = Some(Protocol::V311);
    let mut writer = PacketWriter::new(w);
    writer.queue(&Packet::Connect(Box::new(Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 120,
        client_id: id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })));
    writer.flush().await?;
    match reader.read_packet().await {
        Ok(Some(Packet::Connack(c))) if c.code.0 == 0 => Ok((reader, writer)),
        other => Err(std::io::Error::other(format!("CONNECT refused: {other:?}"))),
    }
}

async fn subscribe(reader: &mut Reader, writer: &mut Writer, filter: &str, qos: QoS) -> std::io::Result<()> {
    writer.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(filter.to_owned(), SubscriptionOptions { qos, ..Default::default() })],
        properties: Properties::default(),
    }));
    writer.flush().await?;
    match reader.read_packet().await {
        Ok(Some(Packet::Suback(_))) => Ok(()),
        other => Err(std::io::Error::other(format!("SUBSCRIBE failed: {other:?}"))),
    }
}

async fn run_subscriber(mut reader: Reader, mut writer: Writer, shared: Shared, start: Instant) {
    loop {
        let packet = match reader.read_packet().await {
            Ok(Some(packet)) => packet,
            _ => return,
        };
        if let Packet::Publish(p) = packet {
            if p.qos == QoS::AtLeastOnce {
                writer.queue(&Packet::Puback(Ack::ok(p.packet_id)));
            }
            let sent_ns =
                p.payload.get(..8).map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
            let now_ns = start.elapsed().as_nanos() as u64;
            let mut progress = shared.0.borrow_mut();
            progress.received += 1;
            progress
                .latencies_us
                .push((now_ns.saturating_sub(sent_ns) / 1000).min(u64::from(u32::MAX)) as u32);
            drop(progress);
            shared.1.notify_waiters();
        }
        if !reader.has_buffered() && writer.flush().await.is_err() {
            return;
        }
    }
}

/// Publishes `count` messages; returns the connection, which the run keeps
/// open until every message is delivered (then says DISCONNECT).
async fn run_publisher(
    mut reader: Reader,
    mut writer: Writer,
    topic: String,
    qos: QoS,
    count: u64,
    shared: Shared,
    start: Instant,
) -> Option<Writer> {
    let acked = Rc::new(RefCell::new(0usize));
    let acked_notify = Rc::new(Notify::new());
    if qos == QoS::AtLeastOnce {
        let (acked, notify) = (acked.clone(), acked_notify.clone());
        tokio::task::spawn_local(async move {
            while let Ok(Some(packet)) = reader.read_packet().await {
                if let Packet::Puback(_) = packet {
                    *acked.borrow_mut() += 1;
                    notify.notify_waiters();
                }
            }
        });
    }
    let mut id: u16 = 0;
    let window = window();
    let pace = rate().map(|r| r / publishers_of(&shared) as f64);
    let t0 = Instant::now();
    for n in 0..count {
        if let Some(per_second) = pace {
            let due = t0 + Duration::from_secs_f64(n as f64 / per_second);
            if Instant::now() < due {
                if writer.flush().await.is_err() {
                    return None;
                }
                tokio::time::sleep_until(due.into()).await;
            }
        }
        loop {
            let (sent, received, fan) = {
                let p = shared.0.borrow();
                (p.sent, p.received, p.fan)
            };
            let undelivered = sent * fan - received.min(sent * fan);
            let inflight = n as usize - *acked.borrow();
            if undelivered < window * fan && (qos == QoS::AtMostOnce || inflight < INFLIGHT) {
                break;
            }
            if writer.flush().await.is_err() {
                return None;
            }
            let wait_delivery = shared.1.notified();
            let wait_ack = acked_notify.notified();
            tokio::select! {
                _ = wait_delivery => {}
                _ = wait_ack => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let mut payload = vec![0u8; PAYLOAD];
        payload[..8].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
        id = id.checked_add(1).unwrap_or(1);
        writer.queue(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.clone(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { id },
            payload: Bytes::from(payload),
            properties: Properties::default(),
        }));
        shared.0.borrow_mut().sent += 1;
        if writer.pending() > 16 * 1024 && writer.flush().await.is_err() {
            return None;
        }
    }
    writer.flush().await.ok()?;
    Some(writer)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(port: u16, scenario: &str, qos: QoS, messages: u64) -> Result<String, String> {
    let (publishers, subscribers, fan): (usize, usize, u64) = match scenario {
        "fan-in" => (8, 1, 1),
        "fan-out" => (1, 8, 8),
        "pairs" => (16, 16, 1),
        "idle" => return idle(port).await,
        other => return Err(format!("unknown scenario {other}")),
    };
    let shared: Shared =
        Rc::new((RefCell::new(Progress { fan, publishers, ..Progress::default() }), Notify::new()));
    let start = Instant::now();
    let topic = |i: usize| match scenario {
        "fan-in" => format!("bench/in/{i}"),
        "fan-out" => "bench/out".to_owned(),
        _ => format!("bench/pair/{i}"),
    };
    let mut subs = Vec::new();
    for i in 0..subscribers {
        let (mut r, mut w) = connect(port, &format!("sub-{i}")).await.map_err(|e| e.to_string())?;
        let filter = match scenario {
            "fan-in" => "bench/in/+".to_owned(),
            _ => topic(i),
        };
        subscribe(&mut r, &mut w, &filter, qos).await.map_err(|e| e.to_string())?;
        subs.push(tokio::task::spawn_local(run_subscriber(r, w, shared.clone(), start)));
    }
    let per_publisher = messages / publishers as u64;
    let mut pubs = Vec::new();
    let t0 = Instant::now();
    for i in 0..publishers {
        let (r, w) = connect(port, &format!("pub-{i}")).await.map_err(|e| e.to_string())?;
        pubs.push(tokio::task::spawn_local(run_publisher(
            r,
            w,
            topic(i),
            qos,
            per_publisher,
            shared.clone(),
            start,
        )));
    }
    let mut writers = Vec::new();
    for p in pubs {
        if let Ok(Some(writer)) = p.await {
            writers.push(writer);
        }
    }
    let expected = per_publisher * publishers as u64 * fan;
    // Wait for the tail, at most 10 s after the last send.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last_change = (shared.0.borrow().received, Instant::now());
    while shared.0.borrow().received < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = shared.0.borrow().received;
        if now != last_change.0 {
            last_change = (now, Instant::now());
        } else if last_change.1.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let received_at = shared.0.borrow().received;
    let seconds =
        if received_at >= expected { elapsed } else { last_change.1.duration_since(t0).as_secs_f64() };
    for mut writer in writers {
        writer.queue(&Packet::Disconnect(mqtt_engine::packet::Disconnect::new(
            mqtt_engine::packet::ReasonCode::SUCCESS,
        )));
        writer.close().await;
    }
    for s in subs {
        s.abort();
    }
    let mut progress = shared.0.borrow_mut();
    progress.latencies_us.sort_unstable();
    Ok(format!(
        "{{\"scenario\":\"{scenario}\",\"qos\":{},\"expected\":{expected},\"received\":{},\"lost\":{},\"seconds\":{seconds:.3},\"msgs_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
        qos as u8,
        progress.received,
        expected.saturating_sub(progress.received),
        progress.received as f64 / seconds.max(1e-9),
        percentile(&progress.latencies_us, 0.50),
        percentile(&progress.latencies_us, 0.99),
    ))
}

/// Opens 1,000 connections and holds them until stdin closes, so the
/// caller can measure the broker's memory meanwhile.
async fn idle(port: u16) -> Result<String, String> {
    let mut held = Vec::with_capacity(1000);
    for i in 0..1000 {
        held.push(connect(port, &format!("idle-{i}")).await.map_err(|e| format!("connection {i}: {e}"))?);
    }
    println!("{{\"scenario\":\"idle\",\"connections\":{}}}", held.len());
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    drop(held);
    Ok(String::new())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: mqtt-loadgen PORT fan-in|fan-out|pairs|idle QOS MESSAGES";
    let (Some(port), Some(scenario)) = (args.get(1).and_then(|p| p.parse().ok()), args.get(2)) else {
        eprintln!("{usage}");
        return std::process::ExitCode::from(2);
    };
    let qos = match args.get(3).map(String::as_str) {
        Some("1") => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    };
    let messages = args.get(4).and_then(|m| m.parse().ok()).unwrap_or(100_000);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run(port, scenario, qos, messages)) {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqtt-loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
