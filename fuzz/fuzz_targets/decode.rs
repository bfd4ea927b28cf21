//! The packet decoder on arbitrary bytes: it must never panic, and what it
//! accepts must survive a round trip (encode, decode again, same packet).
//! Input: one byte choosing the version (none yet, 3.1.1, 5.0), the fixed
//! header's first byte, then the body.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mqtt_engine::packet::{decode, encode, Protocol};

fuzz_target!(|data: &[u8]| {
    let [selector, first, body @ ..] = data else { return };
    let version = match selector % 3 {
        0 => None,
        1 => Some(Protocol::V311),
        _ => Some(Protocol::V5),
    };
    let Ok(packet) = decode(*first, Bytes::copy_from_slice(body), version) else { return };
    let encode_as = version.unwrap_or(Protocol::V311);
    let mut buf = BytesMut::new();
    encode(&packet, encode_as, &mut buf);
    // Split the encoded packet back into first byte and body.
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = buf[i];
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    assert_eq!(buf.len(), i + len, "the remaining length matches the body");
    let again = decode(buf[0], buf.freeze().slice(i..), version.or(Some(encode_as)));
    // A CONNECT decoded before the version is known re-encodes in its own
    // version; everything else must come back identical.
    if let Ok(again) = again {
        assert_eq!(again, packet, "round trip");
    } else {
        panic!("re-encoded packet does not decode: {again:?}");
    }
});
