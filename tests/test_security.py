"""The broker's listeners and security, end to end: TLS (server and client
certificates made by openssl), MQTT over WebSocket and secure WebSocket,
password files (`fieldmq passwd` and mosquitto_passwd), mosquitto-syntax
ACLs, connection limits, SIGHUP reload and the `$SYS` statistics, with
paho-mqtt, the mosquitto clients and raw sockets where a test must see
the exact bytes. MQTT normative statements (MQTT-x.y.z-n) are named where
one applies; the codes are those of MQTT 3.1.1 and 5.0."""

import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

import mqtt_raw as raw
from modbus_peer import ModbusDevice
from security_peer import (
    V3_ACCEPTED, V3_NOT_AUTHORIZED, V3_SERVER_UNAVAILABLE, V3_SUB_FAILURE, V5_BAD_CREDENTIALS,
    V5_NOT_AUTHORIZED, V5_PACKET_TOO_LARGE, V5_PUB_NOT_AUTHORIZED, V5_SERVER_BUSY, V5_SUB_NOT_AUTHORIZED,
    V5_SUCCESS, PUBLISHED, Client, RawConn, SysWatcher, closed_after, connack, connect_packet,
    fieldmq_passwd, mosquitto_passwd, new_source, round_trip, start_broker, timed_connack, tls_context,
)
from upstream_peer import MOSQUITTO, _leaf, free_port, make_pki, need

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    # Same CN as the real client certificate, signed by a CA the broker does not trust.
    _leaf(pki.dir, "rogue_client", "fieldmq-test", "client", "other_ca")
    pki.rogue_client, pki.rogue_client_key = pki.dir / "rogue_client.pem", pki.dir / "rogue_client.key"
    return pki


@pytest.fixture
def broker(gateway, write_config, fieldmq_bin, tmp_path):
    """broker(transports=(...), acl=..., passwords={...}, **[broker] keys) -> Broker."""
    return lambda **kwargs: start_broker(gateway, write_config, fieldmq_bin, tmp_path, **kwargs)


@pytest.fixture
def clients():
    """Clients made with clients.new(...) are closed at the end of the test."""

    class Pool(list):
        def new(self, *args, **kwargs) -> Client:
            c = Client(*args, **kwargs)
            self.append(c)
            return c

    pool = Pool()
    yield pool
    for c in pool:
        try:
            c.close()
        except Exception:
            pass


def tls_files(pki, folder: Path):
    """The server certificate and key copied next to the config: the config
    names them relative to itself."""
    (folder / "certs").mkdir(exist_ok=True)
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki.dir / name, folder / "certs" / name)
    return {"tls_cert": "certs/server.pem", "tls_key": "certs/server.key"}


def tool(name):
    return need(name, "mosquitto-clients")


def packaged_acl() -> str:
    """The ACL the package installs (anonymous: read fieldmq/#, write nothing)."""
    path = ROOT / "config" / "acl.example"
    assert path.exists(), f"{path} is missing"
    return path.read_text()


def nothing_more(client: Client, topics, settle: Client = None, settle_topic=None):
    """Fails if `client` got anything on `topics`. With settle: `settle`
    publishes on settle_topic and waits until `client` has it, so anything
    routed before (from any publisher whose publish was already
    acknowledged) has arrived: no sleep decides the outcome."""
    if settle:
        settle.publish(settle_topic, b"settle", qos=1)
        client.wait_for(settle_topic)
    got = [m for m in client.received() if m.topic in topics]
    assert got == [], f"delivered although it must not be: {got}"


# --------------------------------------------------------------------------
# 1. TLS


def test_tls_clients_that_verify_the_server_certificate_publish_and_subscribe_and_untrusting_ones_fail(
        broker, clients, pki, tmp_path):
    b = broker(transports=("mqtts",), **tls_files(pki, tmp_path))
    port = b.ports["mqtts"]
    # paho checks the chain against the test CA and the name 127.0.0.1 against the SAN.
    sub = clients.new(port, v5=True, ca=pki.ca)
    assert sub.subscribe("tls/#") == [1]
    pub = clients.new(port, v5=False, ca=pki.ca)
    round_trip(pub, sub, "tls/paho", "over tls")
    # mosquitto_pub with --cafile, in both versions.
    for version in ("mqttv311", "mqttv5"):
        proc = subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki.ca),
                               "-t", f"tls/{version}", "-m", version, "-q", "1", "-V", version],
                              capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
        assert sub.wait_for(f"tls/{version}").payload == version.encode()
    # A client trusting another CA refuses the server in the handshake.
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(port, v5=True, ca=pki.other_ca)
    proc = subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki.other_ca),
                           "-t", "tls/untrusted", "-m", "x", "-q", "1"], capture_output=True, text=True, timeout=10)
    assert proc.returncode != 0 and re.search(r"TLS error|certificate verify failed", proc.stderr, re.I), proc.stderr
    # Plain MQTT on the TLS port gets no CONNACK.
    c = RawConn(port)
    c.send(connect_packet("plain", v5=False))
    with pytest.raises((ConnectionError, AssertionError, socket.timeout, TimeoutError)):
        c.expect(2, timeout=3)
    c.close()
    assert sub.received("tls/untrusted") == [] and sub.connected


# --------------------------------------------------------------------------
# 2. Client certificates


def test_a_client_certificate_logs_in_as_its_common_name_and_clients_without_one_need_a_password(
        broker, clients, pki, tmp_path):
    acl = "user fieldmq-test\ntopic readwrite cert/#\n\nuser ops\ntopic read cert/#\n"
    b = broker(transports=("mqtts",), acl=acl, passwords={"ops": "ops-pass"}, allow_anonymous=False,
               tls_client_ca="certs/ca.pem", **tls_files(pki, tmp_path))
    port = b.ports["mqtts"]
    cert = (pki.client, pki.client_key)
    # With the certificate and no user name: logged in as CN=fieldmq-test,
    # whom the ACL lets read and write cert/#, and nothing else.
    sub = clients.new(port, v5=True, ca=pki.ca, cert=cert, client_id="cert-sub")
    assert sub.subscribe("cert/#", "other/#") == [1, V5_SUB_NOT_AUTHORIZED]
    pub = clients.new(port, v5=False, ca=pki.ca, cert=(pki.client_rsa, pki.client_rsa_key), client_id="cert-pub")
    round_trip(pub, sub, "cert/reading", "21.5")
    # Without a certificate: password rules, and anonymous is not allowed
    # (MQTT-3.2.2-5: refused with a CONNACK, then closed).
    no_cert = tls_context(pki.ca)
    assert connack(port, v5=True, tls=no_cert) == V5_NOT_AUTHORIZED
    assert connack(port, v5=False, tls=no_cert) == V3_NOT_AUTHORIZED
    # A user name does not make a certificate's CN: fieldmq-test has no password.
    assert connack(port, v5=True, tls=no_cert, username="fieldmq-test", password="x") == V5_BAD_CREDENTIALS
    ops = clients.new(port, v5=True, ca=pki.ca, username="ops", password="ops-pass")
    assert ops.subscribe("cert/#") == [1]
    pub.publish("cert/for-ops", "seen")
    assert ops.wait_for("cert/for-ops").payload == b"seen"
    # A certificate with the same CN from a CA the broker does not trust never logs in.
    # (Refused in the TLS handshake, or at the latest with a CONNACK refusal.)
    rogue = tls_context(pki.ca, cert=(pki.rogue_client, pki.rogue_client_key))
    try:
        c = RawConn(port, tls=rogue)
        try:
            c.send(connect_packet("rogue", v5=True))
            outcome = f"CONNACK {c.expect(2, timeout=5)[1][1]:#04x}"
        finally:
            c.close()
    except OSError as e:  # ssl.SSLError, a reset, a close (ConnectionError), a timeout
        outcome = f"refused: {e!r}"
    assert outcome != "CONNACK 0x00", "a certificate from an unknown CA logged in"
    assert sub.connected and pub.connected


# --------------------------------------------------------------------------
# 3. WebSocket


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_mqtt_over_websocket_round_trips_in_both_versions(broker, clients, pki, tmp_path, transport):
    keys = tls_files(pki, tmp_path) if transport == "wss" else {}
    b = broker(transports=("mqtt", transport), **keys)
    port = b.ports[transport]
    ca = pki.ca if transport == "wss" else None
    tcp_sub = clients.new(b.port, v5=False)
    assert tcp_sub.subscribe("web/#") == [1]
    for v5 in (False, True):
        sub = clients.new(port, v5=v5, transport="websockets", ca=ca)
        assert sub.subscribe("web/#", qos=2) == [2]
        pub = clients.new(port, v5=not v5, transport="websockets", ca=ca)
        for qos in (0, 1, 2):
            topic = f"web/v{5 if v5 else 4}/q{qos}"
            pub.publish(topic, f"{transport} qos{qos}".encode() + bytes(range(256)), qos=qos)
            m = sub.wait_for(topic)
            assert m.payload == f"{transport} qos{qos}".encode() + bytes(range(256)) and m.qos == qos
            # The same broker: a plain TCP subscriber has it too.
            assert tcp_sub.wait_for(topic).payload == m.payload
        # A large message spans several WebSocket frames / TCP segments.
        big = os.urandom(200_000)
        pub.publish(f"web/big{v5}", big, qos=1)
        assert sub.wait_for(f"web/big{v5}", timeout=10).payload == big


# --------------------------------------------------------------------------
# 4. Passwords


def test_passwd_users_log_in_and_wrong_or_unknown_credentials_are_refused_alike(
        broker, clients, fieldmq_bin, tmp_path):
    passwd = tmp_path / "passwd"
    proc = fieldmq_passwd(fieldmq_bin, passwd, "alice", "correct horse")
    assert proc.returncode == 0 and proc.stderr.strip(), (proc.returncode, proc.stderr)
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640
    text = passwd.read_text()
    assert re.fullmatch(r"alice:\$7\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+\n", text), text
    assert "correct horse" not in text
    # A second user added by mosquitto's own tool to the same file.
    mosquitto_passwd(passwd, "carol", "carol's secret")
    b = broker(password_file="passwd", allow_anonymous=False)
    # The right passwords log in, in both versions.
    for v5 in (False, True):
        clients.new(b.port, v5=v5, username="alice", password="correct horse")
        clients.new(b.port, v5=v5, username="carol", password="carol's secret")
    # Wrong password and unknown user: the same answer, no hint which part
    # was wrong (MQTT 5: 0x86 Bad User Name or Password; 3.1.1: 0x05).
    for user, password in (("alice", "wrong"), ("alice", ""), ("mallory", "correct horse"), ("carol", "correct horse")):
        assert connack(b.port, v5=True, username=user, password=password) == V5_BAD_CREDENTIALS, user
        assert connack(b.port, v5=False, username=user, password=password) == V3_NOT_AUTHORIZED, user
    # No credentials at all: 0x87 Not Authorized / 0x05.
    assert connack(b.port, v5=True) == V5_NOT_AUTHORIZED
    assert connack(b.port, v5=False) == V3_NOT_AUTHORIZED
    # A user name without a password is a wrong password.
    assert connack(b.port, v5=True, username="alice") == V5_BAD_CREDENTIALS

    # --delete, then SIGHUP: alice is refused from now on, and her open
    # connection is cut (DISCONNECT 0x87): a leaked password removed must
    # not leave its holder connected. Carol, unchanged, stays connected.
    alice = clients.new(b.port, v5=True, username="alice", password="correct horse", client_id="alice-open")
    carol = clients.new(b.port, v5=True, username="carol", password="carol's secret", client_id="carol-open")
    proc = fieldmq_passwd(fieldmq_bin, passwd, "alice", delete=True)
    assert proc.returncode == 0, proc.stderr
    assert "alice" not in passwd.read_text() and "carol:" in passwd.read_text()
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640
    assert connack(b.port, v5=True, username="alice", password="correct horse") == V5_SUCCESS, "before the reload"
    b.reload()
    assert connack(b.port, v5=True, username="alice", password="correct horse") == V5_BAD_CREDENTIALS
    assert connack(b.port, v5=False, username="alice", password="correct horse") == V3_NOT_AUTHORIZED
    clients.new(b.port, v5=False, username="carol", password="carol's secret")
    reason = alice.wait_closed()
    assert reason is not None and reason.value == V5_NOT_AUTHORIZED, reason
    assert carol.subscribe("still/#") == [1] and carol.connected
    # Deleting a user who is not there is an error (exit 2), and the file stays.
    before = passwd.read_text()
    proc = fieldmq_passwd(fieldmq_bin, passwd, "nobody", delete=True)
    assert proc.returncode == 2 and proc.stderr.strip(), (proc.returncode, proc.stderr)
    assert passwd.read_text() == before


def test_a_password_file_made_by_fieldmq_passwd_works_in_mosquitto(fieldmq_bin, tmp_path, clients):
    # The other direction of the compatibility: a user can move the file to mosquitto.
    passwd = tmp_path / "passwd"
    assert fieldmq_passwd(fieldmq_bin, passwd, "alice", "s3cret").returncode == 0
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                    f"persistence false\nlog_dest stderr\n" + ("user root\n" if os.geteuid() == 0 else ""))
    os.chmod(passwd, 0o600)  # mosquitto 2 warns about group-readable password files
    proc = subprocess.Popen([need(MOSQUITTO, "mosquitto"), "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "mosquitto did not start"
                time.sleep(0.05)
        assert connack(port, v5=True, username="alice", password="s3cret") == V5_SUCCESS
        # (mosquitto 2.0.11 answers 0x87 where the specification suggests 0x86.)
        assert connack(port, v5=True, username="alice", password="wrong") >= 0x80
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_repeated_login_failures_from_one_address_are_slowed_down_and_other_addresses_are_not(
        broker, fieldmq_bin, tmp_path):
    b = broker(passwords={"alice": "right"}, allow_anonymous=False)
    attacker = new_source()
    times = []
    for attempt in range(5):
        code, took = timed_connack(b.port, v5=True, source=attacker, username="alice", password=f"guess{attempt}")
        assert code == V5_BAD_CREDENTIALS, f"attempt {attempt + 1}: {code:#x}"
        times.append(took)
    # After three failures the answers come later (250 ms, then doubling):
    # the 5th waits noticeably longer than the undelayed first ones (which
    # take as long as checking a password hash).
    assert times[4] >= min(times[:3]) + 0.2, f"answer times of attempts 1..5: {times}"
    # Another address is not slowed, and the right password works there.
    code, took = timed_connack(b.port, v5=True, username="alice", password="right")
    assert code == V5_SUCCESS and took < times[4], f"{took} s from another address; attempts 1..5: {times}"
    # The attacker's address is not locked out for good: the right
    # password still gets in (after at most the maximum delay).
    code, took = timed_connack(b.port, v5=False, source=attacker, username="alice", password="right")
    assert code == V3_ACCEPTED and took < 9, took


# --------------------------------------------------------------------------
# 5. ACL


ACL = """\
# anonymous clients
topic read fieldmq/#
topic deny fieldmq/+/secret/#
pattern readwrite clients/%c/#
pattern readwrite users/%u/#

user ops
topic readwrite fieldmq/#
topic readwrite plant/#
topic read $SYS/#

user sensor
topic write plant/sensor/#

user viewer
topic read plant/#
topic deny plant/secret/#
"""
# Retained "online" by the gateway itself at start.
GATEWAY_STATUS = "fieldmq/gw/status"
USERS = {"ops": "ops-pass", "sensor": "sensor-pass", "viewer": "viewer-pass"}


def login(user, **kwargs):
    return {"username": user, "password": USERS[user], **kwargs}


def test_the_packaged_acl_lets_anonymous_clients_read_fieldmq_and_write_nothing(broker, clients):
    acl = packaged_acl() + "\nuser ops\ntopic readwrite fieldmq/#\n"
    b = broker(acl=acl, passwords={"ops": "ops-pass"})
    ops = clients.new(b.port, v5=True, **login("ops"))
    assert ops.subscribe("fieldmq/#") == [1]
    v3 = clients.new(b.port, v5=False)
    v5 = clients.new(b.port, v5=True)
    # Subscribing to fieldmq/# is allowed; # and $SYS/# are not
    # (3.1.1: 0x80 Failure, MQTT-3.9.3; 5.0: 0x87 Not authorized).
    assert v3.subscribe("fieldmq/#", "#", "$SYS/#") == [1, V3_SUB_FAILURE, V3_SUB_FAILURE]
    assert v5.subscribe("fieldmq/#", "#", "$SYS/#") == [1, V5_SUB_NOT_AUTHORIZED, V5_SUB_NOT_AUTHORIZED]
    round_trip(ops, v3, "fieldmq/gw/meter/power", "1200")
    v5.wait_for("fieldmq/gw/meter/power")
    # Anonymous publishes go nowhere: v5 QoS 1 is answered 0x87, 3.1.1 gets
    # a plain PUBACK, QoS 0 is dropped silently; in every case the
    # subscribers (and ops, who may read everything) never see them.
    assert v5.publish("fieldmq/gw/meter/power", "forged-v5", qos=1) == V5_PUB_NOT_AUTHORIZED
    assert v5.publish("fieldmq/gw/meter/power", "forged-v5-q0", qos=0) is None
    assert v3.publish("fieldmq/gw/meter/power", "forged-v3", qos=1) == 0
    assert v3.publish("fieldmq/gw/meter/power", "forged-v3-q0", qos=0) is None
    assert v3.publish("other/topic", "forged", qos=1) == 0
    proc = subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(b.port), "-t", "fieldmq/gw/meter/power",
                           "-m", "forged-tool", "-q", "1", "-V", "mqttv311"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    v5.publish("fieldmq/gw/flush", "x", qos=1)  # processed after the ones above
    ops.publish("fieldmq/gw/settle", "x", qos=1)
    for c in (v3, v5):
        c.wait_for("fieldmq/gw/settle")
        assert [m.payload for m in c.received("fieldmq/gw/meter/power")] == [b"1200"]
    assert [m.payload for m in ops.received("fieldmq/gw/meter/power")] == [b"1200"]


def test_a_user_block_grants_readwrite_to_that_user_only(broker, clients):
    b = broker(acl=ACL, passwords=USERS)
    ops = clients.new(b.port, v5=True, **login("ops"))
    assert ops.subscribe("plant/#") == [1]
    viewer = clients.new(b.port, v5=False, **login("viewer"))
    assert viewer.subscribe("plant/#") == [1]
    anonymous = clients.new(b.port, v5=True)
    assert anonymous.subscribe("plant/#") == [V5_SUB_NOT_AUTHORIZED]
    assert ops.publish("plant/line1/speed", "42") in PUBLISHED
    assert ops.wait_for("plant/line1/speed").payload == b"42"
    assert viewer.wait_for("plant/line1/speed").payload == b"42"
    # The viewer may read but not write; anonymous may do neither.
    v5_viewer = clients.new(b.port, v5=True, **login("viewer"))
    assert v5_viewer.publish("plant/line1/speed", "0") == V5_PUB_NOT_AUTHORIZED
    assert anonymous.publish("plant/line1/speed", "0") == V5_PUB_NOT_AUTHORIZED
    nothing_more(viewer, [], settle=ops, settle_topic="plant/settle")
    assert [m.payload for m in viewer.received("plant/line1/speed")] == [b"42"]
    assert [m.payload for m in ops.received("plant/line1/speed")] == [b"42"]
    assert anonymous.received() == []


def test_topic_write_only_lets_a_sensor_publish_but_not_subscribe(broker, clients):
    b = broker(acl=ACL, passwords=USERS)
    ops = clients.new(b.port, v5=True, **login("ops"))
    assert ops.subscribe("plant/#") == [1]
    sensor = clients.new(b.port, v5=True, **login("sensor"))
    assert sensor.publish("plant/sensor/t1", "19.5") in PUBLISHED
    assert ops.wait_for("plant/sensor/t1").payload == b"19.5"
    # Write-only: no subscription, not even to what it writes.
    assert sensor.subscribe("plant/sensor/#", "plant/sensor/t1") == [V5_SUB_NOT_AUTHORIZED] * 2
    v3_sensor = clients.new(b.port, v5=False, **login("sensor"))
    assert v3_sensor.subscribe("plant/sensor/#") == [V3_SUB_FAILURE]
    # Outside its subtree it writes nothing.
    assert sensor.publish("plant/line1/speed", "999") == V5_PUB_NOT_AUTHORIZED
    nothing_more(ops, ["plant/line1/speed"], settle=ops, settle_topic="plant/settle")
    assert sensor.received() == []


def test_deny_carves_a_subtree_out_of_a_grant(broker, clients):
    b = broker(acl=ACL, passwords=USERS)
    ops = clients.new(b.port, v5=True, **login("ops"))
    assert ops.subscribe("fieldmq/#", "plant/#") == [1, 1]
    anonymous = clients.new(b.port, v5=True)
    assert anonymous.subscribe("fieldmq/#") == [1]
    # Subscribing to the denied subtree itself is refused.
    assert anonymous.subscribe("fieldmq/gw/secret/#") == [V5_SUB_NOT_AUTHORIZED]
    viewer = clients.new(b.port, v5=False, **login("viewer"))
    assert viewer.subscribe("plant/#", "plant/secret/#") == [1, V3_SUB_FAILURE]
    for topic in ("fieldmq/gw/secret/key", "fieldmq/gw/public", "plant/secret/recipe", "plant/public"):
        assert ops.publish(topic, topic) in PUBLISHED
    # Under fieldmq/# (plant/#) the anonymous client (viewer) gets
    # everything but the denied subtree; ops, whom no deny names, gets all.
    for c, prefix in ((anonymous, "fieldmq/"), (viewer, "plant/")):
        nothing_more(c, [], settle=ops, settle_topic=prefix + "settle")
        got = [m.topic for m in c.received() if not m.topic.endswith("settle") and m.topic != GATEWAY_STATUS]
        assert got == [prefix + ("gw/public" if prefix == "fieldmq/" else "public")], got
    for topic in ("fieldmq/gw/secret/key", "fieldmq/gw/public", "plant/secret/recipe", "plant/public"):
        ops.wait_for(topic)


def test_patterns_give_each_client_id_and_user_a_subtree_of_its_own(broker, clients):
    b = broker(acl=ACL, passwords=USERS)
    pump = clients.new(b.port, v5=True, client_id="pump-7")
    assert pump.subscribe("clients/pump-7/#") == [1]
    assert pump.publish("clients/pump-7/state", "running") in PUBLISHED
    assert pump.wait_for("clients/pump-7/state").payload == b"running"
    # Another client's subtree, or a filter wider than its own: refused.
    assert pump.publish("clients/pump-8/state", "stopped") == V5_PUB_NOT_AUTHORIZED
    assert pump.subscribe("clients/+/state", "clients/#", "clients/pump-8/#") == [V5_SUB_NOT_AUTHORIZED] * 3
    other = clients.new(b.port, v5=False, client_id="pump-8")
    assert other.subscribe("clients/pump-8/#") == [1]
    assert other.publish("clients/pump-7/state", "forged") == 0
    # %u: the user's own subtree, whatever its client id.
    ops = clients.new(b.port, v5=True, client_id="console-1", **login("ops"))
    assert ops.subscribe("users/ops/#", "users/viewer/#") == [1, V5_SUB_NOT_AUTHORIZED]
    assert ops.publish("users/ops/notes", "hello") in PUBLISHED
    assert ops.wait_for("users/ops/notes").payload == b"hello"
    assert ops.publish("users/viewer/notes", "forged") == V5_PUB_NOT_AUTHORIZED
    # An anonymous client has no %u: users/... is not its.
    assert pump.publish("users/pump-7/notes", "x") == V5_PUB_NOT_AUTHORIZED
    # A client id or user name with wildcards does not widen a pattern.
    for cid in ("+", "#"):
        wild = clients.new(b.port, v5=True, client_id=cid)
        assert wild.subscribe("clients/pump-7/#", "clients/+/#") == [V5_SUB_NOT_AUTHORIZED] * 2, cid
        assert wild.publish("clients/pump-7/state", f"forged by {cid}") == V5_PUB_NOT_AUTHORIZED, cid
    pump.publish("clients/pump-7/settle", "x")
    pump.wait_for("clients/pump-7/settle")
    assert [m.payload for m in pump.received("clients/pump-7/state")] == [b"running"]
    assert other.received() == []


def test_retained_messages_reach_only_clients_allowed_to_read_them(broker, clients):
    b = broker(acl=ACL, passwords=USERS)
    ops = clients.new(b.port, v5=True, **login("ops"))
    for topic in ("fieldmq/gw/secret/config", "fieldmq/gw/meter/config", "plant/recipe"):
        assert ops.publish(topic, f"retained {topic}", retain=True) in PUBLISHED
    # MQTT-3.3.1-6: a new subscription gets the retained messages it matches,
    # but only those its client may read.
    anonymous = clients.new(b.port, v5=True)
    assert anonymous.subscribe("fieldmq/#") == [1]
    late_ops = clients.new(b.port, v5=False, **login("ops"))
    assert late_ops.subscribe("fieldmq/#", "plant/#") == [1, 1]
    for topic in ("fieldmq/gw/secret/config", "fieldmq/gw/meter/config", "plant/recipe"):
        assert late_ops.wait_for(topic).retain
    anonymous.wait_for("fieldmq/gw/meter/config")
    nothing_more(anonymous, [], settle=ops, settle_topic="fieldmq/gw/settle")
    # (fieldmq/gw/status is the gateway's own retained status, readable by anonymous clients.)
    assert sorted(m.topic for m in anonymous.received()) == ["fieldmq/gw/meter/config", "fieldmq/gw/settle", GATEWAY_STATUS]
    sensor = clients.new(b.port, v5=True, **login("sensor"))
    assert sensor.subscribe("plant/#") == [V5_SUB_NOT_AUTHORIZED]
    time.sleep(0.3)
    assert sensor.received() == []


def test_a_will_on_a_topic_the_client_may_not_write_refuses_the_connect(broker, clients):
    b = broker(acl=ACL, passwords=USERS)
    # Anonymous clients may not write fieldmq/...: the CONNECT itself is refused.
    assert connack(b.port, v5=True, will=("fieldmq/gw/lwt", "offline", 1)) == V5_NOT_AUTHORIZED
    assert connack(b.port, v5=False, will=("fieldmq/gw/lwt", "offline", 1)) == V3_NOT_AUTHORIZED
    assert connack(b.port, v5=True, will=("plant/sensor/state", "offline", 1), **login("viewer")) == V5_NOT_AUTHORIZED
    # A will the client may write is accepted and published when it vanishes (MQTT-3.1.2-8).
    watcher = clients.new(b.port, v5=True, **login("ops"))
    assert watcher.subscribe("plant/#", "fieldmq/#") == [1, 1]
    c = RawConn(b.port)
    c.send(connect_packet("sensor-1", v5=False, will=("plant/sensor/state", "offline", 1), **login("sensor")))
    assert c.expect(2)[1][1] == V3_ACCEPTED
    c.close()
    assert watcher.wait_for("plant/sensor/state").payload == b"offline"
    assert watcher.received("fieldmq/gw/lwt") == []


# --------------------------------------------------------------------------
# 6. Device writes


def test_a_device_write_the_acl_does_not_allow_changes_nothing_on_the_modbus_device(broker, clients, tmp_path):
    device = ModbusDevice({"holding": {"40": 100}}, tmp_path)
    try:
        extra = f"""
[[device]]
name = "plc"
kind = "modbus-tcp"
address = "127.0.0.1:{device.port}"
poll = "500ms"
  [[device.attribute]]
  name = "setpoint"
  table = "holding"
  register = 40
  scale = 0.1
  writable = true
  min = 5.0
  max = 30.0
"""
        acl = packaged_acl() + "\nuser ops\ntopic readwrite fieldmq/#\n\nuser viewer\ntopic read fieldmq/#\n"
        b = broker(acl=acl, passwords={"ops": "ops-pass", "viewer": "viewer-pass"}, extra=extra)
        set_topic = "fieldmq/gw/plc/set/setpoint"
        ops = clients.new(b.port, v5=True, username="ops", password="ops-pass")
        assert ops.subscribe(f"{set_topic}/result", "fieldmq/gw/plc") == [1, 1]
        ops.wait_for("fieldmq/gw/plc", timeout=10)  # the device is being polled
        # Anonymous (v5: refused with 0x87; 3.1.1 with mosquitto_pub: a plain
        # PUBACK, the writer learns nothing) and a read-only user.
        anonymous = clients.new(b.port, v5=True)
        assert anonymous.publish(set_topic, "25.0") == V5_PUB_NOT_AUTHORIZED
        proc = subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(b.port), "-t", set_topic,
                               "-m", "26.0", "-q", "1", "-V", "mqttv311"], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
        viewer = clients.new(b.port, v5=False, username="viewer", password="viewer-pass")
        assert viewer.publish(set_topic, "27.0") == 0
        time.sleep(1.0)  # two poll cycles: a write would have been done by now
        assert device.holding(40) == 100
        assert ops.received(f"{set_topic}/result") == []
        # A user with write access changes it.
        assert ops.publish(set_topic, "21.5") in PUBLISHED
        assert ops.wait_for(f"{set_topic}/result", timeout=10).payload == b"ok"
        assert device.holding(40) == 215
        assert [m.payload for m in ops.received(f"{set_topic}/result")] == [b"ok"]
        assert b.gw.count(r"write device=plc attribute=setpoint") == 1, b.gw.log()
    finally:
        device.stop()


# --------------------------------------------------------------------------
# 7. Limits


def test_max_connections_refuses_the_next_client_and_the_others_carry_on(broker, clients):
    b = broker(max_connections=2)
    a = clients.new(b.port, v5=False, client_id="a")
    c2 = clients.new(b.port, v5=True, client_id="b")
    assert c2.subscribe("limits/#") == [1]
    # 3.1.1: 0x03 Server unavailable; 5.0: 0x89 Server busy; then closed (MQTT-3.2.2-5/-7).
    assert connack(b.port, v5=False, client_id="c") == V3_SERVER_UNAVAILABLE
    assert connack(b.port, v5=True, client_id="c") == V5_SERVER_BUSY
    assert a.connected and c2.connected
    round_trip(a, c2, "limits/still", "working")
    # A freed slot is given to the next client.
    a.close()
    deadline = time.monotonic() + 3
    while (code := connack(b.port, v5=True, client_id="d")) != V5_SUCCESS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert code == V5_SUCCESS


def test_an_oversized_packet_closes_only_its_connection(broker, clients):
    b = broker(max_packet_size="1KiB")
    sub = clients.new(b.port, v5=True)
    assert sub.subscribe("size/#") == [1]
    # Under the limit: delivered.
    small = clients.new(b.port, v5=False)
    small.publish("size/ok", b"x" * 900)
    assert sub.wait_for("size/ok").payload == b"x" * 900
    # MQTT 5: DISCONNECT 0x95 Packet too large, then closed (MQTT-3.1.2-24 for the server's limit).
    c = RawConn(b.port)
    c.send(raw.connect("big-v5"))
    c.expect(2)
    c.send(raw.publish("size/big", b"y" * 2000, qos=1, packet_id=1))
    packets = c.closed(timeout=5)
    assert [(first, body[:1]) for first, body in packets] == [(0xE0, bytes([V5_PACKET_TOO_LARGE]))], packets
    c.close()
    # MQTT 3.1.1: just closed.
    c = RawConn(b.port)
    c.send(raw.connect("big-v3", v5=False))
    c.expect(2)
    c.send(raw.publish("size/big", b"z" * 2000, v5=False))
    assert c.closed(timeout=5) == []
    c.close()
    # Nobody saw the big ones; the others are still connected and working.
    round_trip(small, sub, "size/after", "still here")
    assert sub.received("size/big") == [] and sub.connected and small.connected


def test_a_socket_that_sends_nothing_is_closed_after_connect_timeout(broker, clients, pki, tmp_path):
    b = broker(transports=("mqtt", "mqtts", "ws"), connect_timeout="1s", **tls_files(pki, tmp_path))
    early = clients.new(b.port, v5=True)  # a client that did connect is not affected

    def plain(port):
        return socket.create_connection(("127.0.0.1", port), source_address=(new_source(), 0))

    def tls_done(port):
        return tls_context(pki.ca).wrap_socket(plain(port), server_hostname="127.0.0.1")

    def ws_done(port):
        s = plain(port)
        s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
        return s

    cases = {
        "mqtt, silent": (plain, b.port),
        "mqtts, no TLS handshake": (plain, b.ports["mqtts"]),
        "mqtts, TLS done, no CONNECT": (tls_done, b.ports["mqtts"]),
        "ws, silent": (plain, b.ports["ws"]),
        "ws, upgraded, no CONNECT": (ws_done, b.ports["ws"]),
    }
    results = {}

    def watch(name, make, port):
        start = time.monotonic()
        s = make(port)
        try:
            closed_after(s, 6)
            results[name] = time.monotonic() - start  # from the TCP connect
        except AssertionError as e:
            results[name] = str(e)
        finally:
            s.close()

    threads = [threading.Thread(target=watch, args=(name, make, port)) for name, (make, port) in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for name in cases:
        took = results.get(name)
        assert isinstance(took, float) and 0.8 <= took <= 3.0, f"{name}: closed after {took}"
    assert early.connected


# --------------------------------------------------------------------------
# 8. Reload


def test_sighup_applies_a_changed_acl_to_connected_clients(broker, clients, tmp_path):
    read_only = "topic read data/#\n"
    read_write = "topic readwrite data/#\ntopic read extra/#\n"
    b = broker(acl=read_only)
    sub = clients.new(b.port, v5=True)
    assert sub.subscribe("data/#") == [1]
    writer = clients.new(b.port, v5=True, client_id="writer")
    writer3 = clients.new(b.port, v5=False, client_id="writer3")
    assert writer.publish("data/x", "before") == V5_PUB_NOT_AUTHORIZED
    assert writer.subscribe("extra/#") == [V5_SUB_NOT_AUTHORIZED]
    # Granted, and the same connections may now write and subscribe.
    (tmp_path / "acl").write_text(read_write)
    b.reload()
    assert writer.publish("data/x", "granted") in PUBLISHED
    writer3.publish("data/y", "granted-v3")
    assert sub.wait_for("data/x").payload == b"granted"
    assert sub.wait_for("data/y").payload == b"granted-v3"
    assert writer.subscribe("extra/#") == [1]
    # And revoked again.
    (tmp_path / "acl").write_text(read_only)
    b.reload()
    assert writer.publish("data/x", "revoked") == V5_PUB_NOT_AUTHORIZED
    writer3.publish("data/y", "revoked-v3")
    assert writer.subscribe("extra/#") == [V5_SUB_NOT_AUTHORIZED]
    # A broken ACL is refused as a whole: the rules in force stay (no grant
    # appears, nothing is locked out), and the gateway keeps running.
    (tmp_path / "acl").write_text(read_write + "topci read data/#\n")
    mark = len(b.gw.lines)
    b.gw.send(signal.SIGHUP)
    b.gw.wait_for(r"acl:3:1: unknown keyword `topci`", after=mark)  # where the mistake is
    b.gw.wait_for(r"SIGHUP: the new (config|password or ACL file) was refused", after=mark)
    assert writer.publish("data/x", "after a bad reload") == V5_PUB_NOT_AUTHORIZED
    assert sub.subscribe("data/more/#") == [1]
    time.sleep(0.3)
    assert [m.payload for m in sub.received()] == [b"granted", b"granted-v3"]
    assert all(c.connected for c in (sub, writer, writer3)) and b.gw.proc.poll() is None


# --------------------------------------------------------------------------
# 9. $SYS


def test_sys_topics_count_what_the_clients_did(broker, clients, fieldmq_bin):
    b = broker(sys_interval="1s")
    watcher = SysWatcher(b.port, v5=False)
    clients.append(watcher)
    version = subprocess.run([fieldmq_bin, "--version"], capture_output=True, text=True).stdout.strip()
    assert watcher.value("version") == version == "fieldmq 0.1.0"
    assert re.fullmatch(r"\d+ seconds", watcher.value("uptime"))
    watcher.wait_value("clients/connected", 1)
    # Values settle after a tick (the $SYS messages are retained themselves).
    watcher.wait_until("uptime", lambda v: int(v.split()[0]) >= 2, "2 seconds or more")
    v0 = watcher.values()
    n0 = {k: int(v) for k, v in v0.items() if v.isdigit()}

    pub = clients.new(b.port, v5=False, client_id="publisher", clean=False)
    sub = clients.new(b.port, v5=True, client_id="subscriber")
    assert sub.subscribe("data/#", "ret/#") == [1, 1]
    K, R, SIZE = 5, 3, 100
    for i in range(K):
        pub.publish(f"data/{i}", b"d" * SIZE, qos=1)
    for i in range(R):
        pub.publish(f"ret/{i}", b"r" * SIZE, qos=1, retain=True)
    for i in range(K):
        sub.wait_for(f"data/{i}")
    for i in range(R):
        sub.wait_for(f"ret/{i}")
    watcher.wait_value("messages/received", n0["messages/received"] + K + R)
    watcher.wait_value("clients/connected", 3)
    watcher.wait_value("clients/maximum", 3)
    watcher.wait_value("subscriptions/count", n0["subscriptions/count"] + 2)
    watcher.wait_value("retained messages/count", n0["retained messages/count"] + R)
    now = {k: int(v) for k, v in watcher.values().items() if v.isdigit()}
    assert now["messages/sent"] - n0["messages/sent"] >= K + R
    assert now["bytes/received"] - n0["bytes/received"] >= (K + R) * SIZE
    assert now["bytes/sent"] - n0["bytes/sent"] >= (K + R) * SIZE
    assert now["messages/dropped"] == 0 and now["messages/denied"] == 0
    # An empty retained message clears one (MQTT-3.3.1-10).
    pub.publish("ret/0", b"", qos=1, retain=True)
    watcher.wait_value("retained messages/count", n0["retained messages/count"] + R - 1)
    # The persistent-session publisher leaves: connected 2, its session is
    # counted as disconnected, the maximum stays.
    pub.close()
    watcher.wait_value("clients/connected", 2)
    watcher.wait_value("clients/disconnected", n0["clients/disconnected"] + 1)
    watcher.wait_value("clients/total", 3)
    watcher.wait_value("clients/maximum", 3)
    # The subscriber leaves and its subscriptions go with it.
    sub.close()
    watcher.wait_value("subscriptions/count", n0["subscriptions/count"])
    # Nobody may publish to $SYS: the value stays the broker's own.
    intruder = clients.new(b.port, v5=True)
    code = intruder.publish("$SYS/broker/version", "hacked", qos=1, retain=True)
    assert code >= 0x80, f"PUBACK {code:#x}"
    intruder.publish("$SYS/broker/uptime", "hacked", qos=0, retain=True)
    late = clients.new(b.port, v5=False)
    assert late.subscribe("$SYS/broker/version", "$SYS/broker/uptime") == [1, 1]
    assert late.wait_for("$SYS/broker/version").payload == version.encode()
    assert re.fullmatch(rb"\d+ seconds", late.wait_for("$SYS/broker/uptime").payload)
    time.sleep(0.3)
    assert b"hacked" not in [m.payload for m in late.received()] + [m.payload for m in watcher.received()]
    # Only changed values are sent again: over several ticks the version came once.
    assert int(watcher.value("uptime").split()[0]) >= 4
    assert len(watcher.received("$SYS/broker/version")) == 1


def test_sys_counts_acl_denied_publishes_and_needs_read_access(broker, clients):
    acl = "topic readwrite data/#\n\nuser ops\ntopic read $SYS/#\n"
    b = broker(acl=acl, passwords={"ops": "ops-pass"}, sys_interval="1s")
    anonymous = clients.new(b.port, v5=True)
    assert anonymous.subscribe("$SYS/#", "$SYS/broker/version") == [V5_SUB_NOT_AUTHORIZED] * 2
    watcher = SysWatcher(b.port, v5=True, username="ops", password="ops-pass")
    clients.append(watcher)
    d0 = watcher.number("messages/denied")
    for i in range(3):
        assert anonymous.publish(f"forbidden/{i}", "x") == V5_PUB_NOT_AUTHORIZED
    anonymous.publish("forbidden/q0", "x", qos=0)
    assert anonymous.publish("data/ok", "x") in PUBLISHED
    watcher.wait_value("messages/denied", d0 + 4)
    assert anonymous.received() == []


def test_sys_reports_the_store_and_forward_backlog_of_an_unreachable_upstream(broker, clients):
    extra = f"""
[buffer]
commit_interval = "10ms"

[[upstream]]
name = "cloud"
url = "mqtt://127.0.0.1:{free_port()}"
forward = ["lan/#"]
backoff_min = "100ms"
backoff_max = "1s"
"""
    b = broker(sys_interval="1s", extra=extra)
    watcher = SysWatcher(b.port, v5=True)
    clients.append(watcher)
    watcher.wait_value("store-and-forward/cloud/waiting", 0)
    pub = clients.new(b.port, v5=False)
    N = 7
    for i in range(N):
        pub.publish(f"lan/meter/{i}", f"reading {i}", qos=1)
    pub.publish("not-forwarded/x", "local only", qos=1)
    watcher.wait_value("store-and-forward/cloud/waiting", N)
    assert watcher.value("store-and-forward/cloud/dropped") == "0"
    assert watcher.value("store-and-forward/cloud/last_delivery") == "never"


# --------------------------------------------------------------------------
# 10. fieldmq check


def test_check_warns_when_a_lan_listener_lets_anonymous_clients_write(cli, write_config, tmp_path):
    port = free_port()
    base = f'[gateway]\nid = "gw"\ndata_dir = "state"\n\n[broker]\nlisten = ["0.0.0.0:{port}"]\n'
    listen_line = base.splitlines().index(f'listen = ["0.0.0.0:{port}"]') + 1
    warning = re.compile(rf"warning: (\S*/)?fieldmq\.toml:{listen_line}:\d+: .*0\.0\.0\.0:{port} lets anonymous clients write")

    path = write_config(base)
    r = cli("check", "--config", path)
    assert r.code == 0, r.err
    assert warning.search(r.err) and "no acl_file" in r.err, r.err

    # An ACL that grants anonymous writes: still warned.
    (tmp_path / "acl").write_text("topic readwrite fieldmq/#\n")
    path = write_config(base + 'acl_file = "acl"\n')
    r = cli("check", "--config", path)
    assert r.code == 0 and warning.search(r.err), r.err

    # The packaged read-only ACL: no warning.
    (tmp_path / "acl").write_text(packaged_acl())
    r = cli("check", "--config", path)
    assert r.code == 0, r.err
    assert "lets anonymous clients write" not in r.err, r.err

    # No anonymous clients at all, or loopback only: no warning either.
    for text in (base + "allow_anonymous = false\n", base.replace("0.0.0.0", "127.0.0.1")):
        r = cli("check", "--config", write_config(text))
        assert r.code == 0 and "lets anonymous clients write" not in r.err, r.err


def test_an_absent_clients_queue_is_bounded_by_bytes_and_the_drops_are_counted(broker, clients):
    # max_queued_bytes: an offline persistent session (MQTT-3.1.2-5 queues
    # its QoS 1 messages) keeps at most that many topic and payload bytes;
    # the rest is dropped and counted in $SYS, and what was kept arrives in
    # order when the client comes back.
    b = broker(sys_interval="1s", max_queued_bytes="4KiB")
    watcher = SysWatcher(b.port, v5=False)
    clients.append(watcher)
    absent = clients.new(b.port, v5=False, client_id="absent", clean=False)
    assert absent.subscribe("bulk/#", qos=1) == [1]
    absent.close()
    pub = clients.new(b.port, v5=False)
    for i in range(10):
        pub.publish(f"bulk/{i}", bytes([65 + i]) * 1000, qos=1)
    watcher.wait_value("messages/dropped", 6)
    back = clients.new(b.port, v5=False, client_id="absent", clean=False)
    for i in range(4):
        assert back.wait_for(f"bulk/{i}").payload == bytes([65 + i]) * 1000
    time.sleep(0.5)
    assert [m.topic for m in back.received()] == [f"bulk/{i}" for i in range(4)]


def test_a_client_id_does_not_hand_another_users_session_over(broker, clients):
    # Another user may neither kick a connected client off by reusing its
    # client id (MQTT-3.1.4-3 takeover is for the same client), nor resume
    # its persistent session and read what was queued for it.
    acl = "user ops\ntopic readwrite secret/#\nuser eve\ntopic readwrite secret/#\n"
    b = broker(acl=acl, passwords={"ops": "ops-pass", "eve": "eve-pass"})
    ops = clients.new(b.port, v5=False, client_id="dash", username="ops", password="ops-pass", clean=False)
    assert ops.subscribe("secret/#", qos=1) == [1]
    for v5 in (True, False):
        assert connack(b.port, v5=v5, client_id="dash", username="eve", password="eve-pass", clean=False) in (
            V5_NOT_AUTHORIZED, V3_NOT_AUTHORIZED)
        assert connack(b.port, v5=v5, client_id="dash", clean=False) in (V5_NOT_AUTHORIZED, V3_NOT_AUTHORIZED)
    assert ops.connected and round_trip(ops, ops, "secret/live", b"still here")
    ops.close()
    writer = clients.new(b.port, v5=False, username="ops", password="ops-pass")
    writer.publish("secret/queued", b"for ops only", qos=1)
    eve = clients.new(b.port, v5=False, client_id="dash", username="eve", password="eve-pass", clean=False)
    time.sleep(0.5)
    assert eve.received() == [], "eve got what was queued for ops"


def test_websocket_listeners_refuse_pages_from_origins_not_listed(broker):
    # A page from another site, open in an operator's browser on the LAN,
    # must not reach the broker through it (cross-site WebSocket hijacking):
    # with ws_origins set, a browser's Origin must be listed; clients that
    # are not browsers send none.
    b = broker(transports=("mqtt", "ws"), ws_origins=["https://dashboard.plant.local"])

    def upgrade(origin):
        with socket.create_connection(("127.0.0.1", b.ports["ws"]), timeout=5) as s:
            extra = f"Origin: {origin}\r\n" if origin else ""
            s.sendall((
                "GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: mqtt\r\n{extra}\r\n").encode())
            return s.recv(4096).split(b"\r\n")[0]

    assert upgrade("https://dashboard.plant.local") == b"HTTP/1.1 101 Switching Protocols"
    assert upgrade("https://evil.example") == b"HTTP/1.1 403 Forbidden"
    assert upgrade(None) == b"HTTP/1.1 101 Switching Protocols"
    b.gw.wait_for(r'Origin "https://evil\.example" is not an allowed origin')
