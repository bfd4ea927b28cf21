"""`fieldmq check` and `fieldmq test`: the commissioning commands, run as a
person would before trusting a config."""

import json
import re
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_check_accepts_the_example_and_says_what_it_would_do(cli):
    r = cli("check", "--config", ROOT / "config" / "example.toml")
    assert r.code == 0, r.err
    assert "gateway: id pi-01, data in /var/lib/fieldmq" in r.out
    assert "broker: listen mqtt://0.0.0.0:1883" in r.out
    assert "broker access: anonymous clients allowed" in r.out and "acl.example" in r.out
    assert r.err == "", "the example lets anonymous clients read only: no warning"
    assert "device host (system): poll every 5s -> fieldmq/pi-01/host (json), publish always" in r.out
    assert (
        "device host-changes (system): poll every 10s -> fieldmq/pi-01/host-changes/<attribute> (value), "
        "publish on-change, heartbeat 10m, load_1m deadband 0.25" in r.out
    )
    assert r.out.rstrip().endswith("config ok")


def test_check_reports_three_distinct_mistakes_at_once_and_exits_2(cli, write_config):
    path = write_config(
        "[gateway]\n"
        'id = "pi-01"\n'
        "\n"
        "[[device]]\n"
        'name = "host"\n'
        'kind = "system"\n'
        "poll = true\n"  # wrong type
        'pol = "5s"\n'  # unknown key
        "\n"
        "[[device]]\n"
        'name = "host-2"\n'
        'kind = "system"\n'
        'poll = "5 parsecs"\n'  # bad duration
    )
    r = cli("check", "--config", path)
    assert r.code == 2
    assert r.out == ""
    errors = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {path}:7:8: invalid type: boolean `true`, expected a duration like \"250ms\", \"5s\" or \"2m\"",
        f"error: {path}:8:1: unknown field `pol`, expected one of `name`, `kind`, `poll`, `topic`, `format`, "
        "`publish`, `heartbeat`, `disks`, `address`, `unit_id`, `timeout`, `retries`, `max_gap`, `profile`, "
        "`port`, `baud`, `parity`, `data_bits`, `stop_bits`, `attribute`",
        f"error: {path}:13:8: invalid value: string \"5 parsecs\", expected a duration like \"250ms\", \"5s\" or \"2m\"",
    ]
    # The offending text is shown, underlined.
    assert '13 | poll = "5 parsecs"\n   |        ^^^^^^^^^^^' in r.err
    assert r.err.rstrip().endswith("3 errors found; the config was not applied")


def test_check_without_arguments_uses_the_embedded_default(cli):
    r = cli("check")
    assert r.code == 0, r.err
    expected = "/etc/fieldmq/fieldmq.toml" if Path("/etc/fieldmq/fieldmq.toml").exists() else "<embedded default>"
    assert f"config: {expected}" in r.out
    if expected == "<embedded default>":
        assert "broker: listen mqtt://127.0.0.1:1883" in r.out
        assert f"-> fieldmq/{socket.gethostname()}/system (json)" in r.out


def test_config_lookup_order_is_flag_then_environment(cli, write_config):
    from_env = write_config('[gateway]\nid = "from-env"\n', "env.toml")
    from_flag = write_config('[gateway]\nid = "from-flag"\n', "flag.toml")
    env = {"FIELDMQ_CONFIG": str(from_env)}
    from conftest import clean_env

    assert "gateway: id from-env," in cli("check", env=clean_env(**env)).out
    assert "gateway: id from-flag," in cli("check", "--config", from_flag, env=clean_env(**env)).out
    missing = cli("check", env=clean_env(FIELDMQ_CONFIG="/nonexistent/fieldmq.toml"))
    assert missing.code == 2
    assert "/nonexistent/fieldmq.toml: cannot read the config: No such file or directory" in missing.err


def messages(out: str):
    pairs = []
    for line in out.splitlines():
        topic, _, payload = line.partition(" ")
        pairs.append((topic, payload))
    return pairs


def test_test_polls_the_default_config_once_and_prints_what_it_would_publish(cli):
    r = cli("test")
    assert r.code == 0, r.err
    host = socket.gethostname()
    pairs = messages(r.out)
    assert (f"fieldmq/{host}/system/status", "online") in pairs
    readings = [json.loads(p) for t, p in pairs if t == f"fieldmq/{host}/system"]
    assert len(readings) == 1, r.out
    reading = readings[0]
    assert list(reading) == ["node", "ts", "attributes", "units"]
    assert reading["node"] == "system"
    assert TS.match(reading["ts"]), reading["ts"]
    attributes = reading["attributes"]
    for name in ("load_1m", "load_5m", "load_15m", "mem_used", "mem_available", "disk_free", "uptime", "process_rss"):
        assert isinstance(attributes[name], (int, float)), name
    assert reading["units"]["mem_used"] == "MiB"
    assert reading["units"]["uptime"] == "s"
    # Real values of this machine: memory used plus available is its total.
    total_mib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024
    assert abs(attributes["mem_used"] + attributes["mem_available"] - total_mib) < 1
    assert "1 device polled, 0 failed" in r.err


def test_test_reports_a_failing_device_and_exits_1_while_others_answer(cli, write_config, tmp_path):
    path = write_config(
        '[gateway]\nid = "gw"\ndata_dir = "data"\n'
        '[[device]]\nname = "host"\nkind = "system"\nformat = "value"\n'
        '[[device]]\nname = "usb"\nkind = "system"\ndisks = { usb = "mnt/usb" }\n'
    )
    r = cli("test", "--config", path)
    assert r.code == 1
    pairs = dict(messages(r.out))
    assert pairs["fieldmq/gw/host/status"] == "online"
    assert float(pairs["fieldmq/gw/host/load_1m"]) >= 0
    assert "fieldmq/gw/usb" not in pairs
    assert pairs["fieldmq/gw/usb/status"] == f"error: disk usb ({tmp_path}/mnt/usb): No such file or directory (os error 2)"
    assert f"error: device usb: disk usb ({tmp_path}/mnt/usb): No such file or directory" in r.err
    assert "2 devices polled, 1 failed" in r.err
    # `test` publishes nothing and creates nothing.
    assert not (tmp_path / "data").exists()


def test_test_refuses_a_bad_config_with_exit_2(cli, write_config):
    path = write_config('[[device]]\nname = "x"\nkind = "sistem"\n')
    r = cli("test", "--config", path)
    assert r.code == 2
    assert f"error: {path}:3:8: invalid value: string \"sistem\", expected one of" in r.err
