//! The broker seen from a client over a real socket, through its listener:
//! what a connection's task and the parking lot do, as a client sees it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::connection::{PacketReader, PacketWriter};
use crate::packet::*;
use crate::server::{self, Slots, Transport};
use crate::{Message, QoS, TopicName};

type Client = (PacketReader<OwnedReadHalf>, PacketWriter<OwnedWriteHalf>);

async fn connect(addr: SocketAddr, id: &str) -> Client {
    session(TcpStream::connect(addr).await.unwrap(), id).await
}

/// CONNECT (5.0, a session kept 60 s) on `stream`, and its CONNACK.
async fn session(stream: TcpStream, id: &str) -> Client {
    let (r, w) = stream.into_split();
    let (mut reader, mut writer) = (PacketReader::new(r, 1 << 20), PacketWriter::new(w));
    writer.version = Protocol::V5;
    reader.version = Some(Protocol::V5);
    writer.queue(&Packet::Connect(Box::new(Connect {
        protocol: Protocol::V5,
        clean_start: false,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties { session_expiry_interval: Some(60), ..Properties::default() },
    })));
    writer.flush().await.unwrap();
    match reader.read_packet().await {
        Ok(Some(Packet::Connack(c))) => assert_eq!(c.code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    (reader, writer)
}

async fn next(client: &mut Client) -> Packet {
    match tokio::time::timeout(Duration::from_secs(5), client.0.read_packet()).await {
        Ok(Ok(Some(packet))) => packet,
        other => panic!("expected a packet, got {other:?}"),
    }
}

/// Waits (up to three ticks) until `parked` connections are parked.
async fn parked(broker: &Broker, parked: usize) {
    for _ in 0..300 {
        if broker.parked_connections() == parked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} parked, not {parked}", broker.parked_connections());
}

/// A broker listening on a free loopback port.
async fn listening() -> (Broker, SocketAddr, JoinHandle<()>) {
    let broker = Broker::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = broker.shutdown_token();
    let serving =
        tokio::spawn(server::serve(listener, Transport::Tcp, broker.clone(), Slots::new(10), token));
    (broker, addr, serving)
}

fn subscribe(client: &mut Client, filter: &str, qos: QoS) {
    let options = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
    client.1.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(filter.into(), options)],
        properties: Properties::default(),
    }));
}

#[tokio::test]
async fn a_parked_connection_answers_its_socket_its_mail_a_takeover_and_shutdown() {
    let (broker, addr, serving) = listening().await;

    // Parked at once after CONNACK.
    let mut first = connect(addr, "sensor").await;
    parked(&broker, 1).await;

    // Its socket resumes it; a tick with nothing done parks it again.
    subscribe(&mut first, "t/#", QoS::AtLeastOnce);
    first.1.flush().await.unwrap();
    assert!(matches!(next(&mut first).await, Packet::Suback(s) if s.codes == [ReasonCode(1)]));
    parked(&broker, 1).await;

    // Its mailbox resumes it.
    broker.publish(Message::new(TopicName::new("t/1").unwrap(), "21.5"));
    let Packet::Publish(publish) = next(&mut first).await else { panic!("expected PUBLISH") };
    assert_eq!(&publish.payload[..], b"21.5");
    first.1.queue(&Packet::Puback(Ack::ok(publish.packet_id)));
    first.1.flush().await.unwrap();
    parked(&broker, 1).await;

    // A takeover reaches the parked connection: DISCONNECT 0x8E (MQTT-3.1.4-3).
    let mut second = connect(addr, "sensor").await;
    assert_eq!(next(&mut first).await, Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)));
    parked(&broker, 1).await;

    // So does the broker stopping: DISCONNECT 0x8B, and the listener waits for it.
    broker.shut_down();
    assert_eq!(
        next(&mut second).await,
        Packet::Disconnect(Disconnect::new(ReasonCode::SERVER_SHUTTING_DOWN))
    );
    tokio::time::timeout(Duration::from_secs(5), serving).await.unwrap().unwrap();
    assert_eq!(broker.parked_connections(), 0);
}

#[tokio::test]
async fn mail_beyond_one_write_goes_out_without_waiting_for_more_mail_or_acks() {
    let (broker, addr, _serving) = listening().await;
    let mut client = connect(addr, "dashboard").await;
    subscribe(&mut client, "burst/#", QoS::AtLeastOnce);
    client.1.flush().await.unwrap();
    assert!(matches!(next(&mut client).await, Packet::Suback(_)));
    // 100 KiB at once, QoS 1 and within the client's receive maximum: more
    // than the 64 KiB a connection writes in one go. The client acknowledges
    // only once it has all of them.
    for i in 0..50 {
        let topic = TopicName::new(format!("burst/{i}")).unwrap();
        broker.publish(Message::new(topic, vec![b'x'; 2048]));
    }
    // Not a speed check: without the fix the rest waited for whatever
    // woke the connection next (here the parking lot's one-second tick).
    let all = async {
        for i in 0..50 {
            let Packet::Publish(publish) = next(&mut client).await else { panic!("expected PUBLISH {i}") };
            assert_eq!(publish.topic, format!("burst/{i}"));
        }
    };
    tokio::time::timeout(Duration::from_millis(500), all).await.expect("the burst stalled after 64 KiB");
}

#[tokio::test]
async fn a_flood_of_mail_does_not_keep_the_clients_packets_unread() {
    let (broker, addr, _serving) = listening().await;
    // A small receive window: the broker's writes block soon, as over a
    // slow link.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = session(socket.connect(addr).await.unwrap(), "busy").await;
    subscribe(&mut client, "flood/#", QoS::AtMostOnce);
    client.1.flush().await.unwrap();
    assert!(matches!(next(&mut client).await, Packet::Suback(_)));
    // 9 MiB waiting (more than the kernel's buffers and tokio's budget of
    // writes per poll take), then a PINGREQ: its answer comes between
    // deliveries, not after the last (a keep alive could expire meanwhile).
    let topic = TopicName::new("flood/x").unwrap();
    for _ in 0..9000 {
        broker.publish(Message { qos: QoS::AtMostOnce, ..Message::new(topic.clone(), vec![b'x'; 1024]) });
    }
    client.1.queue(&Packet::Pingreq);
    client.1.flush().await.unwrap();
    let mut before = 0;
    loop {
        match next(&mut client).await {
            Packet::Publish(_) => before += 1,
            Packet::Pingresp => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(before < 9000, "PINGRESP came after every delivery");
}
