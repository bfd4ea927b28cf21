//! MQTT 5 properties (section 2.2.2): one struct for every property, with
//! the table of which packet may carry which. A property a packet may not
//! carry, a value of the wrong type, or a property given twice where the
//! specification allows one, is a malformed packet or a protocol error.

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{put_binary, put_string, put_varint, Reader};
use super::{DecodeError, ReasonCode};

/// Where a property list stands; each property is allowed in some of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Connect,
    Connack,
    Publish,
    Will,
    Ack,
    Subscribe,
    Suback,
    Unsubscribe,
    Unsuback,
    Disconnect,
    Auth,
}

impl Context {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// Every MQTT 5 property; `None` / empty when absent. Each field is the
/// property of the same name in Table 2-4 of the specification.
#[allow(missing_docs)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

use Context::*;

/// Which contexts allow property `id` (Table 2-4 of MQTT 5.0).
fn allowed(id: u32) -> u16 {
    let ctx: &[Context] = match id {
        0x01..=0x03 | 0x08 | 0x09 => &[Publish, Will],
        0x0B => &[Publish, Subscribe],
        0x11 => &[Connect, Connack, Disconnect],
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28..=0x2A => &[Connack],
        0x15 | 0x16 => &[Connect, Connack, Auth],
        0x17 | 0x19 => &[Connect],
        0x18 => &[Will],
        0x1C => &[Connack, Disconnect],
        0x1F => &[Connack, Ack, Suback, Unsuback, Disconnect, Auth],
        0x21 | 0x22 | 0x27 => &[Connect, Connack],
        0x23 => &[Publish],
        0x26 => &[
            Connect,
            Connack,
            Publish,
            Will,
            Ack,
            Subscribe,
            Suback,
            Unsubscribe,
            Unsuback,
            Disconnect,
            Auth,
        ],
        _ => &[],
    };
    ctx.iter().fold(0, |mask, c| mask | c.bit())
}

fn once<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::new(ReasonCode::PROTOCOL_ERROR, "a property given twice"));
    }
    *slot = Some(value);
    Ok(())
}

fn flag(r: &mut Reader, what: &'static str) -> Result<u8, DecodeError> {
    let v = r.u8(what)?;
    if v > 1 {
        return Err(DecodeError::new(ReasonCode::PROTOCOL_ERROR, what));
    }
    Ok(v)
}

impl Properties {
    /// Reads a property list (its length, then the properties).
    pub fn decode(r: &mut Reader, context: Context) -> Result<Properties, DecodeError> {
        let len = r.varint("property length")? as usize;
        let mut r = r.sub(len, "property length beyond the packet")?;
        let mut p = Properties::default();
        while !r.is_empty() {
            let id = r.varint("property identifier")?;
            if allowed(id) & context.bit() == 0 {
                return Err(DecodeError::new(
                    ReasonCode::MALFORMED_PACKET,
                    "a property this packet may not carry",
                ));
            }
            match id {
                0x01 => once(&mut p.payload_format_indicator, flag(&mut r, "payload format indicator")?)?,
                0x02 => once(&mut p.message_expiry_interval, r.u32("message expiry")?)?,
                0x03 => once(&mut p.content_type, r.string("content type")?)?,
                0x08 => once(&mut p.response_topic, r.string("response topic")?)?,
                0x09 => once(&mut p.correlation_data, r.binary("correlation data")?)?,
                0x0B => {
                    let sid = r.varint("subscription identifier")?;
                    if sid == 0 {
                        return Err(DecodeError::new(
                            ReasonCode::PROTOCOL_ERROR,
                            "subscription identifier 0",
                        ));
                    }
                    if context == Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::new(
                            ReasonCode::PROTOCOL_ERROR,
                            "two subscription identifiers",
                        ));
                    }
                    p.subscription_identifiers.push(sid);
                }
                0x11 => once(&mut p.session_expiry_interval, r.u32("session expiry")?)?,
                0x12 => once(&mut p.assigned_client_identifier, r.string("assigned client id")?)?,
                0x13 => once(&mut p.server_keep_alive, r.u16("server keep alive")?)?,
                0x15 => once(&mut p.authentication_method, r.string("authentication method")?)?,
                0x16 => once(&mut p.authentication_data, r.binary("authentication data")?)?,
                0x17 => {
                    once(&mut p.request_problem_information, flag(&mut r, "request problem information")?)?
                }
                0x18 => once(&mut p.will_delay_interval, r.u32("will delay")?)?,
                0x19 => {
                    once(&mut p.request_response_information, flag(&mut r, "request response information")?)?
                }
                0x1A => once(&mut p.response_information, r.string("response information")?)?,
                0x1C => once(&mut p.server_reference, r.string("server reference")?)?,
                0x1F => once(&mut p.reason_string, r.string("reason string")?)?,
                0x21 => {
                    let v = r.u16("receive maximum")?;
                    if v == 0 {
                        return Err(DecodeError::new(ReasonCode::PROTOCOL_ERROR, "receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, v)?
                }
                0x22 => once(&mut p.topic_alias_maximum, r.u16("topic alias maximum")?)?,
                0x23 => once(&mut p.topic_alias, r.u16("topic alias")?)?,
                0x24 => once(&mut p.maximum_qos, flag(&mut r, "maximum qos")?)?,
                0x25 => once(&mut p.retain_available, flag(&mut r, "retain available")?)?,
                0x26 => {
                    let key = r.string("user property")?;
                    let value = r.string("user property")?;
                    p.user_properties.push((key, value));
                }
                0x27 => {
                    let v = r.u32("maximum packet size")?;
                    if v == 0 {
                        return Err(DecodeError::new(ReasonCode::PROTOCOL_ERROR, "maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                0x28 => once(&mut p.wildcard_subscription_available, flag(&mut r, "wildcard available")?)?,
                0x29 => once(&mut p.subscription_identifier_available, flag(&mut r, "sub ids available")?)?,
                0x2A => once(&mut p.shared_subscription_available, flag(&mut r, "shared available")?)?,
                _ => return Err(DecodeError::new(ReasonCode::MALFORMED_PACKET, "an unknown property")),
            }
        }
        Ok(p)
    }

    /// Writes the property list with its length prefix.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut body = BytesMut::new();
        let b = &mut body;
        let byte = |b: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u8(v);
            }
        };
        let u16p = |b: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u16(v);
            }
        };
        let u32p = |b: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u32(v);
            }
        };
        let strp = |b: &mut BytesMut, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                b.put_u8(id);
                put_string(b, v);
            }
        };
        let binp = |b: &mut BytesMut, id: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                b.put_u8(id);
                put_binary(b, v);
            }
        };
        byte(b, 0x01, self.payload_format_indicator);
        u32p(b, 0x02, self.message_expiry_interval);
        strp(b, 0x03, &self.content_type);
        strp(b, 0x08, &self.response_topic);
        binp(b, 0x09, &self.correlation_data);
        for sid in &self.subscription_identifiers {
            b.put_u8(0x0B);
            put_varint(b, *sid);
        }
        u32p(b, 0x11, self.session_expiry_interval);
        strp(b, 0x12, &self.assigned_client_identifier);
        u16p(b, 0x13, self.server_keep_alive);
        strp(b, 0x15, &self.authentication_method);
        binp(b, 0x16, &self.authentication_data);
        byte(b, 0x17, self.request_problem_information);
        u32p(b, 0x18, self.will_delay_interval);
        byte(b, 0x19, self.request_response_information);
        strp(b, 0x1A, &self.response_information);
        strp(b, 0x1C, &self.server_reference);
        strp(b, 0x1F, &self.reason_string);
        u16p(b, 0x21, self.receive_maximum);
        u16p(b, 0x22, self.topic_alias_maximum);
        u16p(b, 0x23, self.topic_alias);
        byte(b, 0x24, self.maximum_qos);
        byte(b, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            b.put_u8(0x26);
            put_string(b, k);
            put_string(b, v);
        }
        u32p(b, 0x27, self.maximum_packet_size);
        byte(b, 0x28, self.wildcard_subscription_available);
        byte(b, 0x29, self.subscription_identifier_available);
        byte(b, 0x2A, self.shared_subscription_available);
        put_varint(buf, body.len() as u32);
        buf.put_slice(&body);
    }

    /// Whether nothing is set (short forms of acks may then be used).
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &'static [u8], context: Context) -> Result<Properties, DecodeError> {
        Properties::decode(&mut Reader::new(Bytes::from_static(bytes)), context)
    }

    #[test]
    fn properties_round_trip() {
        let p = Properties {
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"id-7")),
            subscription_identifiers: vec![1, 300],
            user_properties: vec![("site".into(), "plant-1".into()), ("site".into(), "again".into())],
            ..Properties::default()
        };
        let mut buf = BytesMut::new();
        p.encode(&mut buf);
        assert_eq!(Properties::decode(&mut Reader::new(buf.freeze()), Publish).unwrap(), p);
    }

    #[test]
    fn a_property_in_the_wrong_packet_is_malformed() {
        // Topic Alias (0x23) in CONNECT.
        let err = decode(&[3, 0x23, 0, 1], Connect).unwrap_err();
        assert_eq!(err.reason, ReasonCode::MALFORMED_PACKET);
    }

    #[test]
    fn a_property_given_twice_is_a_protocol_error() {
        // Message Expiry Interval twice (MQTT 2.2.2.2).
        let err = decode(&[10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2], Publish).unwrap_err();
        assert_eq!(err.reason, ReasonCode::PROTOCOL_ERROR);
    }

    #[test]
    fn zero_receive_maximum_is_a_protocol_error() {
        // MQTT-3.1.2-? : Receive Maximum of 0 is a Protocol Error.
        let err = decode(&[3, 0x21, 0, 0], Connect).unwrap_err();
        assert_eq!(err.reason, ReasonCode::PROTOCOL_ERROR);
    }

    #[test]
    fn a_property_list_longer_than_the_packet_is_malformed() {
        assert_eq!(decode(&[9, 0x01, 1], Publish).unwrap_err().reason, ReasonCode::MALFORMED_PACKET);
    }
}
