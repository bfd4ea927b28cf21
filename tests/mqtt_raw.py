"""A minimal MQTT client on a raw socket, for tests that must control every
byte: packet identifiers, when an acknowledgement is (not) sent, malformed
input. Written from the specifications; paho-mqtt is used wherever a real
client's behaviour is what the test is about."""

import socket
import struct
import time


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def props(pairs=()) -> bytes:
    """MQTT 5 properties from (id, encoded value) pairs."""
    body = b"".join(bytes([pid]) + value for pid, value in pairs)
    return varint(len(body)) + body


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(client_id, v5=True, clean=True, keep_alive=60, properties=(), will=None) -> bytes:
    flags = 0x02 if clean else 0
    payload = string(client_id)
    if will:
        topic, message, qos, will_props = will
        flags |= 0x04 | (qos << 3)
        payload += (props(will_props) if v5 else b"") + string(topic) + string(message)
    body = string("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", keep_alive)
    body += (props(properties) if v5 else b"") + payload
    return packet(0x10, body)


def publish(topic, payload=b"", qos=0, packet_id=0, dup=False, retain=False, v5=True, properties=()) -> bytes:
    body = string(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    body += (props(properties) if v5 else b"") + (payload.encode() if isinstance(payload, str) else payload)
    return packet(0x30 | (dup << 3) | (qos << 1) | retain, body)


def subscribe(packet_id, filters, v5=True, properties=()) -> bytes:
    body = struct.pack("!H", packet_id) + (props(properties) if v5 else b"")
    for f, options in filters:
        body += string(f) + bytes([options])
    return packet(0x82, body)


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70."""
    return packet(kind, struct.pack("!H", packet_id))


class Raw:
    """A socket speaking MQTT packets."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the broker")
            self.buf += chunk

    def recv(self, timeout=5.0):
        """The next packet as (first byte, body); ConnectionError on close."""
        deadline = time.monotonic() + timeout
        self._fill(2, deadline)
        length, shift, i = 0, 0, 1
        while True:
            self._fill(i + 1, deadline)
            b = self.buf[i]
            length |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                break
        self._fill(i + length, deadline)
        first, body = self.buf[0], self.buf[i : i + length]
        self.buf = self.buf[i + length :]
        return first, body

    def expect(self, kind: int, timeout=5.0):
        """The next packet, which must be of `kind` (the high nibble)."""
        first, body = self.recv(timeout)
        assert first >> 4 == kind, f"expected packet type {kind}, got {first >> 4} ({first:#x} {body!r})"
        return first, body

    def closed(self, timeout=5.0):
        """Waits for the broker to close; returns the packets sent before."""
        got = []
        try:
            while True:
                got.append(self.recv(timeout))
        except ConnectionError:
            return got
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"the broker did not close the connection within {timeout}s; got {got}")

    def close(self):
        self.sock.close()


def parse_publish(first, body, v5=True):
    """(topic, payload, qos, packet id, properties bytes)."""
    qos = (first >> 1) & 3
    tlen = struct.unpack("!H", body[:2])[0]
    topic = body[2 : 2 + tlen].decode()
    pos = 2 + tlen
    pid = 0
    if qos:
        pid = struct.unpack("!H", body[pos : pos + 2])[0]
        pos += 2
    properties = b""
    if v5:
        plen, shift = 0, 0
        while True:
            b = body[pos]
            pos += 1
            plen |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        properties = body[pos : pos + plen]
        pos += plen
    return topic, body[pos:], qos, pid, properties
