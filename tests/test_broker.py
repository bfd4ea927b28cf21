"""The local broker against real clients: mosquitto_pub/mosquitto_sub and
paho-mqtt, MQTT 3.1.1 and 5.0, and a raw socket where a test must control
every byte. Each test names the normative statements (MQTT-x.y.z-n) of the
OASIS specifications it checks."""

import shutil
import socket
import struct
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import mqtt_raw as raw

BROKER_CONFIG = """
[gateway]
id = "gw"
data_dir = "state"
[broker]
listen = ["127.0.0.1:0"]
connect_timeout = "1s"
max_packet_size = "64KiB"
"""


@pytest.fixture
def port(gateway, write_config):
    gw = gateway(write_config(BROKER_CONFIG), RUST_LOG="info")
    m = gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)")
    return int(m.group(1))


def tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: apt-get install mosquitto-clients (scripts/install-test-peers does it)")
    return path


class Collector:
    """A paho client that records what it receives."""

    def __init__(self, port, client_id="", v5=False, clean=True, properties=None, subscribe=(), will=None):
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
        self.messages = []
        self.lock = threading.Condition()
        self.client.on_message = self._on_message
        if will:
            self.client.will_set(*will[:3], properties=will[3] if len(will) > 3 else None)
        connect_kwargs = {"clean_start": clean, "properties": properties} if v5 else {}
        self.client.connect("127.0.0.1", port, keepalive=30, **connect_kwargs)
        self.client.loop_start()
        for topic, qos in subscribe:
            result, mid = self.client.subscribe(topic, qos)
            assert result == 0
        time.sleep(0.2)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(msg)
            self.lock.notify_all()

    def wait(self, count, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.messages) < count and time.monotonic() < deadline:
                self.lock.wait(0.05)
            return list(self.messages)

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_mosquitto_clients_publish_and_subscribe_at_every_qos_in_both_versions(port):
    for version in ("mqttv311", "mqttv5"):
        sub = subprocess.Popen(
            [tool("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-t", "lan/#", "-q", "2", "-C", "3", "-v", "-V", version],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(0.3)
        for qos in (0, 1, 2):
            subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t", f"lan/{qos}", "-m", f"qos{qos}", "-q", str(qos), "-V", version], check=True, timeout=5)
        out, _ = sub.communicate(timeout=5)
        assert out.splitlines() == ["lan/0 qos0", "lan/1 qos1", "lan/2 qos2"], version


def test_retained_messages_are_set_replaced_cleared_and_reach_late_subscribers(port):
    # MQTT-3.3.1-5 (stored), -10/-11 (empty payload clears), -8 (RETAIN=1 to a new subscriber).
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    pub.publish("r/a", "first", qos=1, retain=True).wait_for_publish(5)
    pub.publish("r/a", "second", qos=1, retain=True).wait_for_publish(5)
    pub.publish("r/b", "gone", qos=1, retain=True).wait_for_publish(5)
    pub.publish("r/b", "", qos=1, retain=True).wait_for_publish(5)
    late = Collector(port, subscribe=[("r/#", 1)])
    got = late.wait(1)
    time.sleep(0.3)
    assert [(m.topic, m.payload, m.retain) for m in late.messages] == [("r/a", b"second", True)]
    # A live publish to an existing subscription is not flagged retained (MQTT-3.3.1-9).
    pub.publish("r/a", "third", qos=1, retain=True).wait_for_publish(5)
    got = late.wait(2)
    assert (got[1].payload, got[1].retain) == (b"third", False)
    late.stop()
    pub.disconnect()
    pub.loop_stop()


def test_qos2_is_delivered_exactly_once_across_a_publisher_reconnect(port):
    # MQTT 4.3.3 and MQTT-4.4.0-1: the publisher resends with DUP after a
    # reconnect; the broker must not route it twice.
    sub = Collector(port, client_id="q2-sub", subscribe=[("x/q2", 2)])
    c = raw.Raw(port)
    c.send(raw.connect("q2-pub", v5=False, clean=False))
    c.expect(2)
    c.send(raw.publish("x/q2", b"once", qos=2, packet_id=7, v5=False))
    c.expect(5)  # PUBREC; the connection drops before PUBREL
    c.close()
    c = raw.Raw(port)
    c.send(raw.connect("q2-pub", v5=False, clean=False))
    first, body = c.expect(2)
    assert body[0] == 1, "session present (MQTT-3.2.2-2)"
    c.send(raw.publish("x/q2", b"once", qos=2, packet_id=7, dup=True, v5=False))
    c.expect(5)
    c.send(raw.ack(0x62, 7))
    first, body = c.expect(7)  # PUBCOMP
    assert struct.unpack("!H", body[:2])[0] == 7
    time.sleep(0.5)
    assert [m.payload for m in sub.wait(1)] == [b"once"]
    sub.stop()
    c.close()


def test_a_will_is_published_when_a_client_vanishes(port):
    # MQTT-3.1.2-8: no DISCONNECT, so the will goes out.
    watcher = Collector(port, subscribe=[("wills/#", 1)])
    c = raw.Raw(port)
    c.send(raw.connect("dies", v5=False, will=("wills/dies", b"gone", 1, ())))
    c.expect(2)
    c.close()
    got = watcher.wait(1)
    assert [(m.topic, m.payload) for m in got] == [("wills/dies", b"gone")]
    # A clean DISCONNECT discards the will (MQTT-3.14.4-3).
    c = raw.Raw(port)
    c.send(raw.connect("leaves", v5=False, will=("wills/leaves", b"gone", 1, ())))
    c.expect(2)
    c.send(raw.packet(0xE0, b""))
    c.closed()
    time.sleep(0.5)
    assert len(watcher.wait(2, timeout=0.5)) == 1
    watcher.stop()


def test_a_will_delay_is_honoured_and_a_return_cancels_it(port):
    # MQTT-3.1.3-9: the will waits for its delay (2 s here)...
    watcher = Collector(port, subscribe=[("wills/#", 1)])
    will_delay = [(0x18, struct.pack("!I", 2))]
    session = [(0x11, struct.pack("!I", 60))]
    c = raw.Raw(port)
    c.send(raw.connect("delayed", properties=session, will=("wills/delayed", b"late", 1, will_delay)))
    c.expect(2)
    c.close()
    start = time.monotonic()
    assert watcher.wait(1, timeout=1.5) == []
    got = watcher.wait(1, timeout=2.0)
    elapsed = time.monotonic() - start
    assert [m.payload for m in got] == [b"late"] and 1.9 <= elapsed <= 2.6, elapsed
    # ...and is not sent at all if the client reconnects within it.
    c = raw.Raw(port)
    c.send(raw.connect("back", clean=True, properties=session, will=("wills/back", b"late", 1, will_delay)))
    c.expect(2)
    c.close()
    c = raw.Raw(port)
    c.send(raw.connect("back", clean=False, properties=session))
    c.expect(2)
    assert len(watcher.wait(2, timeout=3.0)) == 1
    c.close()
    watcher.stop()


def test_a_persistent_session_queues_qos1_while_the_client_is_away(port):
    # MQTT-3.1.2-5 (3.1.1 clean session 0) and MQTT 4.4: queued, then delivered on return.
    # The client subscribes, then leaves: DISCONNECT, and the broker has
    # closed the connection before anything is published (so the broker
    # knows it is away, not merely reconnecting).
    away = raw.Raw(port)
    away.send(raw.connect("away", v5=False, clean=False))
    away.expect(2)
    away.send(raw.subscribe(1, [("q/#", 1)], v5=False))
    away.expect(9)
    away.send(raw.packet(0xE0, b""))
    away.closed()
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for i in range(5):
        pub.publish(f"q/{i}", f"m{i}", qos=1).wait_for_publish(5)
    pub.publish("q/zero", "qos0 is not queued", qos=0).wait_for_publish(5)
    back = Collector(port, client_id="away", clean=False)
    got = back.wait(5)
    time.sleep(0.3)
    assert [m.payload for m in back.messages] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    back.stop()
    pub.disconnect()
    pub.loop_stop()


def test_shared_subscriptions_share_the_load(port):
    # MQTT 4.8.2: each message to one member of the group.
    members = [Collector(port, client_id=f"worker-{i}", v5=True, subscribe=[("$share/workers/jobs/#", 1)]) for i in range(2)]
    outsider = Collector(port, v5=True, subscribe=[("jobs/#", 1)])
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for i in range(20):
        pub.publish(f"jobs/{i}", str(i), qos=1).wait_for_publish(5)
    assert len(outsider.wait(20)) == 20
    time.sleep(0.3)
    counts = [len(m.messages) for m in members]
    assert sum(counts) == 20 and min(counts) >= 5, counts
    for c in [*members, outsider]:
        c.stop()
    pub.disconnect()
    pub.loop_stop()


def test_topic_aliases_work_in_both_directions(port):
    # MQTT 3.3.2.3.4: the client's alias maps its later empty topic; the
    # broker aliases topics towards a client that allows it.
    sub = raw.Raw(port)
    sub.send(raw.connect("alias-sub", properties=[(0x22, struct.pack("!H", 5))]))
    sub.expect(2)
    sub.send(raw.subscribe(1, [("al/#", 0)]))
    sub.expect(9)
    pub = raw.Raw(port)
    pub.send(raw.connect("alias-pub"))
    pub.expect(2)
    pub.send(raw.publish("al/long/topic", b"1", properties=[(0x23, struct.pack("!H", 3))]))
    pub.send(raw.publish("", b"2", properties=[(0x23, struct.pack("!H", 3))]))
    first = raw.parse_publish(*sub.expect(3))
    second = raw.parse_publish(*sub.expect(3))
    assert (first[0], first[1]) == ("al/long/topic", b"1")
    assert b"\x23\x00\x01" in first[4], "the broker set alias 1 on the first message"
    assert (second[0], second[1]) == ("", b"2"), "the second message uses the alias alone"
    # An alias beyond the broker's maximum is a protocol error: 0x94.
    pub.send(raw.publish("al/x", b"3", properties=[(0x23, struct.pack("!H", 60000))]))
    assert pub.closed()[-1] == (0xE0, b"\x94")
    sub.close()


def test_a_malformed_packet_closes_only_its_own_connection(port):
    # MQTT-4.13.1-1 / 4.13.2: a malformed packet closes that connection,
    # with DISCONNECT 0x81 in 5.0; other clients are not disturbed.
    bystander = Collector(port, v5=True, subscribe=[("ok/#", 0)])
    bad = raw.Raw(port)
    bad.send(raw.connect("bad"))
    bad.expect(2)
    bad.send(bytes([0x36, 0x03, 0x00, 0x01, 0x41]))  # PUBLISH with QoS 3 (MQTT-3.3.1-4)
    assert bad.closed()[-1] == (0xE0, b"\x81")
    garbage = raw.Raw(port)
    garbage.send(b"\xff\xff\xff\xff\xff\xff")
    garbage.closed()
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    pub.publish("ok/1", "still here", qos=1).wait_for_publish(5)
    assert [m.payload for m in bystander.wait(1)] == [b"still here"]
    bystander.stop()
    pub.disconnect()
    pub.loop_stop()


def test_overlapping_subscriptions_deliver_once_at_the_maximum_qos(port):
    # MQTT-3.3.5-1 (mosquitto 2.0.11 delivers at the first match's QoS).
    c = raw.Raw(port)
    c.send(raw.connect("overlap"))
    c.expect(2)
    c.send(raw.subscribe(1, [("ov/+", 0), ("ov/#", 2)], properties=[(0x0B, raw.varint(9))]))
    c.expect(9)
    pub = raw.Raw(port)
    pub.send(raw.connect("overlap-pub"))
    pub.expect(2)
    pub.send(raw.publish("ov/a", b"x", qos=2, packet_id=1))
    first, body = c.expect(3)
    topic, payload, qos, pid, props = raw.parse_publish(first, body)
    assert (topic, qos) == ("ov/a", 2)
    assert b"\x0b\x09" in props, "the subscription identifier is forwarded (MQTT-3.3.4-3)"
    with pytest.raises((TimeoutError, OSError)):
        c.recv(timeout=0.5)  # one copy only


def test_exceeding_receive_maximum_ends_in_disconnect_0x93(port):
    # MQTT-3.3.4-7 (mosquitto 2.0.11 does not send it). The broker
    # advertises its Receive Maximum in CONNACK; one QoS 2 message too many,
    # never released, is a protocol error.
    c = raw.Raw(port)
    c.send(raw.connect("greedy"))
    first, body = c.expect(2)
    idx = body.find(b"\x21")
    receive_max = struct.unpack("!H", body[idx + 1 : idx + 3])[0]
    for pid in range(1, receive_max + 2):
        c.send(raw.publish("rm/t", b"x", qos=2, packet_id=pid))
    packets = c.closed(timeout=10)
    assert packets[-1] == (0xE0, b"\x93")
    assert sum(1 for first, _ in packets if first >> 4 == 5) == receive_max


def test_a_takeover_sends_disconnect_0x8e_to_the_old_connection(port):
    # MQTT-3.1.4-3 (mosquitto 2.0.11 sends no DISCONNECT).
    old = raw.Raw(port)
    old.send(raw.connect("same-id"))
    old.expect(2)
    new = raw.Raw(port)
    new.send(raw.connect("same-id"))
    new.expect(2)
    assert old.closed()[-1] == (0xE0, b"\x8e")
    new.send(raw.packet(0xC0, b""))
    new.expect(13)  # the new connection works


def test_a_stop_sends_disconnect_0x8b_to_every_idle_connection(gateway, write_config):
    # MQTT 5 (4.13.2, Table 2-6): a server shutting down says so with 0x8B;
    # 3.1.1 has no server DISCONNECT, the connection just closes. Idle
    # connections wait on no shutdown future of their own: the stop must
    # still reach each of them.
    gw = gateway(write_config(BROKER_CONFIG), RUST_LOG="info")
    port = int(gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)").group(1))
    clients = []
    for i in range(3):
        c = raw.Raw(port)
        c.send(raw.connect(f"stop-{i}", v5=i > 0))
        c.expect(2)
        clients.append(c)
    code, _ = gw.stop()
    assert code == 0
    assert clients[0].closed() == []
    for c in clients[1:]:
        assert c.closed()[-1] == (0xE0, b"\x8b")


def test_invalid_filters_get_suback_failure_codes_in_v5(port):
    # MQTT 3.9.3: 0x8F Topic Filter invalid per filter; valid ones still granted.
    c = raw.Raw(port)
    c.send(raw.connect("filters"))
    c.expect(2)
    c.send(raw.subscribe(3, [("a/#/b", 1), ("ok/+", 1), ("$share/g", 0)]))
    first, body = c.expect(9)
    assert body[-3:] == b"\x8f\x01\x8f"


def test_an_invalid_filter_closes_a_v311_connection(port):
    # MQTT-4.7.1-2 / MQTT-4.7.3-1 make `a/#/b` and an empty filter invalid;
    # 3.1.1's SUBACK has no code for it, and a protocol violation closes
    # the connection (MQTT-4.8.0-1), as mosquitto does.
    for bad in ["a/#/b", "", "fuzz/a+"]:
        c = raw.Raw(port)
        c.send(raw.connect("filters311", v5=False))
        c.expect(2)
        c.send(raw.subscribe(3, [("ok/+", 1), (bad, 1)], v5=False))
        assert all(first >> 4 != 9 for first, _ in c.closed()), f"{bad!r} got a SUBACK"


def test_keepalive_is_enforced_at_one_and_a_half_times(port):
    # MQTT-3.1.2-24 (5.0) / MQTT-3.1.2-22: no packet within 1.5 x keep alive
    # closes the connection; v5 says why (0x8D).
    c = raw.Raw(port)
    c.send(raw.connect("sleepy", keep_alive=2))
    c.expect(2)
    start = time.monotonic()
    packets = c.closed(timeout=6)
    elapsed = time.monotonic() - start
    assert packets[-1] == (0xE0, b"\x8d")
    assert 2.9 <= elapsed <= 3.5, elapsed


def test_server_assigned_client_ids_and_v311_empty_id_rules(port):
    # MQTT-3.1.3-6/-7 (5.0: assigned id in CONNACK) and MQTT-3.1.3-8 (3.1.1:
    # an empty id with clean session 0 is refused with return code 0x02).
    c = raw.Raw(port)
    c.send(raw.connect(""))
    first, body = c.expect(2)
    assert b"\x12\x00" in body and b"fieldmq-" in body
    c = raw.Raw(port)
    c.send(raw.connect("", v5=False, clean=False))
    first, body = c.expect(2)
    assert body == b"\x00\x02"


def test_request_response_and_user_properties_pass_through(port):
    # MQTT-3.3.2-15/-16 (response topic, correlation data) and MQTT-3.3.2-18 (user properties).
    responder = Collector(port, v5=True, subscribe=[("req/#", 1)])
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "resp/1"
    props.CorrelationData = b"id-42"
    props.UserProperty = [("site", "plant-1")]
    props.MessageExpiryInterval = 60
    pub.publish("req/x", "ask", qos=1, properties=props).wait_for_publish(5)
    [msg] = responder.wait(1)
    assert msg.properties.ResponseTopic == "resp/1"
    assert msg.properties.CorrelationData == b"id-42"
    assert msg.properties.UserProperty == [("site", "plant-1")]
    assert 58 <= msg.properties.MessageExpiryInterval <= 60
    responder.stop()
    pub.disconnect()
    pub.loop_stop()


def test_a_socket_that_never_sends_connect_is_closed_after_the_connect_timeout(port):
    # MQTT 4.13 / 3.1: the broker need not wait forever for CONNECT.
    silent = raw.Raw(port)
    start = time.monotonic()
    silent.closed(timeout=5)
    assert 0.9 <= time.monotonic() - start <= 2.0


def test_an_oversized_packet_is_refused_before_it_is_read(port):
    # MQTT-3.2.2-15/4.13: a packet beyond the Maximum Packet Size (64 KiB
    # here, advertised in CONNACK) closes its connection with 0x95.
    c = raw.Raw(port)
    c.send(raw.connect("big"))
    first, body = c.expect(2)
    assert b"\x27" + struct.pack("!I", 65536) in body
    # Only the header announcing 100 MB is sent: the broker refuses it from that.
    c.send(bytes([0x30]) + raw.varint(100_000_000))
    assert c.closed()[-1] == (0xE0, b"\x95")


def start_broker(gateway, config_path):
    gw = gateway(config_path, RUST_LOG="info")
    m = gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)")
    return gw, int(m.group(1))


def test_sessions_and_retained_messages_survive_a_broker_restart(gateway, write_config, tmp_path):
    # The "across a broker restart": subscriptions, queued QoS 1
    # messages and retained messages are in data_dir/broker.state.
    config = write_config(BROKER_CONFIG)
    gw, port = start_broker(gateway, config)
    sub = Collector(port, client_id="durable", clean=False, subscribe=[("q/#", 1)])
    sub.stop()
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    pub.publish("r/kept", "retained", qos=1, retain=True).wait_for_publish(5)
    for i in range(3):
        pub.publish(f"q/{i}", f"m{i}", qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    code, _ = gw.stop()
    assert code == 0
    assert (tmp_path / "state" / "broker.state").exists()

    gw, port = start_broker(gateway, config)
    # Two retained: r/kept, and the gateway's own status.
    gw.wait_for(r"broker state restored retained=2 sessions=1")
    back = Collector(port, client_id="durable", clean=False)
    back.wait(3)
    time.sleep(0.3)
    assert [m.payload for m in back.messages] == [b"m0", b"m1", b"m2"]
    late = Collector(port, subscribe=[("r/#", 0), ("fieldmq/gw/status", 0)])
    got = sorted((m.topic, m.payload, m.retain) for m in late.wait(2))
    assert got == [("fieldmq/gw/status", b"online", True), ("r/kept", b"retained", True)]
    back.stop()
    late.stop()


def test_an_unreadable_state_file_is_moved_aside_not_overwritten(gateway, write_config, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "broker.state").write_bytes(b"this is not a snapshot")
    gw, port = start_broker(gateway, write_config(BROKER_CONFIG))
    gw.wait_for(r"ERROR .*unreadable; moved aside")
    aside = list((tmp_path / "state").glob("broker.state.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"this is not a snapshot"


def connected(port, client_id, **kw):
    c = raw.Raw(port)
    c.send(raw.connect(client_id, **kw))
    c.expect(2)
    return c


def test_no_local_and_retain_as_published_options(port):
    # MQTT-3.8.3-3 (no local: not sent back to its publisher) and
    # MQTT-3.3.1-12/-13 (retain as published keeps RETAIN=1 on live messages).
    c = connected(port, "opts")
    no_local, rap = 0b0100, 0b1000
    c.send(raw.subscribe(1, [("nl/t", 0 | no_local), ("rap/t", 0 | rap)]))
    c.expect(9)
    c.send(raw.publish("nl/t", b"mine"))
    c.send(raw.publish("rap/t", b"kept flag", retain=True))
    first, body = c.expect(3)
    topic, payload, _, _, _ = raw.parse_publish(first, body)
    assert (topic, payload, first & 1) == ("rap/t", b"kept flag", 1)
    with pytest.raises((TimeoutError, OSError)):
        c.recv(timeout=0.5)  # nothing from nl/t


def test_retain_handling_controls_retained_messages_on_subscribe(port):
    # MQTT 3.8.3.1: 0 sends retained messages, 1 only for a new
    # subscription, 2 never.
    pub = connected(port, "rh-pub")
    pub.send(raw.publish("rh/t", b"stored", retain=True, qos=1, packet_id=1))
    pub.expect(4)
    c = connected(port, "rh")
    c.send(raw.subscribe(1, [("rh/#", 0b10_0000)]))  # handling 2
    c.expect(9)
    with pytest.raises((TimeoutError, OSError)):
        c.recv(timeout=0.5)
    c.send(raw.subscribe(2, [("rh/+", 0b01_0000)]))  # handling 1, a new subscription
    c.expect(9)
    assert raw.parse_publish(*c.expect(3))[1] == b"stored"
    c.send(raw.subscribe(3, [("rh/+", 0b01_0000)]))  # handling 1, existing: nothing
    c.expect(9)
    with pytest.raises((TimeoutError, OSError)):
        c.recv(timeout=0.5)


def test_a_session_expires_after_its_interval(port):
    # MQTT-3.1.2-23 / 4.1: a v5 session lives for its expiry interval after
    # the connection closes, then is gone (session present 0).
    expiry = [(0x11, struct.pack("!I", 1))]
    c = connected(port, "brief", clean=True, properties=expiry)
    c.close()
    c = raw.Raw(port)
    c.send(raw.connect("brief", clean=False, properties=expiry))
    assert c.expect(2)[1][0] == 1, "within the interval the session is present"
    c.close()
    time.sleep(1.6)
    c = raw.Raw(port)
    c.send(raw.connect("brief", clean=False, properties=expiry))
    assert c.expect(2)[1][0] == 0, "after it, the session is gone"


def test_the_clients_receive_maximum_bounds_what_is_in_flight_to_it(port):
    # MQTT-3.3.4-9: no more unacknowledged QoS 1/2 PUBLISHes than the
    # client's Receive Maximum (2 here); the rest follow as it acknowledges.
    c = connected(port, "slow-reader", properties=[(0x21, struct.pack("!H", 2))])
    c.send(raw.subscribe(1, [("rm2/#", 1)]))
    c.expect(9)
    pub = connected(port, "rm2-pub")
    for i in range(5):
        pub.send(raw.publish(f"rm2/{i}", str(i), qos=1, packet_id=i + 1))
    got = [raw.parse_publish(*c.expect(3)) for _ in range(2)]
    with pytest.raises((TimeoutError, OSError)):
        c.recv(timeout=0.5)
    c.send(raw.ack(0x40, got[0][3]))
    got.append(raw.parse_publish(*c.expect(3)))
    assert [g[1] for g in got] == [b"0", b"1", b"2"]


def test_an_expired_message_is_not_delivered(port):
    # MQTT-3.3.2-5: a retained message past its expiry interval is not sent.
    pub = connected(port, "exp-pub")
    pub.send(raw.publish("exp/t", b"short-lived", retain=True, qos=1, packet_id=1, properties=[(0x02, struct.pack("!I", 1))]))
    pub.expect(4)
    time.sleep(1.5)
    c = connected(port, "exp-sub")
    c.send(raw.subscribe(1, [("exp/#", 1)]))
    c.expect(9)
    with pytest.raises((TimeoutError, OSError)):
        c.recv(timeout=0.5)


def test_a_client_that_stopped_reading_is_taken_over_at_once(port):
    # MQTT-3.1.4-3: a new connection with the same client id takes the
    # session over. The old one here stopped reading while the broker was
    # writing to it (its socket buffers full); the takeover must not wait
    # for the broker's write limit (up to 30 s) to end the old connection.
    stuck = raw.Raw(port)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send(raw.connect("stuck", keep_alive=60))
    stuck.expect(2)
    stuck.send(raw.subscribe(1, [("flood/#", 0)]))
    stuck.expect(9)
    flood = raw.Raw(port)
    flood.send(raw.connect("flooder"))
    flood.expect(2)
    chunk = b"".join(raw.publish(f"flood/{i}", b"x" * 1024) for i in range(500))
    for _ in range(8):  # 4,000 messages of 1 KiB, far past the socket buffers
        flood.send(chunk)
    time.sleep(0.5)
    started = time.monotonic()
    new = raw.Raw(port, timeout=10)
    new.send(raw.connect("stuck", clean=False))
    first, body = new.expect(2, timeout=10)
    took = time.monotonic() - started
    assert body[1] == 0, body
    assert took < 5, f"the takeover waited {took:.1f} s for the stuck connection"
