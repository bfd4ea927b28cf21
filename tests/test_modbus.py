"""Modbus TCP against a real pymodbus server: every type and word order
decoded exactly, readings on the local broker, an exception response and a
dead device in error while a healthy device keeps publishing."""

import json
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from modbus_peer import ModbusDevice

HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(fmt, value):
    """Big-endian 16-bit words of a struct-packed value (ABCD order)."""
    raw = struct.pack(fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def swap(w):
    return ((w & 0xFF) << 8) | (w >> 8)


F32 = struct.unpack(">f", struct.pack(">f", 230.4))[0]
HOLDING = {}


def put(address, regs):
    for i, r in enumerate(regs):
        HOLDING[str(address + i)] = r


put(0, [1234])                                             # u16
put(1, words(">h", -2))                                    # i16
put(2, words(">I", 0xAABBCCDD))                            # u32 ABCD
put(4, list(reversed(words(">I", 0xAABBCCDD))))            # u32 CDAB
put(6, [swap(w) for w in words(">i", -123456)])            # i32 BADC
put(8, [swap(w) for w in reversed(words(">f", 230.4))])    # f32 DCBA
put(10, words(">d", -1234.5678))                           # f64 ABCD
put(14, words(">Q", 2**40 + 5))                            # u64 ABCD
put(18, list(reversed(words(">q", -10))))                  # i64 CDAB
put(22, [0b1000])                                          # bit 3
put(23, [0x5344, 0x4D36, 0x3330])                          # "SDM630"
put(26, [2304])                                            # 230.4 after scale 0.1

SPEC = {
    "holding": HOLDING,
    "input": {"0": words(">f", 50.0)[0], "1": words(">f", 50.0)[1]},
    "coil": {"0": True},
    "discrete": {"1": True},
}

ATTRIBUTES = """
  [[device.attribute]]
  name = "u16"
  table = "holding"
  register = 0
  [[device.attribute]]
  name = "i16"
  table = "holding"
  register = 1
  type = "i16"
  [[device.attribute]]
  name = "u32_abcd"
  table = "holding"
  register = 2
  type = "u32"
  [[device.attribute]]
  name = "u32_cdab"
  table = "holding"
  register = 4
  type = "u32"
  word_order = "little"
  [[device.attribute]]
  name = "i32_badc"
  table = "holding"
  register = 6
  type = "i32"
  byte_order = "little"
  [[device.attribute]]
  name = "f32_dcba"
  table = "holding"
  register = 8
  type = "f32"
  word_order = "little"
  byte_order = "little"
  [[device.attribute]]
  name = "f64"
  table = "holding"
  register = 10
  type = "f64"
  [[device.attribute]]
  name = "u64"
  table = "holding"
  register = 14
  type = "u64"
  [[device.attribute]]
  name = "i64_cdab"
  table = "holding"
  register = 18
  type = "i64"
  word_order = "little"
  [[device.attribute]]
  name = "alarm"
  table = "holding"
  register = 22
  type = "bool"
  bit = 3
  [[device.attribute]]
  name = "model"
  table = "holding"
  register = 23
  type = "string"
  count = 3
  [[device.attribute]]
  name = "voltage"
  table = "holding"
  register = 26
  scale = 0.1
  unit = "V"
  [[device.attribute]]
  name = "frequency"
  table = "input"
  register = 0
  type = "f32"
  unit = "Hz"
  [[device.attribute]]
  name = "relay"
  table = "coil"
  register = 0
  [[device.attribute]]
  name = "door"
  table = "discrete"
  register = 1
"""


@pytest.fixture
def modbus_server(tmp_path):
    device = ModbusDevice(SPEC, tmp_path)
    try:
        yield device.port
    finally:
        device.stop()


def test_modbus_tcp_readings_arrive_decoded_and_failures_stay_per_device(gateway, write_config, modbus_server):
    dead_port = free_port()
    config = f"""
[gateway]
id = "gw"
data_dir = "state"
[broker]
listen = ["127.0.0.1:0"]

[[device]]
name = "meter"
kind = "modbus-tcp"
address = "127.0.0.1:{modbus_server}"
poll = "300ms"
{ATTRIBUTES}
[[device]]
name = "bad-register"
kind = "modbus-tcp"
address = "127.0.0.1:{modbus_server}"
poll = "300ms"
  [[device.attribute]]
  name = "nowhere"
  table = "holding"
  register = 5000

[[device]]
name = "dead"
kind = "modbus-tcp"
address = "127.0.0.1:{dead_port}"
poll = "300ms"
timeout = "200ms"
  [[device.attribute]]
  name = "x"
  table = "holding"
  register = 0
"""
    gw = gateway(write_config(config), RUST_LOG="info")
    port = int(gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)").group(1))
    gw.wait_for(r"device meter \(modbus-tcp\): .* 15 attributes in 4 requests per poll")

    got = {}
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: got.setdefault(m.topic, []).append(m.payload.decode())
    client.connect("127.0.0.1", port)
    client.subscribe("fieldmq/gw/#", 1)
    client.loop_start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(got.get("fieldmq/gw/meter", [])) < 3:
        time.sleep(0.1)
    client.loop_stop()

    readings = [json.loads(p) for p in got.get("fieldmq/gw/meter", [])]
    assert len(readings) >= 3, got
    attributes = readings[-1]["attributes"]
    assert attributes == {
        "u16": 1234,
        "i16": -2,
        "u32_abcd": 0xAABBCCDD,
        "u32_cdab": 0xAABBCCDD,
        "i32_badc": -123456,
        "f32_dcba": F32,
        "f64": -1234.5678,
        "u64": 2**40 + 5,
        "i64_cdab": -10,
        "alarm": True,
        "model": "SDM630",
        "voltage": 230.4,
        "frequency": 50.0,
        "relay": True,
        "door": True,
    }
    assert readings[-1]["units"] == {"voltage": "V", "frequency": "Hz"}
    assert got["fieldmq/gw/meter/status"][-1] == "online"
    # An exception response and a dead device: their nodes are in error,
    # with the reason; the healthy meter on the same server kept publishing.
    bad = got["fieldmq/gw/bad-register/status"][-1]
    assert bad.startswith("error: exception") and "holding 5000..5001" in bad, bad
    assert got["fieldmq/gw/dead/status"][-1].startswith(f"error: cannot connect to 127.0.0.1:{dead_port}")
    assert "fieldmq/gw/bad-register" not in got and "fieldmq/gw/dead" not in got


def test_fieldmq_test_reads_modbus_devices_once_and_reports_each_failure(cli, write_config, modbus_server):
    # The commissioning step: one poll of each device, exit 1 when one failed.
    dead_port = free_port()
    path = write_config(f"""
[gateway]
id = "gw"
[[device]]
name = "ok"
kind = "modbus-tcp"
address = "127.0.0.1:{modbus_server}"
  [[device.attribute]]
  name = "voltage"
  table = "holding"
  register = 26
  scale = 0.1
  unit = "V"
[[device]]
name = "dead"
kind = "modbus-tcp"
address = "127.0.0.1:{dead_port}"
  [[device.attribute]]
  name = "v"
  table = "holding"
  register = 0
""")
    r = cli("test", "--config", path)
    assert r.code == 1
    lines = dict(line.split(" ", 1) for line in r.out.splitlines())
    assert json.loads(lines["fieldmq/gw/ok"])["attributes"] == {"voltage": 230.4}
    assert lines["fieldmq/gw/dead/status"].startswith(f"error: cannot connect to 127.0.0.1:{dead_port}: Connection refused")
    assert "2 devices polled, 1 failed" in r.err


def test_writes_from_mqtt_round_trip_to_the_device_and_bad_ones_change_nothing(gateway, write_config, modbus_server):
    from pymodbus.client import ModbusTcpClient

    config = f"""
[gateway]
id = "gw"
data_dir = "state"
[broker]
listen = ["127.0.0.1:0"]
[[device]]
name = "plc"
kind = "modbus-tcp"
address = "127.0.0.1:{modbus_server}"
poll = "500ms"
  [[device.attribute]]
  name = "setpoint"
  table = "holding"
  register = 40
  scale = 0.1
  unit = "°C"
  writable = true
  min = 5.0
  max = 30.0
  [[device.attribute]]
  name = "pump"
  table = "coil"
  register = 5
  writable = true
  [[device.attribute]]
  name = "u16"
  table = "holding"
  register = 0
  [[device.attribute]]
  name = "heater"
  table = "holding"
  register = 41
  type = "bool"
  bit = 3
  writable = true
"""
    gw = gateway(write_config(config), RUST_LOG="info")
    port = int(gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)").group(1))
    results = {}
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: results.setdefault(m.topic, []).append(m.payload.decode())
    client.connect("127.0.0.1", port)
    client.subscribe("fieldmq/gw/plc/set/+/result", 1)
    client.loop_start()
    time.sleep(0.3)
    device = ModbusTcpClient("127.0.0.1", port=modbus_server)
    assert device.connect()

    def command(attribute, value):
        topic = f"fieldmq/gw/plc/set/{attribute}"
        before = len(results.get(f"{topic}/result", []))
        client.publish(topic, value, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(results.get(f"{topic}/result", [])) == before:
            time.sleep(0.05)
        return results[f"{topic}/result"][-1]

    def register(address):
        return device.read_holding_registers(address, count=1, slave=1).registers[0]

    # A write with scale undone: 21.5 °C is register value 215 (function 6).
    assert command("setpoint", "21.5") == "ok"
    assert register(40) == 215
    # Malformed, out of range, not writable: refused, and nothing changes.
    assert command("setpoint", "warm") == "error: `warm` is not a number"
    assert command("setpoint", "99") == "error: 99 is above the maximum 30"
    assert command("u16", "7") == "error: `u16` is not writable"
    assert register(40) == 215 and register(0) == 1234
    # A coil (function 5).
    assert command("pump", "on") == "ok"
    assert device.read_coils(5, count=1, slave=1).bits[0] is True
    # One bit of a register (function 22, mask write): the PLC's other bits
    # in the same register stay as they are.
    device.write_register(41, 0b1010_0001, slave=1)
    assert command("heater", "on") == "ok"
    assert register(41) == 0b1010_1001
    assert command("heater", "false") == "ok"
    assert register(41) == 0b1010_0001
    assert command("heater", "maybe") == "error: `maybe` is not true/false, 1/0 or on/off"
    assert register(41) == 0b1010_0001
    device.close()
    client.loop_stop()
    gw.wait_for(r"INFO write device=plc attribute=setpoint value=21.5 result=ok")


def test_modbus_read_shows_raw_registers_and_every_word_order(cli, modbus_server):
    # Registers 8..9 hold 230.4 as f32 in DCBA order (see HOLDING above).
    r = cli("modbus", "read", "--tcp", f"127.0.0.1:{modbus_server}", "--register", "8", "--count", "2", "--type", "f32", "--word-order", "DCBA")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == f"holding 8..10 from unit 1 at 127.0.0.1:{modbus_server}"
    regs = [int(HOLDING["8"]), int(HOLDING["9"])]
    assert f"0x{regs[0]:04X}" in lines[2] and f"0x{regs[1]:04X}" in lines[3]
    decoded = lines[-1]
    assert decoded.startswith("f32 at 8:")
    assert f"DCBA* {F32!r}" in decoded, decoded
    # A dead address fails with the reason and exit 1.
    dead = cli("modbus", "read", "--tcp", f"127.0.0.1:{free_port()}", "--register", "0")
    assert dead.code == 1 and "cannot connect" in dead.err


@pytest.fixture
def rtu_line(tmp_path):
    """A socat pty pair: pymodbus serves RTU on one end, fieldmq polls the other."""
    import shutil

    if not shutil.which("socat"):
        pytest.fail("socat is not installed: apt-get install socat (scripts/install-test-peers does it)")
    server_end, gateway_end = tmp_path / "server-tty", tmp_path / "gateway-tty"
    socat = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={server_end}", f"pty,raw,echo=0,link={gateway_end}"],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (server_end.exists() and gateway_end.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    server = subprocess.Popen([sys.executable, str(HERE / "modbus_server.py"), str(server_end.resolve()), str(spec)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        yield gateway_end
    finally:
        server.terminate()
        server.wait(timeout=10)
        socat.terminate()
        socat.wait(timeout=10)


def test_modbus_rtu_on_a_shared_bus_reads_exactly_and_a_dead_unit_costs_only_its_timeout(gateway, write_config, rtu_line):
    config = f"""
[gateway]
id = "gw"
data_dir = "state"
[broker]
listen = ["127.0.0.1:0"]

[[device]]
name = "meter"
kind = "modbus-rtu"
port = "{rtu_line}"
baud = 9600
unit_id = 1
poll = "500ms"
{ATTRIBUTES}
[[device]]
name = "ghost"
kind = "modbus-rtu"
port = "{rtu_line}"
baud = 9600
unit_id = 2
poll = "500ms"
timeout = "200ms"
retries = 0
  [[device.attribute]]
  name = "x"
  table = "holding"
  register = 0
"""
    gw = gateway(write_config(config), RUST_LOG="info")
    port = int(gw.wait_for(r"MQTT listener ready addr=127\.0\.0\.1:(\d+)").group(1))
    gw.wait_for(rf"device meter \(modbus-rtu\): .* unit 1 at {re.escape(str(rtu_line))} 9600 8N1, 15 attributes in 4 requests")
    got = {}
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: got.setdefault(m.topic, []).append(m.payload.decode())
    client.connect("127.0.0.1", port)
    client.subscribe("fieldmq/gw/#", 1)
    client.loop_start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(got.get("fieldmq/gw/meter", [])) < 3:
        time.sleep(0.1)
    client.loop_stop()
    readings = [json.loads(p) for p in got.get("fieldmq/gw/meter", [])]
    assert len(readings) >= 3, got
    assert readings[-1]["attributes"]["f32_dcba"] == F32
    assert readings[-1]["attributes"]["model"] == "SDM630"
    assert readings[-1]["attributes"]["i64_cdab"] == -10
    # The absent unit 2 is in error (a timeout, or the exception some
    # pymodbus releases send for an unknown unit); the meter on the same
    # bus kept publishing.
    assert got["fieldmq/gw/ghost/status"][-1].startswith("error: "), got["fieldmq/gw/ghost/status"]


def test_modbus_read_over_rtu(cli, rtu_line):
    r = cli("modbus", "read", "--rtu", rtu_line, "--register", "0", "--count", "2", "--type", "u16")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == f"holding 0..2 from unit 1 at {rtu_line} 9600 8N1"
    assert "0x04D2    1234" in r.out  # register 0 holds 1234
