//! A hand-made client side: requests written out, frames masked here.

use std::time::Duration;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn request(extra: &str) -> String {
    format!(
        "GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A client frame, masked unless `masked` is false.
fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![b0];
    let bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn binary(payload: &[u8]) -> Vec<u8> {
    frame(0x82, payload, true)
}

/// Reads one server frame: its first byte and its payload.
async fn read_frame(client: &mut DuplexStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1] & 0x80, 0, "a server frame is not masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(client.read_u16().await.unwrap()),
        127 => client.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    client.read_exact(&mut payload).await.unwrap();
    (head[0], payload)
}

/// Reads the HTTP response, up to its blank line.
async fn read_response(client: &mut DuplexStream) -> String {
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let byte = client.read_u8().await.unwrap();
        response.push(byte);
    }
    String::from_utf8(response).unwrap()
}

/// Sends `request` (and anything behind it), runs [`accept`], and returns
/// its result, the client's end and the response.
async fn handshake(request: &[u8]) -> (Result<WebSocket<DuplexStream>, WsError>, DuplexStream, String) {
    let (mut client, server) = duplex(1 << 20);
    client.write_all(request).await.unwrap();
    let result = accept(server).await;
    let response = read_response(&mut client).await;
    (result, client, response)
}

async fn connected() -> (WebSocket<DuplexStream>, DuplexStream) {
    let (ws, client, response) = handshake(request("Sec-WebSocket-Protocol: mqtt\r\n").as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    (ws.unwrap(), client)
}

#[test]
fn accept_key_of_rfc_6455_section_1_3() {
    assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[test]
fn is_small_and_send() {
    fn send<T: Send>(_: &T) {}
    let (_, server) = duplex(16);
    send(&accept(server));
    send(&WebSocket::new(duplex(16).0, Subprotocol::None));
    // Thousands of idle connections: keep an eye on the size.
    assert!(std::mem::size_of::<WebSocket<()>>() <= 112, "{}", std::mem::size_of::<WebSocket<()>>());
}

#[tokio::test]
async fn handshake_chooses_mqtt() {
    let (ws, _, response) = handshake(request("Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n").as_bytes()).await;
    assert_eq!(
        response,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    assert_eq!(ws.unwrap().subprotocol(), Some("mqtt"));
}

#[tokio::test]
async fn handshake_headers_are_case_insensitive_and_may_repeat() {
    let request = format!(
        "GET / HTTP/1.1\r\nupgrade: WebSocket\r\nCONNECTION: upgrade\r\nsec-websocket-key: {KEY}\r\n\
         sec-websocket-version: 13\r\nsec-websocket-protocol: chat\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    let (ws, _, response) = handshake(request.as_bytes()).await;
    assert!(response.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{response}");
    assert_eq!(ws.unwrap().subprotocol(), Some("mqtt"));
}

#[tokio::test]
async fn handshake_falls_back_to_mqttv31() {
    let (ws, _, response) = handshake(request("Sec-WebSocket-Protocol: chat, mqttv3.1\r\n").as_bytes()).await;
    assert!(response.contains("\r\nSec-WebSocket-Protocol: mqttv3.1\r\n"), "{response}");
    assert_eq!(ws.unwrap().subprotocol(), Some("mqttv3.1"));
}

#[tokio::test]
async fn handshake_without_subprotocol() {
    let (ws, _, response) = handshake(request("").as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    assert!(!response.contains("Sec-WebSocket-Protocol"), "{response}");
    assert_eq!(ws.unwrap().subprotocol(), None);
}

#[tokio::test]
async fn handshake_refuses_other_subprotocols() {
    let (ws, _, response) = handshake(request("Sec-WebSocket-Protocol: chat\r\n").as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{response}");
    assert!(matches!(ws, Err(WsError::NoSubprotocol)));
}

#[tokio::test]
async fn handshake_refuses_a_wrong_version() {
    let request = request("").replace("Version: 13", "Version: 8");
    let (ws, _, response) = handshake(request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{response}");
    assert!(response.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{response}");
    let Err(e) = ws else { panic!("accepted") };
    assert!(matches!(&e, WsError::UnsupportedVersion(v) if v == "8"), "{e}");
}

#[tokio::test]
async fn only_allowed_browser_origins_are_upgraded_when_a_list_is_set() {
    let allowed = ["https://dashboard.plant.local".to_owned()];
    for (origin, upgraded) in [
        ("Origin: https://dashboard.plant.local\r\n", true),
        ("Origin: HTTPS://Dashboard.Plant.Local\r\n", true),
        ("Origin: https://evil.example\r\n", false),
        ("Origin: null\r\n", false),
        ("", true), // not a browser: no Origin header
    ] {
        let (mut client, server) = duplex(1 << 20);
        client.write_all(request(origin).as_bytes()).await.unwrap();
        let result = accept_from(server, &allowed).await;
        let response = read_response(&mut client).await;
        assert_eq!(result.is_ok(), upgraded, "{origin:?}: {response}");
        if !upgraded {
            assert!(response.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{response}");
            assert!(matches!(result, Err(WsError::OriginNotAllowed(_))));
        }
    }
    // Without a list, any origin is upgraded.
    let (ws, _, _) = handshake(request("Origin: https://evil.example\r\n").as_bytes()).await;
    assert!(ws.is_ok());
}

#[tokio::test]
async fn handshake_refuses_a_plain_get() {
    let (ws, _, response) = handshake(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{response}");
    assert!(matches!(ws, Err(WsError::NotUpgrade)));
}

#[tokio::test]
async fn handshake_refuses_bad_requests() {
    let cases = [
        (request("").replace("GET", "POST"), "request line"),
        (request("").replace("HTTP/1.1", "HTTP/1.0"), "request line"),
        (request("").replace(KEY, "c2hvcnQ="), "Key"),
        (request(&format!("Sec-WebSocket-Key: {KEY}\r\n")), "Key"),
        (request("").replace("Upgrade: websocket", "Upgrade: h2c"), "not a WebSocket upgrade"),
        (request("no colon\r\n"), "colon"),
    ];
    for (request, why) in cases {
        let (ws, _, response) = handshake(request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{response}");
        let Err(e) = ws else { panic!("{request} accepted") };
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[tokio::test]
async fn handshake_refuses_headers_over_8_kib() {
    let long = format!("X-Padding: {}\r\n", "a".repeat(MAX_HEAD));
    let (ws, _, response) = handshake(request(&long).as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{response}");
    assert!(matches!(ws, Err(WsError::HeadersTooLarge)));

    // Never ending headers are refused at the limit, without waiting for more.
    let (mut client, server) = duplex(1 << 20);
    client.write_all(request(&long).trim_end().as_bytes()).await.unwrap();
    assert!(matches!(accept(server).await, Err(WsError::HeadersTooLarge)));

    // Just under the limit is fine.
    let base = request("X-Padding: \r\n").len();
    let fits = format!("X-Padding: {}\r\n", "a".repeat(MAX_HEAD - base));
    assert_eq!(request(&fits).len(), MAX_HEAD);
    let (ws, _, _) = handshake(request(&fits).as_bytes()).await;
    assert!(ws.is_ok());
}

#[tokio::test]
async fn handshake_on_a_closed_stream_is_an_io_error() {
    let (client, server) = duplex(64);
    drop(client);
    assert!(matches!(accept(server).await, Err(WsError::Io(_))));
}

#[tokio::test]
async fn bytes_behind_the_request_are_kept() {
    let mut bytes = request("Sec-WebSocket-Protocol: mqtt\r\n").into_bytes();
    bytes.extend(binary(b"\x10\x0aCONNECT..."));
    let (ws, _, _) = handshake(&bytes).await;
    let mut ws = ws.unwrap();
    let mut got = [0u8; 12];
    ws.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"\x10\x0aCONNECT...");
}

#[tokio::test]
async fn frames_are_one_byte_stream() {
    let (mut ws, mut client) = connected().await;
    // A packet split across a binary and a continuation frame, then two
    // packets in one frame.
    let mut bytes = frame(0x02, b"\x30\x05ab", true);
    bytes.extend(frame(0x80, b"cde", true));
    bytes.extend(binary(b"\xc0\x00\xd0\x00"));
    client.write_all(&bytes).await.unwrap();
    let mut got = [0u8; 7];
    ws.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"\x30\x05abcde");
    let mut got = [0u8; 4];
    ws.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"\xc0\x00\xd0\x00");

    // Frames arriving a byte at a time and read a byte at a time: the
    // mask stays in step across the pieces of a payload.
    let payload: Vec<u8> = (0..=255).collect();
    let mut bytes = binary(&payload[..100]);
    bytes.extend(frame(0x02, &payload[100..200], true));
    bytes.extend(frame(0x00, &[], true));
    bytes.extend(frame(0x80, &payload[200..], true));
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 256 {
            let mut one = [0u8; 1];
            assert_eq!(ws.read(&mut one).await.unwrap(), 1);
            got.push(one[0]);
        }
        got
    });
    for byte in bytes {
        client.write_all(&[byte]).await.unwrap();
    }
    assert_eq!(reader.await.unwrap(), payload);
}

#[tokio::test]
async fn ping_is_answered_while_only_reading() {
    let (mut ws, mut client) = connected().await;
    let reader = tokio::spawn(async move {
        let mut got = [0u8; 2];
        ws.read_exact(&mut got).await.unwrap();
        got
    });
    client.write_all(&frame(0x89, b"hi", true)).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client)).await.unwrap();
    assert_eq!(pong, (0x8a, b"hi".to_vec()));
    // A pong from the client is ignored.
    client.write_all(&frame(0x8a, b"", true)).await.unwrap();
    client.write_all(&binary(b"ok")).await.unwrap();
    assert_eq!(&reader.await.unwrap(), b"ok");
}

#[tokio::test]
async fn close_is_answered_and_ends_the_stream() {
    let (mut ws, mut client) = connected().await;
    let mut bytes = binary(b"last");
    bytes.extend(frame(0x88, &[0x03, 0xe9, b'b', b'y', b'e'], true));
    bytes.extend(binary(b"after the close"));
    client.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    assert_eq!(ws.read_to_end(&mut got).await.unwrap(), 4);
    assert_eq!(got, b"last");
    assert_eq!(read_frame(&mut client).await, (0x88, vec![0x03, 0xe9]));
    assert_eq!(ws.read(&mut [0u8; 8]).await.unwrap(), 0);
    assert_eq!(ws.write(b"x").await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    // No second close frame on shutdown.
    ws.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn end_of_stream_without_close() {
    let (mut ws, mut client) = connected().await;
    client.write_all(&binary(b"x")).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    ws.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"x");

    // In the middle of a frame, it is an error.
    let (mut ws, mut client) = connected().await;
    client.write_all(&binary(b"cut short")[..8]).await.unwrap();
    client.shutdown().await.unwrap();
    let e = ws.read_to_end(&mut Vec::new()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}

/// Sends `bytes`, expects reading to fail (after any valid data), and
/// returns the close frame's status code and the error.
async fn refused(bytes: &[u8]) -> (u16, io::Error) {
    let (mut ws, mut client) = connected().await;
    client.write_all(bytes).await.unwrap();
    let e = loop {
        match ws.read(&mut [0u8; 64]).await {
            Ok(0) => panic!("end of stream instead of an error"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    // Later reads fail too, and nothing more is written.
    assert_eq!(ws.read(&mut [0u8; 64]).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    assert!(ws.write(b"x").await.is_err());
    ws.shutdown().await.unwrap();
    let (b0, payload) = read_frame(&mut client).await;
    assert_eq!(b0, 0x88);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "one close frame only: {rest:?}");
    (u16::from_be_bytes([payload[0], payload[1]]), e)
}

#[tokio::test]
async fn protocol_errors_are_refused() {
    let (code, e) = refused(&frame(0x82, b"plain", false)).await;
    assert_eq!(code, 1002);
    assert!(e.to_string().contains("unmasked"), "{e}");

    let (code, e) = refused(&frame(0x81, b"text", true)).await;
    assert_eq!(code, 1003);
    assert!(e.to_string().contains("text"), "{e}");

    let cases: [(Vec<u8>, &str); 6] = [
        (frame(0xc2, b"rsv1", true), "reserved"),
        (frame(0x09, b"fragmented ping", true), "control"),
        (frame(0x89, &[0; 126], true), "control"),
        (frame(0x80, b"no start", true), "sequence"),
        ([frame(0x02, b"open", true), binary(b"new")].concat(), "sequence"),
        (frame(0x83, b"", true), "opcode"),
    ];
    for (bytes, why) in cases {
        let (code, e) = refused(&bytes).await;
        assert_eq!(code, 1002, "{why}");
        assert!(e.to_string().contains(why), "{e}");
    }

    let (code, _) = refused(&frame(0x88, b"x", true)).await;
    assert_eq!(code, 1002);

    // The top bit of a 64-bit length must be clear.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    header.extend_from_slice(&MASK);
    let (code, e) = refused(&header).await;
    assert_eq!(code, 1002);
    assert!(e.to_string().contains("top bit"), "{e}");
}

#[tokio::test]
async fn oversize_frame_refused_from_its_header() {
    // Only the header is sent: the refusal cannot wait for a payload.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&MASK);
    let (code, e) = refused(&header).await;
    assert_eq!(code, 1009);
    assert!(e.to_string().contains("size limit"), "{e}");

    let (mut ws, mut client) = connected().await;
    ws.set_max_frame(100);
    client.write_all(&binary(&[7; 100])).await.unwrap();
    let mut got = [0u8; 100];
    ws.read_exact(&mut got).await.unwrap();
    client.write_all(&binary(&[7; 101])[..6]).await.unwrap();
    let e = ws.read(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(read_frame(&mut client).await, (0x88, 1009u16.to_be_bytes().to_vec()));
}

#[tokio::test]
async fn lengths_of_16_and_64_bits_both_ways() {
    let (mut ws, mut client) = connected().await;
    let medium: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let large: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    let mut bytes = binary(&medium);
    assert_eq!(bytes[1], 0x80 | 126);
    bytes.extend(binary(&large));
    let writer = tokio::spawn(async move {
        client.write_all(&bytes).await.unwrap();
        client
    });
    let mut got = vec![0u8; medium.len() + large.len()];
    ws.read_exact(&mut got).await.unwrap();
    assert_eq!(got[..300], medium[..]);
    assert_eq!(got[300..], large[..]);
    let mut client = writer.await.unwrap();

    // Each write is one binary frame of at most 64 KiB.
    ws.write_all(&medium).await.unwrap();
    ws.write_all(&large).await.unwrap();
    ws.write_all(b"small").await.unwrap();
    let reader = tokio::spawn(async move {
        let mut frames = Vec::new();
        for _ in 0..4 {
            frames.push(read_frame(&mut client).await);
        }
        frames
    });
    ws.flush().await.unwrap();
    let frames = reader.await.unwrap();
    assert!(frames.iter().all(|(b0, _)| *b0 == 0x82), "binary frames with FIN");
    assert_eq!(frames[0].1, medium);
    assert_eq!(frames[1].1.len(), MAX_OUT_FRAME);
    assert_eq!([&frames[1].1[..], &frames[2].1[..]].concat(), large);
    assert_eq!(frames[3].1, b"small");
}

#[tokio::test]
async fn shutdown_sends_a_normal_close() {
    let (mut ws, mut client) = connected().await;
    ws.write_all(b"\xe0\x00").await.unwrap();
    ws.shutdown().await.unwrap();
    assert_eq!(read_frame(&mut client).await, (0x82, b"\xe0\x00".to_vec()));
    assert_eq!(read_frame(&mut client).await, (0x88, 1000u16.to_be_bytes().to_vec()));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn buffers_are_freed_when_empty() {
    let (mut ws, mut client) = connected().await;
    client.write_all(&[binary(b"one"), binary(b"two")].concat()).await.unwrap();
    let mut got = [0u8; 2];
    ws.read_exact(&mut got).await.unwrap();
    assert!(ws.rbuf.capacity() > 0, "the rest of the chunk is kept");
    let mut got = [0u8; 4];
    ws.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"etwo");
    assert_eq!(ws.rbuf.capacity(), 0);
    ws.write_all(b"out").await.unwrap();
    ws.flush().await.unwrap();
    assert_eq!(ws.wbuf.capacity(), 0);
    assert_eq!(read_frame(&mut client).await, (0x82, b"out".to_vec()));
}
