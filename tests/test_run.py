"""`fieldmq run`: the gateway as a service. What a person sees in the log,
how it fails and recovers per device, and how it stops and reloads."""

import re
import signal
import socket
import time

import pytest

TWO_DEVICES = """
[gateway]
id = "gw"
data_dir = "state"

[[device]]
name = "host"
kind = "system"
poll = "200ms"

[[device]]
name = "usb"
kind = "system"
poll = "200ms"
disks = {{ usb = "{usb}" }}
"""


def test_default_config_runs_logs_a_summary_and_stops_on_sigterm_within_2s(gateway, tmp_path):
    gw = gateway(None, XDG_STATE_HOME=tmp_path / "xdg")
    gw.wait_for(r"INFO fieldmq \d+\.\d+\.\d+ starting")
    gw.wait_for(r"INFO config: <embedded default>")
    gw.wait_for(rf"INFO gateway: id {socket.gethostname()}, data in {tmp_path}/xdg/fieldmq")
    gw.wait_for(r"INFO device system \(system\): poll every 5s -> fieldmq/.+/system \(json\)")
    gw.wait_for(r"INFO gateway running devices=1")
    assert (tmp_path / "xdg" / "fieldmq").is_dir(), "the data directory is created"
    # At the default info level, readings are not logged.
    assert gw.count(r"DEBUG") == 0
    code, elapsed = gw.stop(signal.SIGTERM)
    assert code == 0, gw.log()
    assert elapsed < 2.0
    assert "SIGTERM received, stopping" in gw.log()
    assert gw.log().splitlines()[-1].endswith("INFO stopped")


def test_debug_logs_a_line_per_reading(gateway, write_config, tmp_path):
    (tmp_path / "usb").mkdir()
    gw = gateway(write_config(TWO_DEVICES.format(usb="usb")), RUST_LOG="debug")
    # One line per reading: three readings, three lines (cpu_temp leads
    # where the host has a thermal zone, as a Raspberry Pi does).
    mark = 0
    for _ in range(3):
        gw.wait_for(r"DEBUG reading (cpu_temp=[\d.]+°C )?load_1m=[\d.]+ load_5m=[\d.]+ .*mem_used=[\d.]+MiB .*node=host messages=1", after=mark)
        mark = len(gw.lines)
    line = gw.wait_for(r"DEBUG reading .*disk_free_usb=[\d.]+MiB .* node=usb messages=1")
    assert "uptime=" in line.string and "process_rss=" in line.string
    code, elapsed = gw.stop(signal.SIGINT)
    assert code == 0 and elapsed < 2.0
    assert "SIGINT received, stopping" in gw.log()


def test_a_failing_device_is_marked_in_error_the_others_go_on_and_it_recovers(gateway, write_config, tmp_path):
    gw = gateway(write_config(TWO_DEVICES.format(usb="usb")), RUST_LOG="debug")
    gw.wait_for(rf"WARN device failed node=usb reason=disk usb \({tmp_path}/usb\): No such file or directory")
    # host keeps its rhythm while usb fails on every poll, and the failure
    # is logged once, not once per poll.
    start = len(gw.lines)
    for _ in range(5):
        gw.wait_for(r"DEBUG reading .* node=host", after=len(gw.lines))
    assert gw.count(r"WARN device failed node=usb") == 1
    assert gw.count(r"node=usb messages") == 0
    (tmp_path / "usb").mkdir()
    mark = len(gw.lines)
    gw.wait_for(r"INFO device answers again node=usb", after=mark)
    gw.wait_for(r"DEBUG reading .* node=usb messages=1", after=mark)
    assert start < len(gw.lines)
    code, _ = gw.stop()
    assert code == 0


def test_a_bad_config_is_refused_before_starting(gateway, write_config):
    gw = gateway(write_config('[gateway]\nid = 7\n'))
    code = gw.proc.wait(timeout=10)
    gw._reader.join(timeout=2)
    assert code == 2
    assert "fieldmq.toml:2:6: invalid type: integer `7`, expected a string" in gw.log()


def test_sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid(gateway, write_config, tmp_path):
    path = write_config('[gateway]\nid = "gw"\ndata_dir = "state"\n[[device]]\nname = "one"\nkind = "system"\npoll = "200ms"\n')
    gw = gateway(path, RUST_LOG="debug")
    gw.wait_for(r"DEBUG reading .* node=one")

    path.write_text(path.read_text() + 'poll_rate = "1s"\n')
    mark = len(gw.lines)
    gw.send(signal.SIGHUP)
    gw.wait_for(r"ERROR .*fieldmq.toml:8:1: unknown field `poll_rate`", after=mark)
    gw.wait_for(r"ERROR SIGHUP: the new config was refused; the running one stays", after=mark)
    mark = len(gw.lines)
    gw.wait_for(r"DEBUG reading .* node=one", after=mark)

    path.write_text(path.read_text().replace('poll_rate = "1s"\n', '[[device]]\nname = "two"\nkind = "system"\npoll = "200ms"\n'))
    mark = len(gw.lines)
    gw.send(signal.SIGHUP)
    gw.wait_for(r"INFO SIGHUP: config reloaded", after=mark)
    gw.wait_for(r"INFO device two \(system\): poll every 200ms", after=mark)
    gw.wait_for(r"DEBUG reading .* node=two", after=mark)
    gw.wait_for(r"DEBUG reading .* node=one", after=mark)
    assert gw.proc.poll() is None
    code, elapsed = gw.stop()
    assert code == 0 and elapsed < 2.0


def test_the_default_config_runs_unprivileged_where_nothing_is_writable(fieldmq_bin, tmp_path):
    """As `nobody` in `/` with no usable home, the data goes to the temp dir."""
    import os
    import subprocess

    from conftest import clean_env

    env = clean_env(HOME="/nonexistent", RUST_LOG="info")
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", fieldmq_bin, "run"]
        cwd = "/"
    else:  # as an ordinary user, in a folder it may not write to
        cmd, cwd = [fieldmq_bin, "run"], tmp_path / "read-only"
        cwd.mkdir()
        cwd.chmod(0o555)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "gateway running" in line:
                break
        log = "".join(lines)
        assert "gateway running" in log, log
        uid = int(subprocess.check_output(["id", "-u", "nobody"])) if os.geteuid() == 0 else os.geteuid()
        assert f"data in /tmp/fieldmq-{uid}" in log, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()


ON_CHANGE = """
[gateway]
id = "gw"
data_dir = "state"

[[device]]
name = "always"
kind = "system"
poll = "200ms"
format = "value"

[[device]]
name = "quiet"
kind = "system"
poll = "200ms"
format = "value"
publish = "on-change"
heartbeat = "1s"
""" + "".join(
    f'  [[device.attribute]]\n  name = "{name}"\n  deadband = 1e12\n'
    for name in ("cpu_temp", "load_1m", "load_5m", "load_15m", "mem_used", "mem_available", "disk_free", "uptime", "process_rss")
)


def published(gw):
    """(seconds, topic, retain) of every message the gateway published."""
    from datetime import datetime

    out = []
    for line in gw.lines:
        m = re.match(r"(\S+Z)\s+TRACE publish topic=(\S+) bytes=\d+ retain=(true|false)", line)
        if m:
            ts = datetime.strptime(m.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            out.append((ts, m.group(2), m.group(3) == "true"))
    return out


def test_on_change_holds_unchanged_values_until_the_heartbeat(gateway, write_config):
    gw = gateway(write_config(ON_CHANGE), RUST_LOG="trace")
    gw.wait_for(r"TRACE publish topic=fieldmq/gw/quiet/uptime")
    time.sleep(3.3)
    code, _ = gw.stop()
    assert code == 0
    messages = published(gw)
    by_topic = {}
    for ts, topic, _ in messages:
        by_topic.setdefault(topic, []).append(ts)

    always = by_topic["fieldmq/gw/always/load_1m"]
    quiet = {t: v for t, v in by_topic.items() if t.startswith("fieldmq/gw/quiet/") and not t.endswith("/status")}
    assert "fieldmq/gw/quiet/load_1m" in quiet and "fieldmq/gw/quiet/uptime" in quiet
    # Every poll of `always` publishes; `quiet` holds every attribute (no
    # change beats its deadband) until its 1 s heartbeat is due.
    assert len(always) >= 12, always
    for topic, times in quiet.items():
        assert 2 <= len(times) <= 5, (topic, times)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(gap >= 0.85 for gap in gaps), (topic, gaps)
    # Statuses are retained and sent once, not per poll.
    statuses = [(t, r) for _, t, r in messages if t.endswith("/status")]
    assert statuses.count(("fieldmq/gw/quiet/status", True)) == 2  # online, then offline at stop
    assert statuses[-1] == ("fieldmq/gw/status", True)


def test_a_failing_node_status_is_published_on_each_change_only(gateway, write_config, tmp_path):
    gw = gateway(write_config(TWO_DEVICES.format(usb="usb")), RUST_LOG="trace")
    gw.wait_for(r"WARN device failed node=usb")
    for _ in range(3):
        gw.wait_for(r"TRACE publish topic=fieldmq/gw/host ", after=len(gw.lines))
    (tmp_path / "usb").mkdir()
    gw.wait_for(r"TRACE publish topic=fieldmq/gw/usb ")
    code, _ = gw.stop()
    assert code == 0
    usb_statuses = [t for _, t, retain in published(gw) if t == "fieldmq/gw/usb/status" and retain]
    # error, online, offline: three changes, three messages, whatever the number of polls.
    assert len(usb_statuses) == 3
