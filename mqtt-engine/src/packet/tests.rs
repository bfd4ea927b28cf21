//! Decoding fixed byte sequences of both versions, refusing malformed ones
//! with the right reason code, and round trips (property-based).

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

/// Splits a whole packet into its first byte and body, as the connection does.
fn decode_whole(bytes: &[u8], version: Option<Protocol>) -> Result<Packet, DecodeError> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = bytes[i];
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    assert_eq!(bytes.len(), i + len, "test vector length");
    decode(bytes[0], Bytes::copy_from_slice(&bytes[i..]), version)
}

fn encoded(packet: &Packet, version: Protocol) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf);
    buf.to_vec()
}

#[test]
fn a_311_connect_with_will_and_credentials_decodes() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x1f,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
        0b1110_1110, // user, password, will retain, will QoS 1, will, clean session
        0x00, 0x3c, // keep alive 60
        0x00, 0x02, b'c', b'1',
        0x00, 0x03, b'w', b'/', b't', 0x00, 0x03, b'b', b'y', b'e',
        0x00, 0x01, b'u', 0x00, 0x02, b'p', b'w',
    ];
    let Packet::Connect(c) = decode_whole(&bytes, None).unwrap() else { panic!("not a CONNECT") };
    assert_eq!(c.protocol, Protocol::V311);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id, "c1");
    let will = c.will.as_ref().unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.payload[..], will.qos, will.retain),
        ("w/t", &b"bye"[..], QoS::AtLeastOnce, true)
    );
    assert_eq!(c.username.as_deref(), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    assert_eq!(encoded(&Packet::Connect(c), Protocol::V311), bytes);
}

#[test]
fn a_v5_connect_with_properties_decodes() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x1a,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05,
        0b0000_0010, 0x00, 0x0a,
        0x08, 0x11, 0x00, 0x00, 0x0e, 0x10, 0x21, 0x00, 0x14, // session expiry 3600, receive max 20
        0x00, 0x05, b'v', b'5', b'c', b'l', b'i',
    ];
    let Packet::Connect(c) = decode_whole(&bytes, None).unwrap() else { panic!("not a CONNECT") };
    assert_eq!(c.protocol, Protocol::V5);
    assert_eq!(c.properties.session_expiry_interval, Some(3600));
    assert_eq!(c.properties.receive_maximum, Some(20));
    assert_eq!(c.client_id, "v5cli");
    assert_eq!(encoded(&Packet::Connect(c), Protocol::V5), bytes);
}

#[test]
fn an_unknown_protocol_level_asks_for_the_unsupported_version_answer() {
    // MQTT-3.1.2-2: level 6 is answered with CONNACK 0x01 / 0x84.
    let bytes = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 10, 0, 0];
    assert_eq!(decode_whole(&bytes, None).unwrap_err().reason, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
}

#[test]
fn the_reserved_connect_flag_is_malformed() {
    // MQTT-3.1.2-3.
    let bytes = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b11, 0, 10, 0, 0];
    assert_eq!(decode_whole(&bytes, None).unwrap_err().reason, ReasonCode::MALFORMED_PACKET);
}

#[test]
fn publish_qos1_and_qos0_decode_in_both_versions() {
    let qos1 = [0x32, 0x08, 0, 3, b'a', b'/', b'b', 0x00, 0x07, b'x'];
    let Packet::Publish(p) = decode_whole(&qos1, Some(Protocol::V311)).unwrap() else { panic!() };
    assert_eq!(
        (p.topic.as_str(), p.qos, p.packet_id, &p.payload[..]),
        ("a/b", QoS::AtLeastOnce, 7, &b"x"[..])
    );
    // The same in 5.0 carries a property length (0 here).
    let qos1_v5 = [0x32, 0x09, 0, 3, b'a', b'/', b'b', 0x00, 0x07, 0x00, b'x'];
    let Packet::Publish(p5) = decode_whole(&qos1_v5, Some(Protocol::V5)).unwrap() else { panic!() };
    assert_eq!(p5, p);
    assert_eq!(encoded(&Packet::Publish(p5), Protocol::V5), qos1_v5);
    let qos0_retained = [0x31, 0x05, 0, 1, b't', b'h', b'i'];
    let Packet::Publish(p) = decode_whole(&qos0_retained, Some(Protocol::V311)).unwrap() else { panic!() };
    assert!(p.retain && p.qos == QoS::AtMostOnce && &p.payload[..] == b"hi");
}

#[test]
fn malformed_publishes_are_refused_with_their_reason() {
    let v = Some(Protocol::V5);
    // MQTT-3.3.1-4: QoS 3.
    assert_eq!(
        decode_whole(&[0x36, 0x06, 0, 1, b't', 0, 1, 0], v).unwrap_err().reason,
        ReasonCode::MALFORMED_PACKET
    );
    // MQTT-3.3.1-2: DUP on QoS 0.
    assert_eq!(
        decode_whole(&[0x38, 0x04, 0, 1, b't', 0], v).unwrap_err().reason,
        ReasonCode::MALFORMED_PACKET
    );
    // MQTT-3.3.2-2: a wildcard in the topic name.
    assert_eq!(
        decode_whole(&[0x30, 0x04, 0, 1, b'#', 0], v).unwrap_err().reason,
        ReasonCode::TOPIC_NAME_INVALID
    );
    // MQTT-2.3.1-1: packet identifier 0.
    assert_eq!(
        decode_whole(&[0x32, 0x06, 0, 1, b't', 0, 0, 0], v).unwrap_err().reason,
        ReasonCode::MALFORMED_PACKET
    );
    // A topic length beyond the packet.
    assert_eq!(decode_whole(&[0x30, 0x03, 0, 9, b't'], v).unwrap_err().reason, ReasonCode::MALFORMED_PACKET);
}

#[test]
fn subscribe_options_decode_and_reserved_bits_are_refused() {
    // v5: no local, retain as published, retain handling 2, QoS 1.
    let bytes = [0x82, 0x07, 0, 5, 0, 0, 1, b'#', 0b0010_1101];
    let Packet::Subscribe(s) = decode_whole(&bytes, Some(Protocol::V5)).unwrap() else { panic!() };
    let (filter, o) = &s.filters[0];
    assert_eq!(filter, "#");
    assert_eq!(
        (o.qos, o.no_local, o.retain_as_published, o.retain_handling),
        (QoS::AtLeastOnce, true, true, 2)
    );
    // 3.1.1: MQTT-3.8.3-4, the upper six bits are reserved.
    let v3 = [0x82, 0x06, 0, 5, 0, 1, b'#', 0b0000_0101];
    assert_eq!(decode_whole(&v3, Some(Protocol::V311)).unwrap_err().reason, ReasonCode::MALFORMED_PACKET);
    // MQTT-3.8.1-1: SUBSCRIBE's fixed header flags are 0010.
    assert_eq!(
        decode_whole(&[0x80, 0x06, 0, 5, 0, 1, b'#', 0], None).unwrap_err().reason,
        ReasonCode::MALFORMED_PACKET
    );
    // MQTT-3.8.3-3: at least one filter.
    assert_eq!(
        decode_whole(&[0x82, 0x02, 0, 5], Some(Protocol::V311)).unwrap_err().reason,
        ReasonCode::PROTOCOL_ERROR
    );
}

#[test]
fn acks_take_the_short_form_in_v5_and_carry_reasons() {
    let short = [0x40, 0x02, 0x00, 0x09];
    assert_eq!(decode_whole(&short, Some(Protocol::V5)).unwrap(), Packet::Puback(Ack::ok(9)));
    assert_eq!(encoded(&Packet::Puback(Ack::ok(9)), Protocol::V5), short);
    let with_reason = [0x50, 0x03, 0x00, 0x09, 0x10];
    let Packet::Pubrec(a) = decode_whole(&with_reason, Some(Protocol::V5)).unwrap() else { panic!() };
    assert_eq!(a.code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    // 3.1.1 acks are exactly two bytes.
    assert!(decode_whole(&with_reason, Some(Protocol::V311)).is_err());
    // MQTT-3.6.1-1: PUBREL's flags are 0010.
    assert!(decode_whole(&[0x60, 0x02, 0, 9], Some(Protocol::V311)).is_err());
}

#[test]
fn a_v5_disconnect_with_a_reason_encodes_it_and_311_has_none() {
    let d = Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER));
    assert_eq!(encoded(&d, Protocol::V5), [0xe0, 0x01, 0x8e]);
    assert_eq!(encoded(&d, Protocol::V311), [0xe0, 0x00]);
    assert_eq!(encoded(&Packet::Pingresp, Protocol::V311), [0xd0, 0x00]);
}

#[test]
fn a_311_unsuback_with_reason_codes_is_malformed() {
    // Found by the fuzzer: 3.1.1's UNSUBACK has no payload (MQTT 3.11.3).
    assert_eq!(
        decode_whole(&[0xb0, 0x03, 0, 3, 0], Some(Protocol::V311)).unwrap_err().reason,
        ReasonCode::MALFORMED_PACKET
    );
    assert!(decode_whole(&[0xb0, 0x02, 0, 3], Some(Protocol::V311)).is_ok());
}

#[test]
fn unsuback_has_codes_only_in_v5() {
    let u = Packet::Unsuback(Suback {
        packet_id: 3,
        codes: vec![ReasonCode::SUCCESS],
        properties: Properties::default(),
    });
    assert_eq!(encoded(&u, Protocol::V311), [0xb0, 0x02, 0, 3]);
    assert_eq!(encoded(&u, Protocol::V5), [0xb0, 0x04, 0, 3, 0, 0]);
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9/$ ]{1,40}".prop_filter("no wildcards", |t| !t.contains(['+', '#']))
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic(),
        1u16..,
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::option::of(0u32..100_000),
    )
        .prop_map(|(qos, dup, retain, topic, id, payload, expiry)| Publish {
            dup: dup && qos != QoS::AtMostOnce,
            qos,
            retain,
            topic,
            packet_id: if qos == QoS::AtMostOnce { 0 } else { id },
            payload: payload.into(),
            properties: Properties { message_expiry_interval: expiry, ..Properties::default() },
        })
}

proptest! {
    #[test]
    fn publishes_round_trip(p in publish()) {
        let bytes = encoded(&Packet::Publish(p.clone()), Protocol::V5);
        prop_assert_eq!(decode_whole(&bytes, Some(Protocol::V5)).unwrap(), Packet::Publish(p.clone()));
        let v3 = Publish { properties: Properties::default(), ..p };
        let bytes = encoded(&Packet::Publish(v3.clone()), Protocol::V311);
        prop_assert_eq!(decode_whole(&bytes, Some(Protocol::V311)).unwrap(), Packet::Publish(v3));
    }

    #[test]
    fn subscribes_round_trip(id in 1u16.., filters in proptest::collection::vec(("[a-z+#/]{1,20}", qos(), any::<bool>(), any::<bool>(), 0u8..3), 1..5)) {
        let s = Subscribe {
            packet_id: id,
            filters: filters.into_iter().map(|(f, qos, no_local, rap, rh)| (f, SubscriptionOptions { qos, no_local, retain_as_published: rap, retain_handling: rh })).collect(),
            properties: Properties { subscription_identifiers: vec![42], ..Properties::default() },
        };
        let bytes = encoded(&Packet::Subscribe(s.clone()), Protocol::V5);
        prop_assert_eq!(decode_whole(&bytes, Some(Protocol::V5)).unwrap(), Packet::Subscribe(s));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200), v5 in any::<bool>()) {
        let version = if v5 { Some(Protocol::V5) } else { Some(Protocol::V311) };
        let _ = decode(first, Bytes::from(body.clone()), version);
        let _ = decode(first, Bytes::from(body), None);
    }
}
