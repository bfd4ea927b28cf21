"""The body of bench/store-forward (run that; it builds, pins and checks first).

fieldmq's store-and-forward path against mosquitto's own bridge, same
machine, same run:

1. ingest: target/release/buffer-ingest (in-process: durable readings/s at
   commit_interval 100 ms against a bare batched SQLite insert);
2. drain rate: a backlog of 50,000 QoS 1 messages built while the upstream
   is down, then the upstream comes up and the backlog goes to it over TLS
   (QoS 1, client certificates): fieldmq at several max_inflight, and a
   local mosquitto with persistence bridged to the same kind of upstream;
3. a backlog of 100,000, once each: mosquitto's bridge (2.0.11's is said to
   stall past 65,535 waiting messages; given up after STALL_LIMIT seconds)
   and fieldmq;
4. fieldmq with a 1,000,000 backlog drained while new readings keep flowing
   at LIVE_RATE/s: time until it has caught up, and whether every new
   reading arrived;
5. SIGKILL of the gateway (and of the local mosquitto) half-way through
   draining 50,000 numbered, acknowledged messages: which acknowledged
   messages the upstream never gets.

The upstream mosquitto is pinned to core 1, alone. fieldmq, the local
mosquitto, the load generators and this script are on core 0 (the bash
wrapper pins this process; every child inherits it).

How a drain is timed. $SYS counters come once a second, too coarse for a
backlog that drains in under a second, and a counting subscriber would
double the upstream's work. So this script samples the upstream process
every 3 ms: /proc/PID/io `rchar` (mosquitto reads its sockets with
read(2), so this is the bytes it received) and /proc/PID/stat CPU ticks.
The sender is held with SIGSTOP while the upstream starts and this script
connects to it, so the upstream's byte count is known before the sender can
reach it. The drain starts at the last sample before the upstream has read
more than the sender's handshake, and ends at the first sample where it has
read everything ($SYS confirms the message count); the reconnect delay of
either bridge is not in it. CPU% is over exactly that window, for the
upstream and for the sender.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release"
MOSQUITTO = "/usr/sbin/mosquitto"
GW_CORE, UP_CORE = "0", "1"
HZ = os.sysconf("SC_CLK_TCK")

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
BACKLOG = 50_000  # below mosquitto's 65,535
INFLIGHTS = (256, 1024, 4096)  # fieldmq max_inflight tried (256 is the default)
MAIN_INFLIGHT = 1024  # used for the 1M backlog and the SIGKILL test
MOSQ_INFLIGHTS = (20, 0)  # mosquitto max_inflight_messages: its default, and unlimited
STALL_BACKLOG = 100_000
STALL_LIMIT = 60.0
BIG_BACKLOG = 1_000_000
LIVE_RATE = 1_000
KILL_BACKLOG = 50_000
# Messages the loadgen sends: topic bench/in/N, 64-byte payload. The numbered
# messages of the SIGKILL test have the same sizes (bench/sq/0, 64 bytes).
PAYLOAD = 64

PROCS = []  # every process this script started: stopped by PID at the end


# --------------------------------------------------------------------------
# processes


def _die_with_parent():
    # PR_SET_PDEATHSIG: even if this script is SIGKILLed, its peers go too.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def spawn(cmd, log, core=None):
    full = (["taskset", "-c", core] if core else []) + [str(c) for c in cmd]
    with open(log, "ab") as f:
        p = subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    PROCS.append(p)
    return p


def stop(p, timeout=10.0):
    if p is not None and p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)  # in case it is held
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def kill9(p):
    if p is not None and p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.kill()
            p.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ticks(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def rchar(pid):
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def core_busy():
    """Busy ticks (all but idle and iowait) per core, from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *v = line.split()
            v = [int(x) for x in v]
            busy[name[3:]] = sum(v) - v[3] - v[4]
    return busy


def tail(path, n=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Failed(Exception):
    pass


# --------------------------------------------------------------------------
# PKI: the end-to-end tests' own (X.509 v3 with SAN and EKUs, which rustls needs)

sys.path.insert(0, str(ROOT / "tests"))
from upstream_peer import make_pki  # noqa: E402


class Pki:
    """make_pki's files under the names this script uses."""

    def __init__(self, d):
        made = make_pki(d)
        self.dir = made.dir
        self.ca, self.cert, self.key = made.ca, made.client, made.client_key
        self.server_cert, self.server_key = made.server, made.server_key


# --------------------------------------------------------------------------
# peers


def mosquitto_base():
    lines = [
        "per_listener_settings false",
        "log_dest stderr",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "connection_messages true",
        "sys_interval 1",
        # No cap on queued messages: with the default (1000) mosquitto drops
        # QoS 1 messages of a backlog, and a comparison where one side
        # drops says nothing.
        "max_queued_messages 0",
        "max_queued_bytes 0",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    return lines


class Mosquitto:
    """A mosquitto from a config written here, started and stopped by PID."""

    def __init__(self, d, lines, core, port):
        self.dir, self.lines, self.core, self.port = Path(d), lines, core, port
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "mosquitto.log"
        self.proc = None

    def launch(self):
        """Starts the process (its PID is known at once); wait_running() follows."""
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(self.lines) + "\n")
        self.mark = self.log.stat().st_size if self.log.exists() else 0
        self.proc = spawn([MOSQUITTO, "-c", conf], self.log, self.core)
        return self

    def wait_running(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(self.mark)
                if b" running" in f.read():
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.002)
        raise Failed(f"mosquitto did not start on port {self.port}:\n{tail(self.log)}")

    def start(self):
        return self.launch().wait_running()

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        stop(self.proc)

    def kill(self):
        kill9(self.proc)


def upstream(work, pki, persistent=False):
    """The cloud broker: TLS, client certificates required, core 1."""
    d = Path(tempfile.mkdtemp(prefix="upstream-", dir=work))
    port = free_port()
    lines = mosquitto_base()
    if persistent:
        # Sessions survive the stop/start that makes the outage.
        lines += ["persistence true", f"persistence_location {d}/"]
    else:
        lines.append("persistence false")
    lines += [
        f"listener {port} 127.0.0.1",
        f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
        "require_certificate true", "use_identity_as_username true", "allow_anonymous false",
    ]
    return Mosquitto(d, lines, UP_CORE, port)


def local_bridge(work, pki, up_port, inflight):
    """A local mosquitto with persistence, bridged to the upstream, core 0."""
    d = Path(tempfile.mkdtemp(prefix="bridge-", dir=work))
    port = free_port()
    lines = mosquitto_base() + [
        "persistence true", f"persistence_location {d}/",  # autosave_interval: its default (1800 s)
        f"max_inflight_messages {inflight}",
        f"listener {port} 127.0.0.1", "allow_anonymous true",
        "connection cloud",
        f"address 127.0.0.1:{up_port}",
        "bridge_protocol_version mqttv311",
        "cleansession false",
        "clientid bench-bridge",
        "notifications false",
        "restart_timeout 1",
        f"bridge_cafile {pki.ca}", f"bridge_certfile {pki.cert}", f"bridge_keyfile {pki.key}",
        'topic bench/# out 1 "" site/',
        'topic fieldmq/# out 1 "" site/',
    ]
    return Mosquitto(d, lines, GW_CORE, port)


class Gateway:
    """fieldmq with no device, its local broker on a free port, one TLS upstream; core 0."""

    def __init__(self, work, pki, up_port, inflight):
        self.dir = Path(tempfile.mkdtemp(prefix="fieldmq-", dir=work))
        self.port = free_port()
        self.config = self.dir / "fieldmq.toml"
        self.config.write_text(f"""[gateway]
id = "bench"
data_dir = "{self.dir}/state"
log = "info"

[broker]
listen = ["127.0.0.1:{self.port}"]

[buffer]
commit_interval = "100ms"

[[upstream]]
name = "cloud"
url = "mqtts://127.0.0.1:{up_port}"
ca_file = "{pki.ca}"
cert_file = "{pki.cert}"
key_file = "{pki.key}"
topic_prefix = "site/"
forward = ["bench/#", "fieldmq/#"]
max_inflight = {inflight}
backoff_min = "100ms"
backoff_max = "1s"
""")
        self.log = self.dir / "fieldmq.log"
        self.proc = None

    def start(self, timeout=10.0):
        """Starts fieldmq and returns once it says `gateway running`: its
        LAN listener accepts (and acknowledges) publishes before the buffer
        is attached, and those are never buffered (gateway/src/run.rs starts
        the servers before Uplink::start), so a bench must not publish
        earlier."""
        mark = self.log.stat().st_size if self.log.exists() else 0
        self.proc = spawn([BIN / "fieldmq", "run", "--config", self.config], self.log, GW_CORE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(mark)
                if b"gateway running" in f.read():
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise Failed(f"fieldmq did not start (no `gateway running` in its log):\n{tail(self.log)}")

    @property
    def pid(self):
        return self.proc.pid

    def stats(self):
        out = subprocess.run([BIN / "fieldmq", "buffer", "stats", "--config", self.config, "--json"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise Failed(f"fieldmq buffer stats failed: {out.stderr}")
        return json.loads(out.stdout)

    def waiting(self):
        return self.stats()["upstreams"][0]["waiting"]

    def wait_waiting(self, n, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = self.waiting()
            if w >= n:
                return w
            time.sleep(0.25)
        raise Failed(f"the buffer holds {self.waiting()} messages, not {n}, after {timeout}s:\n{tail(self.log)}")

    def stop(self):
        stop(self.proc)

    def kill(self):
        kill9(self.proc)


def loadgen(port, qos, messages, timeout=300):
    """bench/loadgen fan-in: 8 publishers on bench/in/0..7, 64-byte payloads."""
    out = subprocess.run([BIN / "mqtt-loadgen", str(port), "fan-in", str(qos), str(messages)],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise Failed(f"mqtt-loadgen failed: {out.stderr}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["lost"]:
        raise Failed(f"mqtt-loadgen: {res['lost']} messages lost while filling: {res}")
    return res


# --------------------------------------------------------------------------
# MQTT clients (paho)


def payload(seq):
    text = str(seq).encode()
    return text + b" " + b"x" * (PAYLOAD - len(text) - 1)


def seq_of(data):
    return int(bytes(data).split(b" ", 1)[0])


class Upstreamer:
    """A client of the upstream (TLS, client certificate). Follows
    $SYS/broker/publish/messages/received; with `topic`, also records every
    message there (QoS 1) with its arrival time. With a client id, its
    session is persistent, so it collects what arrives while it is away."""

    SYS = "$SYS/broker/publish/messages/received"

    def __init__(self, pki, up, topic=None, client_id=None):
        self.topic = topic
        self.count = None
        self.cond = threading.Condition()
        self.arrivals = []  # (monotonic time, seq)
        self.subacks = 0
        persistent = client_id is not None
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=paho.MQTTv311,
                             clean_session=not persistent)
        self.c.tls_set(ca_certs=str(pki.ca), certfile=str(pki.cert), keyfile=str(pki.key),
                       cert_reqs=ssl.CERT_REQUIRED)
        self.c.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", up.port, keepalive=60)
        self.c.loop_start()
        self.wait(lambda: self.count is not None and self.subacks >= 1, 10, "no $SYS counter from the upstream")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code == 0:
            subs = [(self.SYS, 0)] + ([(self.topic, 1)] if self.topic else [])
            client.subscribe(subs)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        now = time.monotonic()
        with self.cond:
            if msg.topic == self.SYS:
                self.count = int(msg.payload)
            else:
                self.arrivals.append((now, seq_of(msg.payload)))
            self.cond.notify_all()

    def wait(self, predicate, timeout, what=None):
        with self.cond:
            ok = self.cond.wait_for(predicate, timeout)
        if not ok and what:
            raise Failed(what)
        return ok

    def seqs(self):
        with self.cond:
            return [s for _, s in self.arrivals]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class LanPublisher:
    """Numbered QoS 1 messages to a LAN broker (plain MQTT); knows which
    were acknowledged (PUBACK)."""

    def __init__(self, port, topic):
        self.topic = topic
        self.sent = []  # (seq, MQTTMessageInfo, monotonic time)
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"lan-{os.urandom(4).hex()}",
                             protocol=paho.MQTTv311)
        self.c.max_inflight_messages_set(5000)
        self.c.connect("127.0.0.1", port, keepalive=60)
        self.c.loop_start()
        self._halt = threading.Event()
        self._thread = None

    def publish_one(self):
        with self.lock:
            seq = len(self.sent)
            info = self.c.publish(self.topic, payload(seq), qos=1)
            self.sent.append((seq, info, time.monotonic()))

    def publish(self, count):
        for _ in range(count):
            self.publish_one()

    def start(self, rate):
        def run():
            t0, i = time.monotonic(), 0
            while not self._halt.is_set():
                self.publish_one()
                i += 1
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    self._halt.wait(delay)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        self._halt.set()
        if self._thread:
            self._thread.join()

    def acked(self):
        with self.lock:
            return [seq for seq, info, _ in self.sent if info.is_published()]

    def sent_at(self):
        with self.lock:
            return {seq: t for seq, _, t in self.sent}

    def wait_acked(self, timeout, quiet=3.0):
        """Until every message is acknowledged, or none was for `quiet` s."""
        deadline = time.monotonic() + timeout
        last, changed = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(self.acked())
            if n == len(self.sent):
                return n
            if n != last:
                last, changed = n, time.monotonic()
            elif time.monotonic() - changed > quiet:
                break
            time.sleep(0.05)
        return len(self.acked())

    def close(self):
        self.stop()
        self.c.disconnect()
        self.c.loop_stop()


# --------------------------------------------------------------------------
# sampling the upstream


class Sampler(threading.Thread):
    """(time, upstream rchar, upstream CPU ticks, sender CPU ticks, busy
    ticks of the upstream's core, busy ticks of the sender's core) every
    `period` seconds. The core figures tell whether anything else (another
    build, a test run) took CPU during a drain."""

    def __init__(self, up_pid, sender_pid, period=0.003):
        super().__init__(daemon=True)
        self.up_pid, self.sender_pid, self.period = up_pid, sender_pid, period
        self.samples = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                busy = core_busy()
                s = (time.monotonic(), rchar(self.up_pid), ticks(self.up_pid), ticks(self.sender_pid),
                     busy[UP_CORE], busy[GW_CORE])
            except (OSError, ValueError, IndexError):
                s = None
            if s:
                self.samples.append(s)
            time.sleep(self.period)

    def stop(self):
        self._halt.set()
        self.join()

    def window(self, r_begin, r_end):
        """The drain: from the last sample at or below r_begin bytes to the
        first at or above r_end."""
        s = self.samples
        i1 = next((i for i, x in enumerate(s) if x[1] >= r_end), None)
        i0 = next((i for i, x in enumerate(s) if x[1] > r_begin), None)
        if i0 is None or i1 is None:
            return None
        return self.between(max(i0 - 1, 0), i1)

    def between(self, i0, i1):
        """Figures between samples i0 and i1; CPU in % of one core. `other`:
        what the upstream's core did besides the upstream (should be ~0)."""
        a, b = self.samples[i0], self.samples[i1]
        dt = max(b[0] - a[0], 1e-6)

        def pct(k):
            return 100 * (b[k] - a[k]) / HZ / dt

        return {"t0": a[0], "t1": b[0], "seconds": b[0] - a[0], "up_cpu": pct(2), "tx_cpu": pct(3),
                "other": pct(4) - pct(2)}


# Bytes the upstream reads after release() that are not the backlog: the
# sender's TLS handshake and CONNECT (about 2 KiB).
HANDSHAKES = 4096


def start_held(up, sender):
    """Starts the upstream with a Sampler watching it while the sender is
    held (SIGSTOP), so the sender cannot reach it before this script knows
    what the upstream had read; release() lets the sender go."""
    os.kill(sender.pid, signal.SIGSTOP)
    up.launch()
    sampler = Sampler(up.pid, sender.pid)
    sampler.start()
    up.wait_running()
    return sampler


def release(up, sender):
    """Lets the held sender go; returns what the upstream had read by then."""
    r0 = rchar(up.pid)
    os.kill(sender.pid, signal.SIGCONT)
    return r0


def drain(up, watcher, sampler, expected, r0, limit):
    """Waits until the upstream has received `expected` PUBLISHes (per $SYS),
    at most `limit` seconds; returns the drain figures, or None (stalled)."""
    if not watcher.wait(lambda: watcher.count >= expected, limit):
        return None
    r_final = rchar(up.pid)
    for _ in range(20):  # until the upstream reads nothing more
        time.sleep(0.3)
        r = rchar(up.pid)
        if r == r_final:
            break
        r_final = r
    w = sampler.window(r0 + HANDSHAKES, r_final - 64)
    if w is None:
        raise Failed("the drain was not seen in the samples")
    w["bytes"] = r_final - r0
    return w


# --------------------------------------------------------------------------
# the phases


def drain_fieldmq(work, pki, inflight, backlog=BACKLOG):
    up = upstream(work, pki)
    gw = Gateway(work, pki, up.port, inflight).start()
    try:
        loadgen(gw.port, 1, backlog)
        gw.wait_waiting(backlog, 30)
        sampler = start_held(up, gw)
        watcher = Upstreamer(pki, up)
        r0 = release(up, gw)
        # (The gateway's retained status messages go up too; mosquitto's
        # counter leaves retained messages out.)
        res = drain(up, watcher, sampler, backlog, r0, 60)
        sampler.stop()
        watcher.close()
        if res is None:
            raise Failed(f"fieldmq did not drain {backlog} in 60 s:\n{tail(gw.log)}")
        left = gw.waiting()
        res.update(rate=backlog / res["seconds"], left=left, bpm=res["bytes"] / backlog)
        return res
    finally:
        gw.stop()
        up.stop()


def drain_mosquitto(work, pki, inflight, backlog=BACKLOG, limit=60.0):
    up = upstream(work, pki)
    local = local_bridge(work, pki, up.port, inflight).start()
    try:
        loadgen(local.port, 1, backlog)
        sampler = start_held(up, local)
        watcher = Upstreamer(pki, up)
        r0 = release(up, local)
        res = drain(up, watcher, sampler, backlog, r0, limit)
        sampler.stop()
        got = watcher.count
        watcher.close()
        if res is None:
            return {"stalled_at": got, "backlog": backlog}
        res.update(rate=backlog / res["seconds"], bpm=res["bytes"] / backlog)
        return res
    finally:
        local.stop()
        up.stop()


def prime_recorder(pki, up, topic, client_id):
    """Starts the upstream, makes a persistent QoS 1 session for `topic`,
    and stops the upstream again (SIGTERM: saved): the session then
    collects everything from the moment the upstream is back."""
    up.start()
    rec = Upstreamer(pki, up, topic=topic, client_id=client_id)
    rec.close()
    up.stop()


def big_backlog(work, pki):
    """1M waiting, the upstream comes back, new readings keep flowing."""
    up = upstream(work, pki, persistent=True)
    prime_recorder(pki, up, "site/fieldmq/live/#", "bench-live")
    gw = Gateway(work, pki, up.port, MAIN_INFLIGHT).start()
    try:
        t = time.monotonic()
        loadgen(gw.port, 0, BIG_BACKLOG, timeout=300)
        gw.wait_waiting(BIG_BACKLOG, 180)
        fill_s = time.monotonic() - t
        t = time.monotonic()
        stats = gw.stats()
        stats_s = time.monotonic() - t
        live = LanPublisher(gw.port, "fieldmq/live/0")
        live.start(LIVE_RATE)
        time.sleep(1.0)  # new readings already wait behind the backlog
        sampler = start_held(up, gw)
        t_up = time.monotonic()
        rec = Upstreamer(pki, up, topic="site/fieldmq/live/#", client_id="bench-live")
        r0 = release(up, gw)
        polls = []  # (time, waiting): `buffer stats` every 0.5 s, as an operator would
        caught = None
        deadline = t_up + 120
        while time.monotonic() < deadline:
            polls.append((time.monotonic(), gw.waiting()))
            sent = live.sent_at()
            with rec.cond:
                arrivals = list(rec.arrivals)
            for at, seq in arrivals:
                if at > t_up and seq in sent and at - sent[seq] < 0.5:
                    caught = (at, seq)
                    break
            if caught:
                break
            time.sleep(0.5)
        if caught is None:
            raise Failed(f"fieldmq did not catch up with a 1M backlog in 120 s:\n{tail(gw.log)}")
        # Live traffic after catching up: what it costs once there is no backlog.
        time.sleep(0.5)
        c0 = (time.monotonic(), ticks(up.pid), ticks(gw.pid))
        time.sleep(3.0)
        c1 = (time.monotonic(), ticks(up.pid), ticks(gw.pid))
        live.stop()
        acked = live.wait_acked(10)
        live_acked = set(live.acked())
        rec.wait(lambda: live_acked <= {s for _, s in rec.arrivals}, 20)
        zero = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            zero = gw.waiting()
            if zero == 0:
                break
            time.sleep(0.5)
        sampler.stop()
        # The drain: first backlog bytes to the arrival of the first new
        # reading that came through promptly.
        samples = sampler.samples
        i0 = next(i for i, x in enumerate(samples) if x[1] > r0 + HANDSHAKES)
        i1 = next((i for i, x in enumerate(samples) if x[0] >= caught[0]), len(samples) - 1)
        w = sampler.between(max(i0 - 1, 0), i1)
        sent = live.sent_at()
        drained = BIG_BACKLOG + sum(1 for s, at in sent.items() if at < sent[caught[1]])
        seqs = rec.seqs()
        latencies = [at - sent[s] for at, s in rec.arrivals if s in sent]
        first_stats_low = next((t for t, w in polls if w < 5 * LIVE_RATE), None)
        res = {
            "fill_s": fill_s, "fill_rate": BIG_BACKLOG / fill_s, "db_bytes": stats["bytes"], "stats_s": stats_s,
            "caught_s": caught[0] - t_up, "first_data_s": w["t0"] - t_up, "drain_s": w["seconds"],
            "rate": drained / w["seconds"], "up_cpu": w["up_cpu"], "tx_cpu": w["tx_cpu"], "other": w["other"],
            "live_sent": len(sent), "live_acked": acked, "live_arrived": len(set(seqs) & live_acked),
            "live_lost": len(live_acked - set(seqs)), "live_max_latency": max(latencies) if latencies else None,
            "stats_low_s": (first_stats_low - t_up) if first_stats_low else None, "waiting_end": zero,
            "live_gw_cpu": 100 * (c1[2] - c0[2]) / HZ / (c1[0] - c0[0]),
            "live_up_cpu": 100 * (c1[1] - c0[1]) / HZ / (c1[0] - c0[0]),
        }
        rec.close()
        live.close()
        return res
    finally:
        gw.stop()
        up.stop()


def kill_test(work, pki, kind, bpm):
    """KILL_BACKLOG numbered QoS 1 messages acknowledged by the LAN side while
    the upstream is down; the upstream comes back; SIGKILL of the sender
    when about half has reached it; restart; what never arrives?"""
    up = upstream(work, pki, persistent=True)
    prime_recorder(pki, up, "site/bench/sq/#", f"bench-recorder-{kind}")
    if kind == "fieldmq":
        sender = Gateway(work, pki, up.port, MAIN_INFLIGHT).start()
    else:
        sender = local_bridge(work, pki, up.port, 20).start()
    rec = lan = None
    try:
        lan = LanPublisher(sender.port, "bench/sq/0")
        lan.publish(KILL_BACKLOG)
        acked = lan.wait_acked(120)
        acked_set = set(lan.acked())
        lan.close()
        start_held(up, sender).stop()
        rec = Upstreamer(pki, up, topic="site/bench/sq/#", client_id=f"bench-recorder-{kind}")
        r0 = release(up, sender)
        # Bytes, not messages: the $SYS counter comes once a second, and the
        # whole backlog may drain in less. (The recorder's PUBACKs count
        # too, a few percent: "about half".)
        half = r0 + bpm * acked / 2
        deadline = time.monotonic() + 30
        while rchar(up.pid) < half:
            if time.monotonic() > deadline:
                raise Failed(f"{kind}: the drain did not reach half in 30 s")
            time.sleep(0.0005)
        sender.kill()
        time.sleep(2.2)  # the next $SYS figure: what reached the upstream before the kill
        before_kill = rec.count
        sender.start()
        # Until the recorder has every acknowledged message, or nothing new for 5 s.
        deadline = time.monotonic() + 120
        last, changed = -1, time.monotonic()
        while time.monotonic() < deadline:
            got = set(rec.seqs())
            if acked_set <= got:
                break
            if len(got) != last:
                last, changed = len(got), time.monotonic()
            elif time.monotonic() - changed > 5:
                break
            time.sleep(0.2)
        seqs = rec.seqs()
        got = set(seqs)
        return {
            "published": KILL_BACKLOG, "acked": acked, "before_kill": before_kill,
            "received": len(got & acked_set), "lost": len(acked_set - got), "duplicates": len(seqs) - len(got),
        }
    finally:
        if rec:
            rec.close()
        sender.stop()
        up.stop()


def ingest():
    exe = BIN / "buffer-ingest"
    if not exe.exists():
        return ["buffer-ingest: missing (target/release/buffer-ingest was not built): no ingest figures"]
    out = subprocess.run([exe, "--seconds", "5"], capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stdout.splitlines() if ":" in l]
    if out.returncode != 0:
        lines.append(f"buffer-ingest failed (exit {out.returncode}): {out.stderr.strip()[:300]}")
    return lines


# --------------------------------------------------------------------------


def say(text):
    print(text, flush=True)


def describe(kind, setting, n, res):
    if "stalled_at" in res:
        return f"{kind} {setting}: backlog {n:,} STALLED at {res['stalled_at']:,} after {STALL_LIMIT:.0f} s"
    return (f"{kind} {setting}: backlog {n:,} drained in {res['seconds']:.3f} s = {res['rate']:,.0f}/s, "
            f"upstream CPU {res['up_cpu']:.0f}%, sender CPU {res['tx_cpu']:.0f}%, {res['bpm']:.0f} B/msg on the wire"
            + other_load(res))


def other_load(res):
    """A warning when something else used the upstream's core during a drain."""
    return f" [core {UP_CORE} also {res['other']:.0f}% busy with other work]" if res.get("other", 0) > 10 else ""


def main():
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    version = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    say(f"# {version}; upstream mosquitto on core {UP_CORE}; fieldmq, local mosquitto, load generators and "
        f"this driver on core {GW_CORE}; {ROUNDS} rounds")
    work = Path(tempfile.mkdtemp(prefix="store-forward-"))
    keep = os.environ.get("KEEP_WORK") == "1"
    ok = False
    try:
        say("ingest: buffer-ingest --seconds 5 (in process, core 0)")
        ingest_lines = ingest()
        pki = Pki(work / "pki")

        fq = {n: [] for n in INFLIGHTS}
        mq = {n: [] for n in MOSQ_INFLIGHTS}
        for r in range(ROUNDS):
            order = ["fieldmq", "mosquitto"] if r % 2 == 0 else ["mosquitto", "fieldmq"]
            for kind in order:
                if kind == "fieldmq":
                    for n in INFLIGHTS:
                        res = drain_fieldmq(work, pki, n)
                        fq[n].append(res)
                        say(f"round {r + 1}: " + describe("fieldmq", f"max_inflight {n}", BACKLOG, res)
                            + f", waiting after: {res['left']}")
                else:
                    for n in MOSQ_INFLIGHTS:
                        res = drain_mosquitto(work, pki, n)
                        mq[n].append(res)
                        say(f"round {r + 1}: " + describe("mosquitto bridge", f"max_inflight_messages {n}", BACKLOG, res))

        stall = {}
        for n in MOSQ_INFLIGHTS:
            stall[n] = drain_mosquitto(work, pki, n, STALL_BACKLOG, STALL_LIMIT)
            say(describe("mosquitto bridge", f"max_inflight_messages {n}", STALL_BACKLOG, stall[n]))
        stall["fieldmq"] = drain_fieldmq(work, pki, MAIN_INFLIGHT, STALL_BACKLOG)
        say(describe("fieldmq", f"max_inflight {MAIN_INFLIGHT}", STALL_BACKLOG, stall["fieldmq"]))

        say(f"fieldmq: a {BIG_BACKLOG:,} backlog drained while {LIVE_RATE:,} new readings/s keep coming")
        big = big_backlog(work, pki)
        say(f"  caught up {big['caught_s']:.1f} s after the upstream started ({big['drain_s']:.1f} s of draining at "
            f"{big['rate']:,.0f}/s, upstream CPU {big['up_cpu']:.0f}%, fieldmq CPU {big['tx_cpu']:.0f}%); "
            f"new readings {big['live_acked']:,} acknowledged, {big['live_lost']} lost" + other_load(big))

        def bpm_of(results):
            vals = [x["bpm"] for x in results if "bpm" in x]
            return statistics.median(vals) if vals else 107.0

        kills = {}
        for kind, bpm in (("fieldmq", bpm_of(fq[MAIN_INFLIGHT])), ("mosquitto", bpm_of(mq[20]))):
            k = kills[kind] = kill_test(work, pki, kind, bpm)
            say(f"SIGKILL {kind}: {k['acked']:,} acknowledged, ~{k['before_kill']:,} upstream before the kill, "
                f"{k['lost']:,} lost, {k['duplicates']:,} duplicates")

        report(ingest_lines, fq, mq, stall, big, kills)
        ok = True
    finally:
        cleanup()
        if keep or not ok:
            print(f"(work directory kept: {work})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(ingest_lines, fq, mq, stall, big, kills):
    def med(rows, key):
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else None

    def ok_rows(rows):
        return [r for r in rows if "rate" in r]

    best_f = max(INFLIGHTS, key=lambda n: med(fq[n], "rate") or 0)
    best_m = max(MOSQ_INFLIGHTS, key=lambda n: med(ok_rows(mq[n]), "rate") or 0)
    f_rows, m_rows = fq[best_f], ok_rows(mq[best_m])
    f_rate, m_rate = med(f_rows, "rate"), med(m_rows, "rate") or 0

    def cpu(rows):
        return f"{med(rows, 'up_cpu'):.0f}%" if rows else "-"

    say("")
    say(f"Drain: a backlog of {BACKLOG:,} messages (topic bench/in/N, 64-byte payload) built while the upstream is "
        f"down, then sent to it over TLS 1.3 with a client certificate, QoS 1; median of {ROUNDS} rounds. "
        f"CPU: % of one core over the drain.")
    say("")
    say("| sender | setting | drain msg/s | upstream CPU | sender CPU |")
    say("| --- | --- | --- | --- | --- |")
    for n in INFLIGHTS:
        say(f"| fieldmq | max_inflight {n}{' (default)' if n == 256 else ''} | {med(fq[n], 'rate'):,.0f} | "
            f"{cpu(fq[n])} | {med(fq[n], 'tx_cpu'):.0f}% |")
    for n in MOSQ_INFLIGHTS:
        rows = ok_rows(mq[n])
        label = f"max_inflight_messages {n}{' (default)' if n == 20 else ' (unlimited)'}"
        if not rows:
            say(f"| mosquitto bridge | {label} | stalled | | |")
        else:
            say(f"| mosquitto bridge | {label} | {med(rows, 'rate'):,.0f} | {cpu(rows)} | {med(rows, 'tx_cpu'):.0f}% |")

    def big_cell(res):
        if "stalled_at" in res:
            return f"STALLED at {res['stalled_at']:,} (gave up after {STALL_LIMIT:.0f} s)"
        return f"{res['seconds']:.2f} s = {res['rate']:,.0f}/s, upstream CPU {res['up_cpu']:.0f}%"

    fk, mk = kills["fieldmq"], kills["mosquitto"]
    say("")
    say("| figure | fieldmq | mosquitto bridge |")
    say("| --- | --- | --- |")
    say(f"| drain msg/s, {BACKLOG:,} backlog (TLS, QoS 1), best setting | {f_rate:,.0f} (max_inflight {best_f}) | "
        f"{m_rate:,.0f} (max_inflight_messages {best_m}) |")
    say(f"| ratio fieldmq / mosquitto | {f_rate / m_rate:.2f}x | |" if m_rate else "| ratio | - | |")
    d_f, d_m = med(fq[256], "rate"), med(ok_rows(mq[20]), "rate")
    if d_f and d_m:
        say(f"| ratio at the defaults (max_inflight 256 / max_inflight_messages 20) | {d_f / d_m:.2f}x | |")
    say(f"| upstream CPU during the drain | {cpu(f_rows)} | {cpu(m_rows)} |")
    say(f"| sender CPU during the drain | {med(f_rows, 'tx_cpu'):.0f}% (fieldmq) | "
        f"{med(m_rows, 'tx_cpu') or 0:.0f}% (local mosquitto) |")
    say(f"| backlog of {STALL_BACKLOG:,} | {big_cell(stall['fieldmq'])} (max_inflight {MAIN_INFLIGHT}) | "
        + "; ".join(f"max_inflight_messages {n}: {big_cell(stall[n])}" for n in MOSQ_INFLIGHTS) + " |")
    say(f"| backlog of {BIG_BACKLOG:,} while {LIVE_RATE:,} new readings/s keep coming: caught up after | "
        f"{big['caught_s']:.1f} s from upstream start ({big['drain_s']:.1f} s draining at {big['rate']:,.0f}/s, "
        f"upstream CPU {big['up_cpu']:.0f}%, fieldmq CPU {big['tx_cpu']:.0f}%) | not run |")
    say(f"| new readings during it: acknowledged / arrived / lost; worst latency | "
        f"{big['live_acked']:,} / {big['live_arrived']:,} / {big['live_lost']}; {big['live_max_latency']:.1f} s | |")
    say(f"| then, {LIVE_RATE:,} new readings/s and no backlog: CPU | fieldmq {big['live_gw_cpu']:.0f}%, "
        f"upstream {big['live_up_cpu']:.0f}% | |")
    say(f"| `buffer stats` waiting: below {5 * LIVE_RATE:,} after / at the end | "
        + (f"{big['stats_low_s']:.1f} s" if big['stats_low_s'] is not None else "never")
        + f" / {big['waiting_end']} | |")
    say(f"| SIGKILL about half-way through a drain of {KILL_BACKLOG:,}: acknowledged; reached the upstream before "
        f"the kill | {fk['acked']:,}; ~{fk['before_kill']:,} | {mk['acked']:,}; ~{mk['before_kill']:,} |")
    say(f"| acknowledged messages lost to SIGKILL | **{fk['lost']:,}** (duplicates {fk['duplicates']:,}) | "
        f"**{mk['lost']:,}** (duplicates {mk['duplicates']:,}) |")
    say(f"| filling: {BIG_BACKLOG:,} QoS 0 LAN publishes in the buffer | {big['fill_s']:.1f} s "
        f"({big['fill_rate']:,.0f}/s), buffer.db {big['db_bytes'] / 2**20:.0f} MiB; `buffer stats` "
        f"{big['stats_s'] * 1000:.0f} ms | |")
    for line in ingest_lines:
        key, _, value = line.partition(":")
        say(f"| ingest (buffer-ingest --seconds 5): {key.strip()} | {value.strip()} | |")
    runs = [r for rows in list(fq.values()) + list(mq.values()) for r in rows] + [big] + [
        stall[k] for k in stall]
    busy = [r for r in runs if r.get("other", 0) > 10]
    if busy:
        say("")
        say(f"WARNING: in {len(busy)} of {len(runs)} drains something else used more than 10% of core {UP_CORE} "
            f"(the upstream's); those figures are low. Run on an otherwise idle machine.")
    say("")
    say("Targets: drain >= 30,000/s over TLS: " + ("met" if f_rate >= 30_000 else "NOT met")
        + "; >= mosquitto's bridge in this run: " + ("met" if f_rate >= m_rate else "NOT met")
        + "; 1M backlog caught up in under a minute with new readings flowing: "
        + ("met" if big["caught_s"] < 60 else "NOT met")
        + "; zero acknowledged messages lost on SIGKILL: " + ("met" if fk["lost"] == 0 else "NOT met") + ".")


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        sys.exit(f"store-forward: {e}")
