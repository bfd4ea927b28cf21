"""End-to-end harness: the real `fieldmq` binary, started as a user would.

Every test gets its own temporary directory for configs and data; gateway
processes are started with a clean environment (no FIELDMQ_CONFIG, no
RUST_LOG unless the test sets it) and always stopped by PID afterwards.
"""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fieldmq_bin() -> str:
    path = os.environ.get("FIELDMQ_BIN") or str(ROOT / "target" / "debug" / "fieldmq")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no fieldmq binary at {path}: run `cargo build --bin fieldmq` or scripts/test")
    return path


def clean_env(**extra) -> dict:
    ours = ("FIELDMQ_CONFIG", "RUST_LOG", "NOTIFY_SOCKET", "STATE_DIRECTORY", "XDG_STATE_HOME", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr


@pytest.fixture
def cli(fieldmq_bin, tmp_path):
    """Runs a fieldmq command to completion: cli("check", "--config", f)."""

    def run(*args, env=None, timeout=30) -> Result:
        proc = subprocess.run(
            [fieldmq_bin, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
            env=env or clean_env(),
        )
        return Result(proc)

    return run


class Gateway:
    """A running `fieldmq run`, its stderr collected line by line."""

    def __init__(self, bin_path, config, cwd, env):
        args = [bin_path, "run"] + (["--config", str(config)] if config else [])
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=10.0, after=0) -> re.Match:
        """Waits for a log line matching `pattern` (a regex) at index >= after."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line matching {pattern!r} within {timeout}s:\n{self.log()}")
                self._cond.wait(min(left, 0.1))

    def count(self, pattern) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def send(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Sends `sig`; returns (exit code, seconds it took to exit)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - start
        self._reader.join(timeout=2)
        return code, elapsed

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def gateway(fieldmq_bin, tmp_path):
    """Starts gateways: gateway(config_path_or_None, RUST_LOG="debug")."""
    started = []

    def start(config=None, **env) -> Gateway:
        gw = Gateway(fieldmq_bin, config, tmp_path, clean_env(**env))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.kill()


@pytest.fixture
def write_config(tmp_path):
    """Writes a config file in the test's directory and returns its path."""

    def write(text: str, name="fieldmq.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write

