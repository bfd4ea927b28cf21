//! Bytes to packets. The fixed header's first byte and the body (the
//! `remaining length` bytes after it) come from the connection, which has
//! already checked the size; `version` is `None` until CONNECT has said it.

use bytes::Bytes;

use super::properties::Context;
use super::wire::Reader;
use super::*;

fn malformed(what: &'static str) -> DecodeError {
    DecodeError::new(ReasonCode::MALFORMED_PACKET, what)
}

fn protocol_error(what: &'static str) -> DecodeError {
    DecodeError::new(ReasonCode::PROTOCOL_ERROR, what)
}

/// Decodes one packet from its first byte and body.
pub fn decode(first: u8, body: Bytes, version: Option<Protocol>) -> Result<Packet, DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0f;
    // MQTT-2.2.2-1/-2: reserved flags must be exactly as the table says.
    let expected_flags = match kind {
        3 => flags,
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected_flags {
        return Err(malformed("reserved flags of the fixed header are wrong"));
    }
    let v5 = version == Some(Protocol::V5);
    let mut r = Reader::new(body);
    let packet = match kind {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => connack(&mut r, v5)?,
        3 => Packet::Publish(publish(flags, &mut r, v5)?),
        4 => Packet::Puback(ack(&mut r, v5)?),
        5 => Packet::Pubrec(ack(&mut r, v5)?),
        6 => Packet::Pubrel(ack(&mut r, v5)?),
        7 => Packet::Pubcomp(ack(&mut r, v5)?),
        8 => Packet::Subscribe(subscribe(&mut r, v5)?),
        9 => Packet::Suback(suback(&mut r, v5, Context::Suback)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        // 3.1.1's UNSUBACK is the packet identifier alone (3.11.3): any
        // byte after it is left over, so malformed.
        11 if !v5 => Packet::Unsuback(Suback {
            packet_id: nonzero_id(&mut r)?,
            codes: Vec::new(),
            properties: Properties::default(),
        }),
        11 => Packet::Unsuback(suback(&mut r, v5, Context::Unsuback)?),
        12 => Packet::Pingreq,
        13 => Packet::Pingresp,
        14 => Packet::Disconnect(disconnect(&mut r, v5, Context::Disconnect)?),
        15 if v5 => Packet::Auth(disconnect(&mut r, v5, Context::Auth)?),
        _ => return Err(malformed("an unknown packet type")),
    };
    if !r.is_empty() {
        return Err(malformed("bytes after the end of the packet"));
    }
    Ok(packet)
}

fn properties(r: &mut Reader, v5: bool, context: Context) -> Result<Properties, DecodeError> {
    if v5 {
        Properties::decode(r, context)
    } else {
        Ok(Properties::default())
    }
}

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.string("protocol name")?;
    let level = r.u8("protocol level")?;
    let protocol = match (name.as_str(), level) {
        ("MQTT", 4) => Protocol::V311,
        ("MQTT", 5) => Protocol::V5,
        // MQTT-3.1.2-2: answered with CONNACK 0x01 (3.1.1) / 0x84 (5.0).
        ("MQTT", _) | ("MQIsdp", 3) => {
            return Err(DecodeError::new(
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                "unsupported protocol level",
            ))
        }
        _ => return Err(protocol_error("not an MQTT protocol name")),
    };
    let v5 = protocol == Protocol::V5;
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(malformed("the reserved connect flag is set")); // MQTT-3.1.2-3
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0x03).ok_or_else(|| malformed("will QoS 3"))?;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(malformed("will QoS or retain without a will")); // MQTT-3.1.2-11, -13
    }
    if !v5 && has_password && !has_username {
        return Err(malformed("a password without a user name")); // MQTT-3.1.2-22
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = properties(r, v5, Context::Connect)?;
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = properties_of_will(r, v5)?;
        let topic = r.string("will topic")?;
        let payload = r.binary("will payload")?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if has_username { Some(r.string("user name")?) } else { None };
    let password = if has_password { Some(r.binary("password")?) } else { None };
    Ok(Connect { protocol, clean_start, keep_alive, client_id, will, username, password, properties })
}

fn properties_of_will(r: &mut Reader, v5: bool) -> Result<Properties, DecodeError> {
    properties(r, v5, Context::Will)
}

fn connack(r: &mut Reader, v5: bool) -> Result<Packet, DecodeError> {
    let flags = r.u8("connack flags")?;
    if flags & 0xfe != 0 {
        return Err(malformed("reserved connack flags set"));
    }
    let code = ReasonCode(r.u8("connack code")?);
    let properties = properties(r, v5, Context::Connack)?;
    Ok(Packet::Connack(Connack { session_present: flags & 1 != 0, code, properties }))
}

fn publish(flags: u8, r: &mut Reader, v5: bool) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or_else(|| malformed("PUBLISH with QoS 3"))?; // MQTT-3.3.1-4
    if qos == QoS::AtMostOnce && dup {
        return Err(malformed("DUP set on a QoS 0 PUBLISH")); // MQTT-3.3.1-2
    }
    let retain = flags & 0x01 != 0;
    let topic = r.string("topic name")?;
    if topic.contains(['+', '#']) {
        // MQTT-3.3.2-2
        return Err(DecodeError::new(ReasonCode::TOPIC_NAME_INVALID, "a wildcard in a topic name"));
    }
    let packet_id = if qos == QoS::AtMostOnce { 0 } else { nonzero_id(r)? };
    let properties = properties(r, v5, Context::Publish)?;
    if topic.is_empty() && properties.topic_alias.is_none() {
        // MQTT-4.7.3-1; in 5.0 an alias may stand for it.
        return Err(DecodeError::new(ReasonCode::TOPIC_NAME_INVALID, "an empty topic name"));
    }
    Ok(Publish { dup, qos, retain, topic, packet_id, payload: r.rest(), properties })
}

/// MQTT-2.3.1-1: packet identifiers are non-zero.
fn nonzero_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16("packet identifier")? {
        0 => Err(malformed("packet identifier 0")),
        id => Ok(id),
    }
}

fn ack(r: &mut Reader, v5: bool) -> Result<Ack, DecodeError> {
    let packet_id = nonzero_id(r)?;
    // 5.0: the reason code and properties may be left out (3.4.2.1).
    let code = if v5 && !r.is_empty() { ReasonCode(r.u8("reason code")?) } else { ReasonCode::SUCCESS };
    let properties =
        if v5 && !r.is_empty() { Properties::decode(r, Context::Ack)? } else { Properties::default() };
    Ok(Ack { packet_id, code, properties })
}

fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = nonzero_id(r)?;
    let properties = properties(r, v5, Context::Subscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string("topic filter")?;
        let options = r.u8("subscription options")?;
        let reserved = if v5 { options & 0xc0 } else { options & 0xfc };
        if reserved != 0 {
            return Err(malformed("reserved subscription option bits set")); // MQTT-3.8.3-5
        }
        let qos = QoS::from_bits(options & 0x03).ok_or_else(|| malformed("subscription QoS 3"))?;
        let retain_handling = (options >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(protocol_error("retain handling 3"));
        }
        filters.push((
            filter,
            SubscriptionOptions {
                qos,
                no_local: v5 && options & 0x04 != 0,
                retain_as_published: v5 && options & 0x08 != 0,
                retain_handling,
            },
        ));
    }
    if filters.is_empty() {
        return Err(protocol_error("SUBSCRIBE without a topic filter")); // MQTT-3.8.3-3
    }
    Ok(Subscribe { packet_id, filters, properties })
}

fn suback(r: &mut Reader, v5: bool, context: Context) -> Result<Suback, DecodeError> {
    let packet_id = nonzero_id(r)?;
    let properties = properties(r, v5, context)?;
    let mut codes = Vec::new();
    while !r.is_empty() {
        codes.push(ReasonCode(r.u8("reason code")?));
    }
    Ok(Suback { packet_id, codes, properties })
}

fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = nonzero_id(r)?;
    let properties = properties(r, v5, Context::Unsubscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string("topic filter")?);
    }
    if filters.is_empty() {
        return Err(protocol_error("UNSUBSCRIBE without a topic filter")); // MQTT-3.10.3-2
    }
    Ok(Unsubscribe { packet_id, filters, properties })
}

fn disconnect(r: &mut Reader, v5: bool, context: Context) -> Result<Disconnect, DecodeError> {
    let code = if v5 && !r.is_empty() { ReasonCode(r.u8("reason code")?) } else { ReasonCode::SUCCESS };
    let properties =
        if v5 && !r.is_empty() { Properties::decode(r, context)? } else { Properties::default() };
    Ok(Disconnect { code, properties })
}
