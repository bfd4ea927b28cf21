"""Peers for the upstream bridge tests: a test PKI made with the openssl CLI,
a real mosquitto as the cloud broker, a recording cloud subscriber, a TCP
proxy that can black-hole a link, and a LAN publisher that knows exactly
which messages the gateway acknowledged.

Everything listens on 127.0.0.1 on ports chosen at run time and is stopped
by PID. A missing program fails the test with how to install it."""

import os
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import namedtuple
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

# Debian puts it in /usr/sbin, which is not on every user's PATH.
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(path_or_name: str, package: str) -> str:
    path = path_or_name if os.path.isabs(path_or_name) else shutil.which(path_or_name)
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"{path_or_name} is not installed: apt-get install {package} (scripts/install-test-peers does it)")
    return path


# --------------------------------------------------------------------------
# PKI

# rustls/webpki accepts only X.509 v3 certificates whose names are in the
# SAN (the CN is ignored), with CA:TRUE on issuers and EKUs on leaves, so
# every certificate gets explicit extensions instead of openssl's defaults.
# A config of our own keeps the system's openssl.cnf out of it.
OPENSSL_CNF = """
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost, IP:127.0.0.1
[wrong_host]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:wrong.example
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
RSA_KEY = ["-newkey", "rsa:2048"]


class Pki:
    """Paths of the files make_pki wrote; attributes are Path objects."""

    def __init__(self, folder: Path):
        self.dir = folder
        for name in ("ca", "other_ca", "server", "wrong_host", "other_server", "client", "client_rsa"):
            setattr(self, name, folder / f"{name}.pem")
            setattr(self, f"{name}_key", folder / f"{name}.key")
        self.both_cas = folder / "both_cas.pem"


def _openssl(folder: Path, *args):
    proc = subprocess.run(
        [need("openssl", "openssl"), *args], cwd=folder, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def _ca(folder: Path, name: str, cn: str):
    _openssl(folder, "req", "-config", "openssl.cnf", "-x509", "-new", *EC_KEY, "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={cn}",
             "-extensions", "ca", "-set_serial", f"0x{secrets.token_hex(8)}")


def _leaf(folder: Path, name: str, cn: str, section: str, ca: str, key=EC_KEY):
    _openssl(folder, "req", "-config", "openssl.cnf", "-new", *key, "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "30",
             "-extfile", "openssl.cnf", "-extensions", section, "-out", f"{name}.pem")
    (folder / f"{name}.csr").unlink()


def make_pki(folder) -> Pki:
    """Writes a test PKI into `folder`:

    ca.pem/.key             the CA the gateway trusts and mosquitto checks clients against
    server.pem/.key         mosquitto's certificate: SAN DNS:localhost, IP:127.0.0.1
    wrong_host.pem/.key     signed by the CA, but for DNS:wrong.example only
    client.pem/.key         CN=fieldmq-test, clientAuth, EC P-256 key in PKCS#8 PEM
    client_rsa.pem/.key     the same identity with an RSA 2048 key in PKCS#1 PEM
                            ("BEGIN RSA PRIVATE KEY", as cloud consoles hand out)
    other_ca.pem/.key       an unrelated CA
    other_server.pem/.key   a server certificate (right names) from the unrelated CA
    both_cas.pem            both CAs, for test clients that must reach either server
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "openssl.cnf").write_text(OPENSSL_CNF)
    _ca(folder, "ca", "fieldmq test CA")
    _ca(folder, "other_ca", "unrelated test CA")
    _leaf(folder, "server", "localhost", "server", "ca")
    _leaf(folder, "wrong_host", "wrong.example", "wrong_host", "ca")
    _leaf(folder, "other_server", "localhost", "server", "other_ca")
    _leaf(folder, "client", "fieldmq-test", "client", "ca")
    _leaf(folder, "client_rsa", "fieldmq-test", "client", "ca", key=RSA_KEY)
    _openssl(folder, "pkey", "-in", "client_rsa.key", "-traditional", "-out", "client_rsa.pkcs1")
    (folder / "client_rsa.pkcs1").replace(folder / "client_rsa.key")
    pki = Pki(folder)
    pki.both_cas.write_text(pki.ca.read_text() + pki.other_ca.read_text())
    return pki


# --------------------------------------------------------------------------
# The cloud broker


class Upstream:
    """A real mosquitto standing in for the cloud broker.

    server: which certificate it presents: "normal" (right CA and names),
    "wrong_host" (right CA, wrong name) or "other_ca" (right names, unknown CA).
    tls=False gives plain MQTT. require_cert: clients must present a
    certificate signed by the test CA, and its CN becomes their username.

    persistent=True (the default) keeps sessions across stop()/start(), as a
    real cloud does. Without it a restart forgets the Recorder's
    subscription, and whatever the gateway delivers in the moment before the
    Recorder is back would be lost by the test harness, not by the gateway.
    Use persistent=False where a test must see that the gateway itself
    re-subscribes after the cloud forgot it.
    """

    def __init__(self, folder, pki: Pki = None, tls=True, server="normal", require_cert=True,
                 allow_anonymous=None, persistent=True, port=None):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.tls = tls
        self.server = server
        self.require_cert = require_cert
        self.allow_anonymous = allow_anonymous
        self.persistent = persistent
        self.port = port or free_port()
        self.proc = None
        self.log_path = self.dir / "mosquitto.log"
        self.log_path.touch()

    def _config(self) -> str:
        lines = [
            "per_listener_settings false",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "log_type subscribe",
            "log_timestamp_format %H:%M:%S",
            "connection_messages true",
            # The default caps (1000 queued per client) would silently drop
            # QoS 1 messages to the Recorder when a backlog of thousands
            # arrives at once: no limit, so every loss is the gateway's.
            "max_queued_messages 0",
            # The cloud's flow-control window: in MQTT 5 it is announced to
            # the gateway as Receive Maximum.
            "max_inflight_messages 20",
            "set_tcp_nodelay true",
        ]
        if self.persistent:
            # Saved on SIGTERM; the short autosave covers kill().
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            lines.append("user root")
        lines.append(f"listener {self.port} 127.0.0.1")
        anonymous = self.allow_anonymous
        if self.tls:
            cert = {"normal": "server", "wrong_host": "wrong_host", "other_ca": "other_server"}[self.server]
            lines += [
                f"cafile {self.pki.ca}",
                f"certfile {self.pki.dir / (cert + '.pem')}",
                f"keyfile {self.pki.dir / (cert + '.key')}",
            ]
            if self.require_cert:
                lines += ["require_certificate true", "use_identity_as_username true"]
                anonymous = False if anonymous is None else anonymous
        lines.append(f"allow_anonymous {'true' if anonymous is None or anonymous else 'false'}")
        return "\n".join(lines) + "\n"

    def start(self, timeout=5.0):
        """Starts mosquitto and returns once it listens."""
        need(MOSQUITTO, "mosquitto")
        assert self.proc is None or self.proc.poll() is not None, "already running"
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self._config())
        mark = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                if b" running" in f.read():
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"mosquitto did not start on port {self.port}:\n{self.log()}")

    def stop(self, timeout=5.0):
        """SIGTERM, as an operator or an orchestrator stops it: clients see the connection close."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, **changes):
        """Stops and starts again on the same port; `changes` set server=,
        require_cert=, allow_anonymous=, tls= for the new run."""
        self.stop()
        for key, value in changes.items():
            assert hasattr(self, key), key
            setattr(self, key, value)
        return self.start()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def log(self, tail=60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def client(self, client_id="", clean=True, v5=False, identity="client", check_hostname=None):
        """A connected paho client with the test client certificate `identity` (loop running)."""
        c = _tls_client(self, client_id, clean, v5, identity, check_hostname)
        _connect(c, self.port)
        c.loop_start()
        return c


def _tls_client(up: Upstream, client_id, clean, v5, identity="client", check_hostname=None):
    kwargs = {"protocol": paho.MQTTv5} if v5 else {"protocol": paho.MQTTv311, "clean_session": clean}
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
    if up.tls:
        # Test clients trust both test CAs so they can reach the upstream
        # whichever certificate a test makes it present; the chain is still
        # verified. The name is not checked where the upstream presents the
        # wrong_host certificate on purpose.
        c.tls_set(ca_certs=str(up.pki.both_cas), certfile=str(up.pki.dir / f"{identity}.pem"),
                  keyfile=str(up.pki.dir / f"{identity}.key"), cert_reqs=ssl.CERT_REQUIRED)
        if check_hostname is None:
            check_hostname = up.server != "wrong_host"
        c.tls_insecure_set(not check_hostname)
    c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
    return c


def _connect(c, port):
    try:
        c.connect("127.0.0.1", port, keepalive=10)
    except OSError as e:
        raise AssertionError(f"cannot connect a test client to 127.0.0.1:{port}: {e}") from None


# --------------------------------------------------------------------------
# The cloud application


Message = namedtuple("Message", "topic payload retain at")


class Recorder:
    """A cloud-side subscriber recording (topic, payload, retain, arrival
    time) in order. Its session is persistent (fixed client id, clean
    session off, QoS 1), it reconnects by itself and subscribes again on
    every connect, so an upstream restart costs it nothing."""

    def __init__(self, upstream: Upstream, topic="#", client_id=None):
        self.upstream = upstream
        self.topic = topic
        self._messages = []
        self._cond = threading.Condition()
        self._subacks = 0
        client_id = client_id or f"recorder-{secrets.token_hex(4)}"
        self.client = _tls_client(upstream, client_id, clean=False, v5=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        try:
            self.client.connect("127.0.0.1", upstream.port, keepalive=10)
        except OSError as e:
            raise AssertionError(f"the Recorder cannot reach the upstream on {upstream.port}: {e}\n{upstream.log()}") from None
        self.client.loop_start()
        self.wait_subscribed(1)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code == 0:
            # Even with a persistent session: a broker restarted without
            # persistence has forgotten it.
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks += 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self._messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    @property
    def subscriptions(self) -> int:
        """How many SUBACKs the Recorder has had (one per connect)."""
        with self._cond:
            return self._subacks

    def wait_subscribed(self, count, timeout=10.0):
        """Waits for the `count`th SUBACK. To know the Recorder is back after
        an upstream restart: n = rec.subscriptions before it, then
        rec.wait_subscribed(n + 1)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._subacks >= count, timeout):
                raise AssertionError(f"the Recorder did not (re)subscribe within {timeout}s:\n{self.upstream.log()}")

    def messages(self, topic=None):
        with self._cond:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def wait_count(self, n, timeout=10.0, topic=None):
        """Waits for at least n messages (on `topic` if given); returns them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [m for m in self._messages if topic is None or m.topic == topic]
                left = deadline - time.monotonic()
                if len(got) >= n or left <= 0:
                    return got
                self._cond.wait(min(left, 0.1))

    def wait_for(self, predicate, timeout=10.0, topic=None):
        """Waits until predicate(messages) holds; returns the messages either way."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [m for m in self._messages if topic is None or m.topic == topic]
                left = deadline - time.monotonic()
                if predicate(got) or left <= 0:
                    return got
                self._cond.wait(min(left, 0.1))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------
# A link that can go dark


class FreezeProxy:
    """A TCP proxy 127.0.0.1:port -> 127.0.0.1:target.

    freeze() stops forwarding in both directions without closing anything:
    the proxy simply stops reading, so bytes pile up in kernel buffers and
    neither end hears from the other, as over a dead mobile link or a NAT
    that forgot the flow. Connections accepted while frozen are held open
    and silent (not even connected onward) until thaw(). drop_all() closes
    every current connection."""

    def __init__(self, target_port: int, port: int = None):
        self.target = target_port
        self._frozen = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns = set()  # id() of each live [client socket, onward socket or None]
        self.accepted = 0
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port or 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            conn = [client, None]
            with self._lock:
                self._conns.add(id(conn))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, conn):
        client = conn[0]
        try:
            # A connection that arrives during a freeze is accepted (the
            # SYN got through) but goes nowhere until the thaw.
            while self._frozen.is_set() and self._alive(conn):
                time.sleep(0.02)
            if not self._alive(conn):
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                return  # the target is down: the client sees the connection close
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn[1] = upstream
            peer = {client: upstream, upstream: client}
            while self._alive(conn):
                if self._frozen.is_set():
                    time.sleep(0.02)
                    continue
                readable, _, _ = select.select([client, upstream], [], [], 0.05)
                for s in readable:
                    # Re-checked per read: a freeze must stop data that is
                    # already waiting, not only future data.
                    if self._frozen.is_set():
                        break
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except OSError:
            return
        finally:
            self._close_conn(conn)

    def _alive(self, conn):
        with self._lock:
            return id(conn) in self._conns and not self._closed.is_set()

    def _close_conn(self, conn):
        with self._lock:
            self._conns.discard(id(conn))
        for s in conn:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def freeze(self):
        self._frozen.set()

    def thaw(self):
        self._frozen.clear()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def drop_all(self):
        """Closes every current connection (both ends)."""
        with self._lock:
            self._conns.clear()
        # The pump threads notice within one poll and close their sockets.
        time.sleep(0.1)

    def close(self):
        self._closed.set()
        self.drop_all()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        try:
            self._server.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# The LAN side


def _answered(info) -> bool:
    """Whether PUBACK came for a paho MQTTMessageInfo. paho raises instead
    of answering False for a message published while disconnected (after
    the gateway died): that one was not acknowledged either."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def seq_of(payload: bytes) -> int:
    """The sequence number a LanPublisher put at the front of a payload."""
    return int(payload.split(b" ", 1)[0])


class LanPublisher:
    """Publishes numbered QoS 1 messages to the gateway's local broker
    (plain MQTT on 127.0.0.1) and records which ones the gateway
    acknowledged with PUBACK: the gateway promises to keep exactly those.

    The payload is the decimal sequence number, padded with spaces and `x`
    to `size` bytes when given. Publishes are pipelined (many in flight) so
    the gateway's group commit does not dictate the pace of the test.
    """

    def __init__(self, port, topic="fieldmq/test/seq", size=0, client_id="", v5=False):
        self.port = port
        self.topic = topic
        self.size = size
        self.next_seq = 0
        self._sent = []  # (seq, MQTTMessageInfo, monotonic time of sending)
        self._lock = threading.Lock()
        self._failed = {}  # mid -> whether a v5 PUBACK carried a failure reason code
        self._on_ack = None
        self._thread = None
        self._stop = threading.Event()
        kwargs = {"protocol": paho.MQTTv5} if v5 else {"protocol": paho.MQTTv311}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
        self.client.max_inflight_messages_set(5000)
        self.client.on_publish = self._on_publish
        _connect(self.client, port)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._failed[mid] = bool(reason_code.is_failure)
        hook = self._on_ack
        if hook:
            hook(mid)

    def payload(self, seq: int) -> bytes:
        text = str(seq).encode()
        if self.size > len(text):
            text += b" " + b"x" * (self.size - len(text) - 1)
        return text

    def publish(self, count, rate=None, wait=True, timeout=10.0):
        """Publishes `count` messages (at `rate` per second, else at once);
        with wait, fails unless every one is acknowledged within `timeout`.
        Returns the sequence numbers published."""
        seqs = []
        start = time.monotonic()
        for i in range(count):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            seqs.append(self.publish_one())
        if wait and not self.wait_acked(seqs, timeout):
            missing = sorted(set(seqs) - set(self.acked()))
            raise AssertionError(f"the gateway did not acknowledge {len(missing)} of {count} messages within {timeout}s: {missing[:20]}")
        return seqs

    def publish_one(self, retain=False) -> int:
        with self._lock:
            seq = self.next_seq
            self.next_seq += 1
            info = self.client.publish(self.topic, self.payload(seq), qos=1, retain=retain)
            self._sent.append((seq, info, time.monotonic()))
        return seq

    def start(self, rate):
        """Publishes continuously at `rate` per second in the background until stop()."""
        assert self._thread is None
        self._stop.clear()

        def run():
            start, i = time.monotonic(), 0
            while not self._stop.is_set():
                self.publish_one()
                i += 1
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        """Stops background publishing; returns every sequence number published."""
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.published()

    def published(self):
        with self._lock:
            return [seq for seq, _, _ in self._sent]

    def sent_at(self):
        """seq -> monotonic time it was handed to the socket."""
        with self._lock:
            return {seq: t for seq, _, t in self._sent}

    def acked(self):
        """Sequence numbers the gateway acknowledged with a successful PUBACK."""
        with self._lock:
            sent = list(self._sent)
        return [seq for seq, info, _ in sent if _answered(info) and not self._failed.get(info.mid)]

    def refused(self):
        """Sequence numbers answered with a v5 PUBACK reason code >= 0x80."""
        with self._lock:
            sent = list(self._sent)
        return [seq for seq, info, _ in sent if _answered(info) and self._failed.get(info.mid)]

    def unacked(self):
        with self._lock:
            sent = list(self._sent)
        return [seq for seq, info, _ in sent if not _answered(info)]

    def wait_acked(self, seqs=None, timeout=10.0) -> bool:
        """Waits until every one of `seqs` (default all) has its PUBACK; returns whether they all did."""
        deadline = time.monotonic() + timeout
        want = set(self.published() if seqs is None else seqs)
        while time.monotonic() < deadline:
            done = {seq for seq in self.published() if seq in want} - set(self.unacked())
            if done >= want:
                return True
            time.sleep(0.02)
        return False

    def wait_settled(self, quiet=1.0, timeout=10.0):
        """Waits until every message is answered, or no answer came for
        `quiet` seconds: for gateways that may withhold a PUBACK."""
        deadline = time.monotonic() + timeout
        last, changed = -1, time.monotonic()
        while time.monotonic() < deadline:
            pending = len(self.unacked())
            if pending == 0:
                return
            if pending != last:
                last, changed = pending, time.monotonic()
            elif time.monotonic() - changed >= quiet:
                return
            time.sleep(0.05)

    def kill_on_ack(self, nth: int, pid: int):
        """SIGKILLs `pid` from inside the client's network thread as the
        `nth` PUBACK (1-based) arrives: no test-side delay between the
        acknowledgement and the crash."""
        count = [0]

        def hook(mid):
            count[0] += 1
            if count[0] == nth:
                os.kill(pid, signal.SIGKILL)
                self._on_ack = None

        self._on_ack = hook

    def close(self):
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------
# Reading what arrived


def seq_report(messages, topic):
    """(first-seen order of sequence numbers, number of duplicates) on `topic`."""
    order, seen, dups = [], set(), 0
    for m in messages:
        if m.topic != topic:
            continue
        seq = seq_of(m.payload)
        if seq in seen:
            dups += 1
        else:
            seen.add(seq)
            order.append(seq)
    return order, dups


def wait_log(gw, pattern, timeout=10.0, after=0, flags=re.IGNORECASE):
    """Gateway.wait_for with a case-insensitive pattern: log wording of
    failure reasons comes from rustls and may change case."""
    return gw.wait_for(re.compile(pattern, flags) if isinstance(pattern, str) else pattern, timeout, after)
