"""The store-and-forward buffer and the upstream bridge, end to end: the real
gateway, a real mosquitto as the cloud broker (TLS with client certificates
made by openssl), a cloud-side subscriber recording what arrives, and LAN
clients publishing through the gateway's own broker.

The promise under test: a message the gateway acknowledged (or a reading it
took) reaches the cloud, whatever fails in between (the cloud, the link, the
gateway itself), in order, and only a full buffer may drop messages, the way
the config says."""

import json
import re
import signal
import time
from datetime import datetime, timezone

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from upstream_peer import FreezeProxy, LanPublisher, Recorder, Upstream, free_port, make_pki, seq_of, seq_report, wait_log

SEQ = "fieldmq/test/seq"          # where LanPublisher publishes on the LAN
UP_SEQ = "site/" + SEQ            # where it arrives upstream (topic_prefix "site/")
CONNECTED = r"upstream cloud connected"
# An established link that dies may be reported as lost rather than failed.
FAILED = r"upstream cloud: connection (failed|lost)"


# --------------------------------------------------------------------------
# Harness


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def toml_value(v):
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a TOML basic string


def upstream_section(up=None, pki=None, **keys):
    """An [[upstream]] table for `up`; keys set to None are left out."""
    section = {
        "name": "cloud",
        "url": up.url if up else None,
        "ca_file": pki.ca if pki else None,
        "cert_file": pki.client if pki else None,
        "key_file": pki.client_key if pki else None,
        "topic_prefix": "site/",
        "keep_alive": "2s",
        "backoff_min": "100ms",
        "backoff_max": "1s",
    }
    section.update(keys)
    return {k: v for k, v in section.items() if v is not None}


def gateway_toml(*upstreams, buffer=None, host_poll=None) -> str:
    lines = ["[gateway]", 'id = "gw1"', 'data_dir = "data"', "", "[broker]", 'listen = ["127.0.0.1:0"]', ""]
    lines.append("[buffer]")
    for key, value in {"max_size": "256MiB", "when_full": "drop-oldest", "commit_interval": "100ms", **(buffer or {})}.items():
        lines.append(f"{key} = {toml_value(value)}")
    for section in upstreams:
        lines += ["", "[[upstream]]"] + [f"{k} = {toml_value(v)}" for k, v in section.items()]
    if host_poll:
        lines += ["", "[[device]]", 'name = "host"', 'kind = "system"', f'poll = "{host_poll}"']
    return "\n".join(lines) + "\n"


class Peers:
    """Everything one test starts, stopped at its end, with the logs printed
    (pytest shows them when the test fails)."""

    def __init__(self, tmp_path, pki, gateway, write_config, cli):
        self.tmp = tmp_path
        self.pki = pki
        self._gateway = gateway
        self._write_config = write_config
        self._cli = cli
        self.upstreams, self.gateways, self._closers = [], [], []
        self.config = None

    def upstream(self, name="cloud", start=True, **kw) -> Upstream:
        up = Upstream(self.tmp / f"mosquitto-{name}", self.pki, **kw)
        self.upstreams.append(up)
        self._closers.append(up.stop)
        return up.start() if start else up

    def recorder(self, up, topic="site/#", **kw) -> Recorder:
        rec = Recorder(up, topic, **kw)
        self._closers.append(rec.close)
        return rec

    def track(self, close):
        """Registers a close() to call at the end of the test."""
        self._closers.append(close)

    def proxy(self, target_port) -> FreezeProxy:
        p = FreezeProxy(target_port)
        self._closers.append(p.close)
        return p

    def lan(self, port, **kw) -> LanPublisher:
        pub = LanPublisher(port, **kw)
        self._closers.append(pub.close)
        return pub

    def start_gateway(self, text=None, **env):
        """Writes the config (first call) and starts a gateway on it; returns (gateway, LAN port)."""
        if text is not None:
            self.config = self._write_config(text)
        gw = self._gateway(self.config, **({"RUST_LOG": "info"} | env))
        self.gateways.append(gw)
        port = int(gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)").group(1))
        return gw, port

    def stats(self, name="cloud"):
        """`fieldmq buffer stats --json`: (whole object, this upstream's entry)."""
        r = self._cli("buffer", "stats", "--config", self.config, "--json")
        assert r.code == 0, f"buffer stats exited {r.code}:\n{r.err}"
        data = json.loads(r.out)
        entry = next((u for u in data["upstreams"] if u["name"] == name), None)
        assert entry is not None, f"no upstream {name} in {data}"
        return data, entry

    def wait_stats(self, predicate, timeout=10.0, name="cloud"):
        deadline = time.monotonic() + timeout
        while True:
            data, entry = self.stats(name)
            if predicate(entry) or time.monotonic() > deadline:
                return data, entry
            time.sleep(0.2)

    def close(self):
        for close in reversed(self._closers):
            try:
                close()
            except Exception as e:  # keep tearing down the rest
                print(f"teardown: {e!r}")
        for i, gw in enumerate(self.gateways):
            print(f"----- gateway #{i} log (last 80 lines)\n" + "\n".join(gw.lines[-80:]))
        for up in self.upstreams:
            print(f"----- mosquitto {up.dir.name} on {up.port} (last 40 lines)\n{up.log(40)}")


@pytest.fixture
def peers(tmp_path, pki, gateway, write_config, cli):
    p = Peers(tmp_path, pki, gateway, write_config, cli)
    yield p
    p.close()


def arrived(messages, topic=UP_SEQ):
    return {seq_of(m.payload) for m in messages if m.topic == topic}


def wait_delivered(rec, seqs, timeout=15.0, topic=UP_SEQ):
    """Waits until every one of `seqs` reached the Recorder; returns what arrived on `topic`."""
    want = set(seqs)
    got = rec.wait_for(lambda ms: want <= arrived(ms, topic), timeout)
    return [m for m in got if m.topic == topic]


def assert_all_in_order(got, published, topic=UP_SEQ):
    """Nothing published is missing and, duplicates aside, the order is the
    publishing order. Returns the number of duplicates (QoS 1 allows them)."""
    order, dups = seq_report(got, topic)
    missing = sorted(set(published) - set(order))
    assert not missing, f"{len(missing)} of {len(published)} never reached the cloud: {missing[:20]}..."
    assert order == sorted(order), f"out of order: {order}"
    return dups


def parse_ts(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def retained(up, topic, timeout=2.0):
    """The retained message a newly arriving cloud client gets on `topic` (payload or None)."""
    got = []
    c = up.client()
    c.on_message = lambda client, userdata, msg: got.append((msg.payload.decode(), msg.retain))
    c.subscribe(topic, qos=1)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()
    if got:
        assert got[0][1], f"{topic} came without the retain flag"
        return got[0][0]
    return None


# --------------------------------------------------------------------------
# Outages


def test_a_cloud_outage_loses_no_message_and_no_reading(peers, pki, record_property):
    """Scenario: the cloud broker goes away for 4 s and comes back on the same
    address while a LAN client publishes 20 messages/s and the host is polled
    every 200 ms. Every acknowledged message and every reading reaches the
    cloud, in order; duplicates (allowed by QoS 1) are counted."""
    up = peers.upstream()
    rec = peers.recorder(up)
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki), host_poll="200ms"))
    gw.wait_for(CONNECTED)
    lan = peers.lan(port)
    lan.start(rate=20)
    time.sleep(1.0)

    mark = len(gw.lines)
    up.stop()
    down_at, down_wall = time.monotonic(), time.time()
    wait_log(gw, FAILED, timeout=5, after=mark)
    time.sleep(max(0.0, 4.0 - (time.monotonic() - down_at)))
    mark = len(gw.lines)
    up.start()
    up_wall = time.time()
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    time.sleep(1.0)
    published = lan.stop()

    assert lan.wait_acked(timeout=5), f"the gateway did not acknowledge {lan.unacked()[:20]} (it must accept while the cloud is down)"
    got = wait_delivered(rec, published)
    dups = assert_all_in_order(got, published)
    record_property("duplicates", dups)
    print(f"{len(published)} published, {dups} duplicates upstream")

    # Readings: none lost across the outage (no gap much over the 200 ms
    # poll period), in order, and those taken while the cloud was down came
    # afterwards.
    readings = rec.wait_for(lambda ms: any(parse_ts(json.loads(m.payload)["ts"]) > up_wall + 0.5 for m in ms),
                            timeout=5, topic="site/fieldmq/gw1/host")
    stamps = []
    for m in readings:
        ts = parse_ts(json.loads(m.payload)["ts"])
        if ts not in stamps:
            stamps.append(ts)
    assert stamps == sorted(stamps), "readings arrived out of order"
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < 2.0, f"readings missing: a gap of {max(gaps):.1f}s"
    assert any(down_wall < ts < up_wall for ts in stamps), "no reading from the outage arrived"


def test_a_half_open_link_is_noticed_within_keep_alive_and_loses_nothing(peers, pki):
    """Scenario: the link goes dark without closing (a mobile link dropping
    out, a NAT forgetting the flow): no FIN, no RST, just silence, for 4 s
    while messages keep coming. With keep_alive 1s the gateway notices
    within 1.5 x keep_alive (plus scheduling slack), reconnects once the
    link is back, and nothing published meanwhile is lost."""
    up = peers.upstream()
    rec = peers.recorder(up)
    link = peers.proxy(up.port)
    section = upstream_section(up, pki, url=f"mqtts://127.0.0.1:{link.port}", keep_alive="1s")
    gw, port = peers.start_gateway(gateway_toml(section))
    gw.wait_for(CONNECTED)
    lan = peers.lan(port)
    lan.start(rate=20)
    time.sleep(0.5)

    mark = len(gw.lines)
    link.freeze()
    frozen_at = time.monotonic()
    wait_log(gw, FAILED, timeout=6, after=mark)
    noticed = time.monotonic() - frozen_at
    assert noticed <= 1.5 * 1.0 + 1.0, f"the dead link was noticed only after {noticed:.1f}s"
    time.sleep(max(0.0, 4.0 - (time.monotonic() - frozen_at)))

    mark = len(gw.lines)
    link.drop_all()
    link.thaw()
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    time.sleep(1.0)
    published = lan.stop()
    assert lan.wait_acked(timeout=5)
    dups = assert_all_in_order(wait_delivered(rec, published), published)
    print(f"noticed after {noticed:.2f}s; {len(published)} published, {dups} duplicates")


def test_a_backlog_survives_a_gateway_crash_during_the_outage(peers, pki):
    """Scenario: the cloud is down, 2000 messages pile up in the buffer
    (every one acknowledged to its LAN publisher), then the gateway is
    killed (SIGKILL: power cut, OOM killer). When the cloud is back and the
    gateway restarts on the same data_dir, all 2000 arrive, in order."""
    up = peers.upstream()
    rec = peers.recorder(up)
    up.stop()
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    wait_log(gw, FAILED, timeout=5)
    lan = peers.lan(port)
    published = lan.publish(2000, wait=False)
    assert lan.wait_acked(timeout=20), f"{len(lan.unacked())} of 2000 not acknowledged"
    gw.kill()
    assert gw.proc.returncode == -signal.SIGKILL

    up.start()
    gw, _ = peers.start_gateway()
    gw.wait_for(CONNECTED, timeout=10)
    dups = assert_all_in_order(wait_delivered(rec, published, timeout=20), published)
    print(f"{dups} duplicates")


def test_a_lan_message_survives_a_crash_right_after_its_puback(peers, pki):
    """Scenario: a LAN client publishes one QoS 1 message while the cloud is
    down; the gateway is SIGKILLed within a millisecond of sending the
    PUBACK. The PUBACK was a promise: after the restart the message reaches
    the cloud."""
    up = peers.upstream()
    rec = peers.recorder(up)
    up.stop()
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    wait_log(gw, FAILED, timeout=5)
    lan = peers.lan(port)
    lan.kill_on_ack(1, gw.proc.pid)
    lan.publish(1, wait=False)
    assert gw.proc.wait(timeout=10) == -signal.SIGKILL, "the message was never acknowledged"
    assert lan.acked() == [0]
    lan.close()

    up.start()
    gw, _ = peers.start_gateway()
    gw.wait_for(CONNECTED, timeout=10)
    got = wait_delivered(rec, [0], timeout=10)
    assert [m.payload for m in got][:1] == [b"0"]


def test_every_acknowledged_message_of_a_stream_survives_a_crash_mid_stream(peers, pki):
    """Scenario: a LAN client streams 600 QoS 1 messages at 1000/s and the
    gateway is SIGKILLed as the 300th PUBACK arrives, with messages in every
    state (received, being committed, acknowledged). Every message that was
    acknowledged reaches the cloud after the restart; unacknowledged ones
    may or may not (the client would resend them)."""
    up = peers.upstream()
    rec = peers.recorder(up)
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    gw.wait_for(CONNECTED)
    lan = peers.lan(port)
    lan.kill_on_ack(300, gw.proc.pid)
    lan.publish(600, rate=1000, wait=False)
    assert gw.proc.wait(timeout=10) == -signal.SIGKILL, f"only {len(lan.acked())} acknowledged"
    time.sleep(0.2)
    acked = lan.acked()
    lan.close()

    gw, _ = peers.start_gateway()
    gw.wait_for(CONNECTED, timeout=10)
    got = wait_delivered(rec, acked, timeout=10)
    order, dups = seq_report(got, UP_SEQ)
    missing = sorted(set(acked) - set(order))
    assert not missing, f"acknowledged but lost: {missing}"
    assert order == sorted(order)
    print(f"{len(acked)} acknowledged before the crash, {len(order)} arrived, {dups} duplicates")


# --------------------------------------------------------------------------
# A full buffer


def test_a_full_buffer_drops_the_oldest_and_keeps_a_contiguous_newest_tail(peers, pki):
    """Scenario: a long outage fills a 256 KiB buffer with 1000 messages of
    2 KiB (2 MB). With when_full = "drop-oldest" every message is still
    accepted, the disk use stays near the bound, the drops are logged and
    counted, and when the cloud returns it receives the newest messages:
    an unbroken run ending at the last one published."""
    up = peers.upstream()
    rec = peers.recorder(up)
    up.stop()
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki), buffer={"max_size": "256KiB", "when_full": "drop-oldest"}))
    wait_log(gw, FAILED, timeout=5)
    lan = peers.lan(port, size=2048)
    lan.publish(1000, wait=False)
    assert lan.wait_acked(timeout=20), f"drop-oldest must accept every new message; unacknowledged: {lan.unacked()[:20]}"

    line = wait_log(gw, r"dropped\D*\d+|\d+\D*dropped", timeout=5).string
    _, entry = peers.stats()
    bound = 256 * 1024
    assert entry["dropped"] > 0, entry
    assert entry["waiting"] * 2048 <= bound, f"{entry['waiting']} messages of 2 KiB kept in a 256 KiB buffer"
    on_disk = sum(f.stat().st_size for f in (peers.tmp / "data").glob("buffer.db*"))
    assert on_disk <= 4 * bound, f"buffer files take {on_disk} bytes for a {bound} byte bound"
    waiting = entry["waiting"]
    print(f"log: {line}\nstats: {entry}, {on_disk} bytes on disk")

    up.start()
    wait_delivered(rec, [999], timeout=15)
    peers.wait_stats(lambda e: e["waiting"] == 0, timeout=10)
    time.sleep(0.5)
    order, dups = seq_report(rec.messages(), UP_SEQ)
    first = min(order)
    assert first > 0, "nothing was dropped?"
    assert sorted(order) == list(range(first, 1000)), f"not a contiguous tail: {sorted(set(range(first, 1000)) - set(order))[:20]} missing"
    assert order == sorted(order)
    # What arrived is what the buffer held (a status row may be among them).
    assert abs(len(order) - waiting) <= 2, (len(order), waiting)
    assert first <= entry["dropped"] <= first + 2, (first, entry)


def test_a_full_buffer_with_reject_new_keeps_the_oldest(peers, pki):
    """Scenario: the same outage with when_full = "reject-new": the buffer
    keeps what it already has and refuses newer messages, and says so in
    the log and in `buffer stats`. When the cloud returns it receives an
    unbroken run starting at the first message; the newest never arrive."""
    up = peers.upstream()
    rec = peers.recorder(up)
    up.stop()
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki), buffer={"max_size": "256KiB", "when_full": "reject-new"}))
    wait_log(gw, FAILED, timeout=5)
    lan = peers.lan(port, size=2048)
    lan.publish(1000, wait=False)
    # Whether a refused message is PUBACKed (the local broker did take it)
    # is not what this test is about: wait for answers to stop coming.
    lan.wait_settled(quiet=1.0, timeout=15)
    # Not the connection failures: "Connection refused" is in those.
    wait_log(gw, r"^(?!.*upstream \w+: connection).*(reject|refus|dropped)", timeout=5)
    _, entry = peers.stats()
    waiting = entry["waiting"]
    assert 0 < waiting * 2048 <= 256 * 1024, entry
    assert entry["dropped"] > 0, f"refused messages are not counted: {entry}"
    print(f"acked {len(lan.acked())}, refused {len(lan.refused())}, unanswered {len(lan.unacked())}; stats {entry}")

    up.start()
    peers.wait_stats(lambda e: e["waiting"] == 0, timeout=15)
    time.sleep(0.5)
    order, _ = seq_report(rec.messages(), UP_SEQ)
    assert order, "nothing arrived"
    last = max(order)
    assert sorted(order) == list(range(0, last + 1)), f"not an unbroken run from 0: {sorted(set(range(last + 1)) - set(order))[:20]} missing"
    assert order == sorted(order)
    assert last < 999, "the newest message should have been refused"
    assert abs(len(order) - waiting) <= 2, (len(order), waiting)


# --------------------------------------------------------------------------
# Several upstreams


@pytest.mark.parametrize("dead", ["refused", "black-holed"])
def test_a_dead_upstream_does_not_delay_a_live_one(peers, pki, dead):
    """Scenario: two clouds, one unreachable (its port refuses connections,
    or silently swallows them). The live cloud still gets each message
    within a second of its publishing, while the dead one's share waits in
    the buffer."""
    up = peers.upstream()
    rec = peers.recorder(up)
    if dead == "refused":
        dead_url = f"mqtts://127.0.0.1:{free_port()}"
    else:
        hole = peers.proxy(free_port())
        hole.freeze()
        dead_url = f"mqtts://127.0.0.1:{hole.port}"
    gw, port = peers.start_gateway(gateway_toml(
        upstream_section(up, pki),
        upstream_section(None, pki, name="dead", url=dead_url, topic_prefix="other/"),
    ))
    gw.wait_for(CONNECTED)
    if dead == "refused":
        wait_log(gw, r"upstream dead: connection failed", timeout=5)
    lan = peers.lan(port)
    published = lan.publish(25, rate=5, wait=False)
    sent_at = lan.sent_at()
    got = wait_delivered(rec, published, timeout=5)
    first = {}
    for m in got:
        first.setdefault(seq_of(m.payload), m.at)
    latency = {seq: first[seq] - sent_at[seq] for seq in published}
    worst = max(latency, key=latency.get)
    assert latency[worst] < 1.0, f"message {worst} took {latency[worst]:.2f}s to reach the live cloud"
    _, dead_entry = peers.stats("dead")
    assert dead_entry["waiting"] >= 25, dead_entry
    assert dead_entry["last_delivery"] is None, dead_entry
    print(f"worst latency {latency[worst] * 1000:.0f} ms")


# --------------------------------------------------------------------------
# TLS problems


TLS_CASES = {
    # case: (how the upstream starts, what the log must say, how it is fixed)
    "wrong-ca": ({"server": "other_ca"}, r"UnknownIssuer|unknown ?issuer", {"server": "normal"}),
    "wrong-host": ({"server": "wrong_host"}, r"NotValidForName|not ?valid ?for ?name", {"server": "normal"}),
    "no-client-cert": ({}, r"alert|CertificateRequired|certificate ?required|handshake|reset", {"require_cert": False}),
}


@pytest.mark.parametrize("case", TLS_CASES)
def test_a_tls_problem_is_logged_once_with_its_reason_and_loses_nothing(peers, pki, case):
    """Scenario: the cloud presents a certificate from an unknown CA, or one
    for another host name, or demands a client certificate the gateway was
    not given. The log says why, once (not once per retry), and messages
    published meanwhile are all delivered once the cloud side is fixed."""
    broken, reason, fix = TLS_CASES[case]
    up = peers.upstream()
    rec = peers.recorder(up)
    up.restart(**broken)
    keys = {"cert_file": None, "key_file": None} if case == "no-client-cert" else {}
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki, **keys)))
    line = wait_log(gw, FAILED + ".*(" + reason + ")", timeout=5).string
    lan = peers.lan(port)
    published = lan.publish(20, rate=20)
    assert lan.wait_acked(timeout=5)
    time.sleep(2.0)  # with backoff_max 1s, at least two more attempts
    assert gw.count(re.compile(FAILED, re.I)) == 1, "the same failure is logged on every retry"
    assert gw.count(CONNECTED) == 0

    mark = len(gw.lines)
    up.restart(**fix)
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    assert_all_in_order(wait_delivered(rec, published), published)
    print(f"logged: {line}")


# --------------------------------------------------------------------------
# Stopping, status, stats


def test_a_clean_restart_sends_nothing_twice(peers, pki):
    """Scenario: the operator restarts the service (SIGTERM, then start)
    after 50 messages were delivered. The cloud receives each exactly once:
    acknowledged rows are gone from the buffer, not resent. The upstream is
    addressed as `localhost`, as a person would write it."""
    up = peers.upstream()
    rec = peers.recorder(up)
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki, url=f"mqtts://localhost:{up.port}")))
    gw.wait_for(CONNECTED)
    lan = peers.lan(port)
    published = lan.publish(50, wait=False)
    assert lan.wait_acked(timeout=10)
    wait_delivered(rec, published)
    lan.close()
    code, elapsed = gw.stop(signal.SIGTERM)
    assert code == 0 and elapsed < 5.0, (code, elapsed)

    gw, _ = peers.start_gateway()
    gw.wait_for(CONNECTED, timeout=10)
    time.sleep(2.0)
    order, dups = seq_report(rec.messages(), UP_SEQ)
    assert sorted(order) == published
    assert dups == 0, f"{dups} messages were delivered again after a clean restart"


def test_the_cloud_sees_the_gateway_online_and_offline(peers, pki):
    """Scenario: a cloud dashboard reads the retained
    site/fieldmq/gw1/status: `online` while the gateway is connected,
    `offline` after it stops (SIGTERM) and `offline` when it dies (SIGKILL,
    through its will)."""
    up = peers.upstream()
    status = "site/fieldmq/gw1/status"
    gw, _ = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    gw.wait_for(CONNECTED)
    deadline = time.monotonic() + 3
    while retained(up, status, timeout=0.5) != "online" and time.monotonic() < deadline:
        pass
    assert retained(up, status) == "online"
    assert gw.stop(signal.SIGTERM)[0] == 0
    assert retained(up, status) == "offline", "a clean stop leaves the gateway `online` in the cloud"

    gw, _ = peers.start_gateway()
    gw.wait_for(CONNECTED)
    time.sleep(0.5)
    assert retained(up, status) == "online"
    gw.kill()
    time.sleep(0.5)
    assert retained(up, status) == "offline", "no will: a dead gateway stays `online` in the cloud"
    # The broker saw the documented default client id.
    assert re.search(r"as fieldmq-gw1-cloud \(p2,", up.log(200)), "client id is not fieldmq-gw1-cloud (or not MQTT 3.1.1)"


def test_buffer_stats_show_the_backlog_grow_and_drain(peers, pki, cli):
    """Scenario: an operator runs `fieldmq buffer stats` on a running
    gateway during an outage: the waiting count is what was published
    since, the oldest age grows, and after the cloud is back the count
    falls to 0 and the last delivery is recent. Without --json it prints a
    table a person can read."""
    up = peers.upstream()
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    gw.wait_for(CONNECTED)
    lan = peers.lan(port)
    lan.publish(10)
    _, entry = peers.wait_stats(lambda e: e["waiting"] == 0 and e["last_delivery"])
    assert entry["waiting"] == 0 and entry["last_delivery"], entry
    parse_ts_loose(entry["last_delivery"])

    up.stop()
    wait_log(gw, FAILED, timeout=5)
    lan.publish(100)
    time.sleep(1.0)
    data, entry = peers.stats()
    assert 100 <= entry["waiting"] <= 102, entry  # a status row may be waiting too
    assert entry["oldest_age_s"] is not None and entry["oldest_age_s"] >= 0.9, entry
    assert entry["dropped"] == 0, entry
    assert isinstance(data["bytes"], int) and data["bytes"] > 0, data

    human = cli("buffer", "stats", "--config", peers.config)
    assert human.code == 0, human.err
    assert "cloud" in human.out and re.search(r"\b10[0-2]\b", human.out), human.out

    started = time.time()
    up.start()
    _, entry = peers.wait_stats(lambda e: e["waiting"] == 0, timeout=10)
    assert entry["waiting"] == 0 and entry["oldest_age_s"] is None, entry
    assert parse_ts_loose(entry["last_delivery"]) >= started - 1, entry


def parse_ts_loose(text):
    """RFC 3339 with any fraction and offset."""
    text = re.sub(r"Z$", "+00:00", text)
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    return datetime.fromisoformat(text).timestamp()


def test_check_refuses_missing_certificate_files_with_their_place(cli, write_config, pki, tmp_path):
    """Scenario: a person mistypes the CA path and points cert_file at a
    folder. `fieldmq check` names both, each with file:line:col, and exits
    2; relative paths are read from the config file's folder, wherever the
    gateway is started from."""
    text = (
        "[gateway]\n"
        'id = "gw1"\n'
        'data_dir = "data"\n'
        "\n"
        "[[upstream]]\n"
        'name = "cloud"\n'
        'url = "mqtts://127.0.0.1:8883"\n'
        'ca_file = "missing-ca.pem"\n'
        'cert_file = "certs"\n'
        f"key_file = {json.dumps(str(pki.client_key))}\n"
    )
    (tmp_path / "certs").mkdir()
    path = write_config(text)
    r = cli("check", "--config", path)
    assert r.code == 2, r.out + r.err
    errors = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, r.err
    assert errors[0].startswith(f"error: {path}:8:11: ") and "missing-ca.pem" in errors[0], errors[0]
    assert errors[1].startswith(f"error: {path}:9:13: ") and "certs" in errors[1], errors[1]

    # The same files, named relative to a config kept elsewhere: accepted.
    etc = tmp_path / "etc"
    etc.mkdir()
    for src, name in ((pki.ca, "ca.pem"), (pki.client, "client.pem"), (pki.client_key, "client.key")):
        (etc / name).write_bytes(src.read_bytes())
    good = etc / "fieldmq.toml"
    good.write_text(text.replace('"missing-ca.pem"', '"ca.pem"').replace('"certs"', '"client.pem"')
                    .replace(json.dumps(str(pki.client_key)), '"client.key"'))
    r = cli("check", "--config", good)
    assert r.code == 0, r.err


# --------------------------------------------------------------------------
# Commands from the cloud, MQTT 5


class LocalSubscriber:
    """A LAN client on the gateway's broker, recording (topic, payload)."""

    def __init__(self, port, topic):
        self.got = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_message = lambda c, u, msg: self.got.append((msg.topic, msg.payload.decode()))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        time.sleep(0.2)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def send_command_until_it_arrives(commander, local, topic, label, timeout=10.0):
    """Publishes `label-1`, `label-2`... upstream every 0.3 s until one
    arrives locally (the gateway subscribes some time after connecting);
    returns how many were published."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        commander.publish(topic, f"{label}-{n}", qos=1).wait_for_publish(5)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            if any(p.startswith(label) for _, p in local.got):
                return n
            time.sleep(0.02)
    raise AssertionError(f"no {label} command arrived on the LAN within {timeout}s; got {local.got}")


def test_commands_from_the_cloud_arrive_on_the_lan_and_do_not_loop_back(peers, pki):
    """Scenario: the cloud publishes a command on site/fieldmq/gw1/x/cmd;
    the gateway's `subscribe` filter brings it down, prefix stripped, to
    fieldmq/gw1/x/cmd on the LAN broker. That local topic also matches
    `forward`, yet it is not sent back up (no loop). After the cloud broker
    restarts and forgets every session, the gateway subscribes again."""
    up = peers.upstream(persistent=False)
    rec = peers.recorder(up)
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki, subscribe=["site/fieldmq/gw1/+/cmd"])))
    gw.wait_for(CONNECTED)
    local = LocalSubscriber(port, "fieldmq/#")
    peers.track(local.close)
    commander = up.client("commander")
    upstream_topic = "site/fieldmq/gw1/x/cmd"

    sent = send_command_until_it_arrives(commander, local, upstream_topic, "first")
    time.sleep(1.0)
    assert ("fieldmq/gw1/x/cmd", f"first-{sent}") in local.got, local.got
    assert not any(t == upstream_topic for t, _ in local.got), "the prefix was not stripped"
    looped = len(rec.messages(upstream_topic)) - sent
    assert looped == 0, f"{looped} commands came back up from the gateway"

    commander.disconnect()
    commander.loop_stop()
    mark, subscriptions = len(gw.lines), rec.subscriptions
    up.restart()
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    rec.wait_subscribed(subscriptions + 1)
    commander = up.client("commander")
    again = send_command_until_it_arrives(commander, local, upstream_topic, "second")
    time.sleep(1.0)
    looped = len([m for m in rec.messages(upstream_topic) if m.payload.startswith(b"second")]) - again
    assert looped == 0, f"{looped} commands came back up after the restart"
    commander.disconnect()
    commander.loop_stop()


def test_an_mqtt5_upstream_reached_with_an_rsa_key_gets_bursts_and_backlogs(peers, pki):
    """Scenario: a cloud broker spoken to in MQTT 5 (it announces a Receive
    Maximum of 20 in flight), reached with an RSA client key in PKCS#1 PEM
    as cloud consoles hand them out. A burst of 500 arrives whole and in
    order, and so does a backlog built up while the broker was down.
    (mosquitto 2.0.11 does not enforce its Receive Maximum, so this cannot
    prove the gateway honours it; the bridge's unit tests must.)"""
    up = peers.upstream()
    rec = peers.recorder(up)
    section = upstream_section(up, pki, protocol=5, cert_file=pki.client_rsa, key_file=pki.client_rsa_key)
    gw, port = peers.start_gateway(gateway_toml(section))
    gw.wait_for(CONNECTED)
    assert re.search(r"as fieldmq-gw1-cloud \(p5,", up.log(200)), "the gateway did not connect with MQTT 5"
    lan = peers.lan(port)
    burst = lan.publish(500, wait=False)
    assert lan.wait_acked(timeout=10)
    assert_all_in_order(wait_delivered(rec, burst), burst)

    mark = len(gw.lines)
    up.stop()
    wait_log(gw, FAILED, timeout=5, after=mark)
    backlog = lan.publish(200, wait=False)
    assert lan.wait_acked(timeout=10)
    mark = len(gw.lines)
    up.start()
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    assert_all_in_order(wait_delivered(rec, burst + backlog), burst + backlog)


# --------------------------------------------------------------------------
# Refusals and reloads


def test_a_connack_refusal_is_logged_with_its_reason_and_loses_nothing(peers, pki):
    """Scenario: the cloud broker refuses the gateway's credentials (CONNACK
    5, not authorized: here a broker that stopped accepting the client
    certificate as an identity). The log says CONNACK refused and why, once;
    messages published meanwhile are delivered once the cloud accepts the
    gateway again."""
    up = peers.upstream()
    rec = peers.recorder(up)
    up.restart(require_cert=False, allow_anonymous=False)
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    line = wait_log(gw, FAILED + r".*CONNACK refused: 0x05 \(not authorized\)", timeout=5).string
    lan = peers.lan(port)
    published = lan.publish(20, rate=40)
    assert lan.wait_acked(timeout=5)
    time.sleep(1.5)
    assert gw.count(re.compile(FAILED, re.I)) == 1, "the same refusal is logged on every retry"

    mark = len(gw.lines)
    up.restart(require_cert=True)
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    assert_all_in_order(wait_delivered(rec, published), published)
    print(f"logged: {line}")


def test_a_reload_that_fixes_the_upstream_keeps_the_backlog(peers, pki):
    """Scenario: the operator misspelt the cloud's port, messages piled up
    in the buffer; they fix /etc/fieldmq/fieldmq.toml and run `systemctl
    reload` (SIGHUP). The bridge restarts with the new address and every
    buffered message arrives, in order; nothing is lost by the reload."""
    up = peers.upstream()
    rec = peers.recorder(up)
    wrong = upstream_section(up, pki, url=f"mqtts://127.0.0.1:{free_port()}")
    gw, port = peers.start_gateway(gateway_toml(wrong))
    wait_log(gw, FAILED, timeout=5)
    lan = peers.lan(port)
    before = lan.publish(30, rate=100)
    assert lan.wait_acked(timeout=5)
    _, entry = peers.wait_stats(lambda e: e["waiting"] >= 30)
    assert entry["waiting"] >= 30, entry

    peers.config.write_text(gateway_toml(upstream_section(up, pki)))
    mark = len(gw.lines)
    gw.send(signal.SIGHUP)
    gw.wait_for(CONNECTED, timeout=10, after=mark)
    after = lan.publish(10, rate=100)
    assert lan.wait_acked(timeout=5)
    assert_all_in_order(wait_delivered(rec, before + after), before + after)


def test_publishes_acknowledged_right_after_start_are_buffered(peers, pki):
    """Scenario: the gateway restarts and LAN devices reconnect at once,
    publishing before it finished starting. Every QoS 1 message the broker
    acknowledged is buffered and reaches the cloud (the buffer is attached
    before the listener accepts anyone)."""
    up = peers.upstream()
    rec = peers.recorder(up)
    gw, port = peers.start_gateway(gateway_toml(upstream_section(up, pki)))
    lan = peers.lan(port)
    published = lan.publish(500, wait=False)
    assert lan.wait_acked(timeout=10)
    assert_all_in_order(wait_delivered(rec, published), published)


def test_a_full_filesystem_is_handled_like_a_full_buffer(peers, pki, fieldmq_bin, tmp_path):
    """Scenario: the SD card fills up (ENOSPC) during an outage, long before
    max_size. The gateway does not crash: drop-oldest makes room, says so in
    the log, and when the cloud returns it gets the newest messages, an
    unbroken run ending at the last one published. (The data directory is a
    600 KiB tmpfs in the gateway's own mount namespace: needs root.)"""
    import os
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs in a private mount namespace: run it as root")
    data = tmp_path / "data"
    data.mkdir()
    wrapper = tmp_path / "fieldmq-on-small-disk"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec unshare --mount --propagation private -- sh -c "
        "'mount -t tmpfs -o size=600k tmpfs \"$1\" || exit 97; shift; exec \"$@\"' "
        f"sh {data} {fieldmq_bin} \"$@\"\n"
    )
    wrapper.chmod(0o755)
    up = peers.upstream()
    rec = peers.recorder(up)
    up.stop()
    config = peers._write_config(gateway_toml(upstream_section(up, pki), buffer={"max_size": "256MiB"}))
    peers.config = config
    from conftest import Gateway, clean_env
    gw = Gateway(str(wrapper), config, tmp_path, clean_env(RUST_LOG="info"))
    peers.gateways.append(gw)
    peers.track(gw.kill)
    port = int(gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)").group(1))
    lan = peers.lan(port, size=2048)
    published = lan.publish(1500, wait=False)
    assert lan.wait_acked(timeout=30), f"unacknowledged: {lan.unacked()[:10]}"
    wait_log(gw, r"buffer full", timeout=10)
    assert gw.proc.poll() is None, "the gateway died on a full disk"

    up.start()
    wait_delivered(rec, [published[-1]], timeout=20)
    time.sleep(1.0)
    order, _ = seq_report(rec.messages(), UP_SEQ)
    first = min(order)
    assert first > 0, "a 600 KiB disk cannot hold 3 MB: something must have been dropped"
    assert sorted(order) == list(range(first, published[-1] + 1)), "not a contiguous newest tail"
    print(f"kept {len(order)} of {len(published)}; first kept {first}")
