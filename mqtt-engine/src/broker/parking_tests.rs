//! Parking seen from a client: a real socket, the broker's listener.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;

use super::*;
use crate::connection::{PacketReader, PacketWriter};
use crate::packet::*;
use crate::server::{self, Slots, Transport};
use crate::{Message, QoS, TopicName};

type Client = (PacketReader<OwnedReadHalf>, PacketWriter<OwnedWriteHalf>);

async fn connect(addr: SocketAddr, id: &str) -> Client {
    let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
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

#[tokio::test]
async fn a_parked_connection_answers_its_socket_its_mail_a_takeover_and_shutdown() {
    let broker = Broker::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(server::serve(
        listener,
        Transport::Tcp,
        broker.clone(),
        Slots::new(10),
        broker.shutdown_token(),
    ));

    // Parked at once after CONNACK.
    let mut first = connect(addr, "sensor").await;
    parked(&broker, 1).await;

    // Its socket resumes it; a tick with nothing done parks it again.
    let options = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
    first.1.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("t/#".into(), options)],
        properties: Properties::default(),
    }));
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

#[test]
fn a_parked_connection_takes_144_bytes_in_the_slab() {
    // Its client at rest, socket, connection slot, slot generation; the
    // session (about 450 bytes with the table's share) is kept either way.
    let size = std::mem::size_of::<Slot>();
    assert!(size <= 144, "a parked connection grew to {size} bytes");
}
