"""Harness for the broker security tests: a gateway started with the
listeners, password file and ACL a test asks for; a paho client that
records connect, SUBACK and PUBACK reason codes and what it receives; a raw
MQTT connection (plain or TLS, from a chosen loopback source address) that
reads CONNACK codes byte for byte; a `$SYS` watcher; a Modbus device.

Every listener is on 127.0.0.1 on a port chosen at run time. Login refusals
are slowed per client address, so tests that are not about that slowdown
connect from addresses of their own (127.x.y.z all reach 127.0.0.1 on
Linux): an earlier refusal in the same test cannot slow a later check."""

import json
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

import mqtt_raw as raw
from upstream_peer import free_port, need

HERE = Path(__file__).resolve().parent

# transport as the log names it -> the [broker] key
KEYS = {"mqtt": "listen", "mqtts": "tls_listen", "ws": "ws_listen", "wss": "wss_listen"}

# CONNACK codes
V3_ACCEPTED, V3_SERVER_UNAVAILABLE, V3_BAD_CREDENTIALS, V3_NOT_AUTHORIZED = 0x00, 0x03, 0x04, 0x05
V5_SUCCESS, V5_BAD_CREDENTIALS, V5_NOT_AUTHORIZED, V5_SERVER_BUSY = 0x00, 0x86, 0x87, 0x89
# SUBACK / PUBACK / DISCONNECT
V3_SUB_FAILURE, V5_SUB_NOT_AUTHORIZED, V5_PUB_NOT_AUTHORIZED = 0x80, 0x87, 0x87
V5_PACKET_TOO_LARGE = 0x95
# A v5 PUBACK that accepted the message: 0x00, or 0x10 No matching subscribers.
PUBLISHED = (0x00, 0x10)

_sources = iter(range(secrets.randbelow(1 << 20), 1 << 40))


def new_source() -> str:
    """A loopback address (not 127.0.0.1) no other connection of this run used."""
    while True:
        n = next(_sources)
        a, b, c = (n >> 16) % 250 + 2, (n >> 8) & 255, n & 255
        if c not in (0, 255):
            return f"127.{a}.{b}.{c}"


def fieldmq_passwd(bin_path, file, user, password=None, delete=False, cwd=None):
    """`fieldmq passwd FILE USER` with the password on stdin (one line)."""
    args = [bin_path, "passwd"] + (["--delete"] if delete else []) + [str(file), user]
    return subprocess.run(args, input=None if delete else password + "\n", capture_output=True,
                          text=True, timeout=30, cwd=cwd)


def mosquitto_passwd(file, user, password):
    tool = need("mosquitto_passwd", "mosquitto")
    proc = subprocess.run([tool, "-b", str(file), user, password], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------
# The gateway


class Broker:
    """A running gateway and its listener ports (by transport name)."""

    def __init__(self, gw, ports, folder: Path, config: Path):
        self.gw = gw
        self.ports = ports
        self.dir = folder
        self.config = config

    @property
    def port(self):
        return self.ports["mqtt"]

    def reload(self, timeout=5.0):
        """SIGHUP, and waits for the gateway to say the files were read."""
        mark = len(self.gw.lines)
        self.gw.send(signal.SIGHUP)
        m = self.gw.wait_for(r"SIGHUP: (password and ACL files read|the new .* was refused)", timeout, after=mark)
        assert "refused" not in m.group(1), "the reload was refused:\n" + "\n".join(self.gw.lines[mark:])


def broker_toml(ports, keys=None, extra="") -> str:
    lines = ["[gateway]", 'id = "gw"', 'data_dir = "state"', "", "[broker]"]
    if "mqtt" not in ports:
        lines.append("listen = []")  # not the default 127.0.0.1:1883
    for transport, port in ports.items():
        lines.append(f'{KEYS[transport]} = ["127.0.0.1:{port}"]')
    for key, value in (keys or {}).items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n" + extra


def start_broker(gateway, write_config, fieldmq_bin, folder, transports=("mqtt",), acl=None, passwords=None,
                 extra="", **keys) -> Broker:
    """Writes acl (text) and passwords ({user: password}, hashed by
    `fieldmq passwd`) next to the config, starts the gateway with the
    listeners named in `transports` and the other [broker] `keys`, and
    returns once every listener is ready."""
    folder = Path(folder)
    if acl is not None:
        (folder / "acl").write_text(acl)
        keys.setdefault("acl_file", "acl")
    if passwords:
        for user, password in passwords.items():
            proc = fieldmq_passwd(fieldmq_bin, folder / "passwd", user, password)
            assert proc.returncode == 0, proc.stderr
        keys.setdefault("password_file", "passwd")
    ports = {t: free_port() for t in transports}
    config = write_config(broker_toml(ports, keys, extra))
    gw = gateway(config, RUST_LOG="info")
    for transport, port in ports.items():
        gw.wait_for(rf'MQTT listener ready addr=127\.0\.0\.1:{port} transport="{transport}"')
    return Broker(gw, ports, folder, config)


# --------------------------------------------------------------------------
# A paho client


class Message:
    def __init__(self, msg):
        self.topic = msg.topic
        self.payload = bytes(msg.payload)
        self.retain = bool(msg.retain)
        self.qos = msg.qos

    def __repr__(self):
        return f"Message({self.topic!r}, {self.payload!r}, retain={self.retain})"


class Client:
    """A paho-mqtt 2.x client, connected at construction (loop running).

    transport: "tcp" or "websockets"; ca: trust this CA file and speak TLS
    (the server's name is checked); cert: (certfile, keyfile) to present.
    With expect_refusal the CONNACK code is kept in .rc instead of failing.
    """

    def __init__(self, port, *, v5=False, client_id="", username=None, password=None, transport="tcp",
                 ca=None, cert=None, will=None, clean=True, source=None, expect_refusal=False, timeout=5.0):
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        self.v5 = v5
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                             transport=transport, reconnect_on_failure=False, **kwargs)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if ca:
            certfile, keyfile = cert if cert else (None, None)
            self.c.tls_set(ca_certs=str(ca), certfile=certfile and str(certfile), keyfile=keyfile and str(keyfile),
                           cert_reqs=ssl.CERT_REQUIRED)
        if username is not None:
            self.c.username_pw_set(username, password)
        if will:
            self.c.will_set(*will)
        self.messages = []
        self.rc = None
        self.disconnected = None  # the DISCONNECT reason, once the connection ended
        self._cond = threading.Condition()
        self._subacks = {}
        self._pubacks = {}
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect
        connect_kwargs = {"clean_start": clean} if v5 else {}
        self.c.connect("127.0.0.1", port, keepalive=30, bind_address=source or new_source(), **connect_kwargs)
        self.c.loop_start()
        with self._cond:
            deadline = time.monotonic() + timeout
            while self.rc is None and self.disconnected is None and time.monotonic() < deadline:
                self._cond.wait(0.05)
        if self.rc is None:
            self.close()
            raise AssertionError(f"no CONNACK within {timeout}s from port {port} (disconnect: {self.disconnected})")
        if not expect_refusal and self.rc != 0:
            self.close()
            raise AssertionError(f"the broker refused the connection: CONNACK {self.rc:#04x} ({self.rc_name})")

    # paho turns a 3.1.1 return code into an MQTT 5 reason code: map it back.
    _V3 = {"Success": 0, "Unsupported protocol version": 1, "Client identifier not valid": 2,
           "Server unavailable": 3, "Bad user name or password": 4, "Not authorized": 5}

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.rc_name = reason_code.getName()
            self.rc = reason_code.value if self.v5 else self._V3.get(self.rc_name, reason_code.value)
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.disconnected = reason_code
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append(Message(msg))
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._pubacks[mid] = reason_code.value
            self._cond.notify_all()

    def _wait(self, table, mid, timeout, what):
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in table:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what} within {timeout}s (disconnect: {self.disconnected})")
                self._cond.wait(0.05)
            return table[mid]

    def subscribe(self, *filters, qos=1, timeout=5.0):
        """SUBSCRIBE to the filters in one packet; returns the SUBACK codes."""
        result, mid = self.c.subscribe([(f, qos) for f in filters])
        assert result == 0, f"subscribe failed locally: {result}"
        return self._wait(self._subacks, mid, timeout, "SUBACK")

    def publish(self, topic, payload, qos=1, retain=False, timeout=5.0):
        """Publishes; for QoS 1/2 waits for the acknowledgement and returns
        its reason code (always 0 in 3.1.1, which has none)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == 0, f"publish failed locally: {info.rc} (disconnect: {self.disconnected})"
        if qos == 0:
            return None
        return self._wait(self._pubacks, info.mid, timeout, f"PUBACK for {topic}")

    def received(self, topic=None):
        with self._cond:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, topic, timeout=5.0) -> Message:
        """The first message on `topic` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.topic == topic:
                        return m
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing on {topic} within {timeout}s; got {self.messages}")
                self._cond.wait(0.05)

    def wait_closed(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.disconnected is None and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return self.disconnected

    @property
    def connected(self):
        return self.c.is_connected()

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def round_trip(publisher: Client, subscriber: Client, topic, payload, qos=1):
    """Publishes and waits until the subscriber has it."""
    publisher.publish(topic, payload, qos=qos)
    m = subscriber.wait_for(topic)
    assert m.payload == (payload.encode() if isinstance(payload, str) else payload)
    return m


# --------------------------------------------------------------------------
# Raw connections


def connect_packet(client_id, v5=True, username=None, password=None, clean=True, keep_alive=60, will=None) -> bytes:
    """A CONNECT with optional user name and password; will = (topic, message, qos)."""
    flags = 0x02 if clean else 0
    payload = raw.string(client_id)
    if will:
        topic, message, qos = will
        flags |= 0x04 | (qos << 3)
        payload += (raw.props() if v5 else b"") + raw.string(topic) + raw.string(message)
    if username is not None:
        flags |= 0x80
        payload += raw.string(username)
    if password is not None:
        flags |= 0x40
        payload += raw.string(password)
    body = raw.string("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", keep_alive)
    body += (raw.props() if v5 else b"") + payload
    return raw.packet(0x10, body)


class RawConn(raw.Raw):
    """mqtt_raw.Raw from a source address of its own, optionally over TLS."""

    def __init__(self, port, tls: ssl.SSLContext = None, source=None, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source or new_source(), 0))
        if tls:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buf = b""


def tls_context(ca, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def connack(port, v5=True, tls=None, source=None, **connect) -> int:
    """Connects on a raw socket and returns the CONNACK code (the return code
    in 3.1.1, the reason code in 5.0); with a refusal also checks that the
    broker closed the connection (MQTT-3.2.2-5 / MQTT-3.2.2-7)."""
    c = RawConn(port, tls=tls, source=source)
    try:
        c.send(connect_packet(connect.pop("client_id", ""), v5=v5, **connect))
        first, body = c.expect(2, timeout=15)
        code = body[1]
        if code != 0:
            c.closed(timeout=5)
        return code
    finally:
        c.close()


def timed_connack(port, **kwargs):
    start = time.monotonic()
    code = connack(port, **kwargs)
    return code, time.monotonic() - start


def closed_after(sock, timeout) -> float:
    """Seconds until the peer closes `sock` (which sends nothing); fails
    after `timeout`."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                break
    except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
        pass
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"the connection was still open after {timeout}s")
    return time.monotonic() - start


# --------------------------------------------------------------------------
# $SYS


class SysWatcher(Client):
    """A client subscribed to $SYS/broker/#, keeping the latest value of each topic."""

    def __init__(self, port, **kwargs):
        super().__init__(port, **kwargs)
        codes = self.subscribe("$SYS/broker/#", qos=0)
        assert codes == [0], f"cannot subscribe to $SYS: {codes}"

    def values(self):
        with self._cond:
            return {m.topic[len("$SYS/broker/"):]: m.payload.decode() for m in self.messages
                    if m.topic.startswith("$SYS/broker/")}

    def value(self, name, timeout=5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            v = self.values().get(name)
            if v is not None:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"no $SYS/broker/{name} within {timeout}s; have {sorted(self.values())}")
            time.sleep(0.05)

    def number(self, name, timeout=5.0) -> int:
        return int(self.value(name, timeout))

    def wait_until(self, name, check, what, timeout=5.0) -> str:
        """Waits until check(value of $SYS/broker/name) is true."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.values().get(name)
            if v is not None and check(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"$SYS/broker/{name} is {v!r}, expected {what} (waited {timeout}s)")
            time.sleep(0.05)

    def wait_value(self, name, want, timeout=5.0) -> str:
        """Waits until $SYS/broker/name is `want` (str or int); the assertion
        names the last value seen."""
        deadline = time.monotonic() + timeout
        want = str(want)
        while True:
            v = self.values().get(name)
            if v == want:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"$SYS/broker/{name} is {v!r}, expected {want!r} (waited {timeout}s)")
            time.sleep(0.05)


