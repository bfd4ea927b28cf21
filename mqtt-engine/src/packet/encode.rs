//! Packets to bytes, for the version the connection speaks. The body is
//! built first, so the remaining length is known exactly; a 3.1.1 peer gets
//! no properties and no reason codes where its version has none.

use bytes::{BufMut, BytesMut};

use super::wire::{put_binary, put_string, put_varint};
use super::*;

/// Appends `packet`, encoded for `version`, to `buf`.
pub fn encode(packet: &Packet, version: Protocol, buf: &mut BytesMut) {
    let v5 = version == Protocol::V5;
    let mut body = BytesMut::new();
    let first = match packet {
        Packet::Connect(c) => {
            connect(c, &mut body);
            0x10
        }
        Packet::Connack(c) => {
            body.put_u8(u8::from(c.session_present));
            body.put_u8(c.code.0);
            if v5 {
                c.properties.encode(&mut body);
            }
            0x20
        }
        // The hot path: written straight into `buf`, the payload copied once.
        Packet::Publish(p) => return publish(p, v5, buf),
        Packet::Puback(a) => ack(a, v5, &mut body, 0x40),
        Packet::Pubrec(a) => ack(a, v5, &mut body, 0x50),
        Packet::Pubrel(a) => ack(a, v5, &mut body, 0x62),
        Packet::Pubcomp(a) => ack(a, v5, &mut body, 0x70),
        Packet::Subscribe(s) => {
            body.put_u16(s.packet_id);
            if v5 {
                s.properties.encode(&mut body);
            }
            for (filter, o) in &s.filters {
                put_string(&mut body, filter);
                let mut options = o.qos as u8;
                if v5 {
                    options |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 0x03) << 4;
                }
                body.put_u8(options);
            }
            0x82
        }
        Packet::Suback(s) => codes(s, v5, &mut body, 0x90),
        Packet::Unsubscribe(u) => {
            body.put_u16(u.packet_id);
            if v5 {
                u.properties.encode(&mut body);
            }
            for filter in &u.filters {
                put_string(&mut body, filter);
            }
            0xa2
        }
        // 3.1.1's UNSUBACK has no reason codes.
        Packet::Unsuback(s) if !v5 => {
            body.put_u16(s.packet_id);
            0xb0
        }
        Packet::Unsuback(s) => codes(s, v5, &mut body, 0xb0),
        Packet::Pingreq => 0xc0,
        Packet::Pingresp => 0xd0,
        Packet::Disconnect(d) => {
            if v5 && (d.code != ReasonCode::SUCCESS || !d.properties.is_empty()) {
                body.put_u8(d.code.0);
                if !d.properties.is_empty() {
                    d.properties.encode(&mut body);
                }
            }
            0xe0
        }
        Packet::Auth(d) => {
            body.put_u8(d.code.0);
            d.properties.encode(&mut body);
            0xf0
        }
    };
    buf.reserve(body.len() + 5);
    buf.put_u8(first);
    put_varint(buf, body.len() as u32);
    buf.put_slice(&body);
}

fn publish(p: &Publish, v5: bool, buf: &mut BytesMut) {
    let mut properties = BytesMut::new();
    if v5 {
        p.properties.encode(&mut properties);
    }
    let id_len = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    let remaining = 2 + p.topic.len() + id_len + properties.len() + p.payload.len();
    buf.reserve(remaining + 5);
    buf.put_u8(0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain));
    put_varint(buf, remaining as u32);
    put_string(buf, &p.topic);
    if id_len > 0 {
        buf.put_u16(p.packet_id);
    }
    buf.put_slice(&properties);
    buf.put_slice(&p.payload);
}

fn connect(c: &Connect, body: &mut BytesMut) {
    let v5 = c.protocol == Protocol::V5;
    put_string(body, "MQTT");
    body.put_u8(if v5 { 5 } else { 4 });
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    if v5 {
        c.properties.encode(body);
    }
    put_string(body, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            w.properties.encode(body);
        }
        put_string(body, &w.topic);
        put_binary(body, &w.payload);
    }
    if let Some(u) = &c.username {
        put_string(body, u);
    }
    if let Some(p) = &c.password {
        put_binary(body, p);
    }
}

fn ack(a: &Ack, v5: bool, body: &mut BytesMut, first: u8) -> u8 {
    body.put_u16(a.packet_id);
    // 5.0 allows the short form when the reason is Success and there are
    // no properties (3.4.2.1).
    if v5 && (a.code != ReasonCode::SUCCESS || !a.properties.is_empty()) {
        body.put_u8(a.code.0);
        if !a.properties.is_empty() {
            a.properties.encode(body);
        }
    }
    first
}

fn codes(s: &Suback, v5: bool, body: &mut BytesMut, first: u8) -> u8 {
    body.put_u16(s.packet_id);
    if v5 {
        s.properties.encode(body);
    }
    for code in &s.codes {
        body.put_u8(code.0);
    }
    first
}
