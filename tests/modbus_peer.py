"""A pymodbus device for end-to-end tests: tests/modbus_server.py started on
a free loopback port with a register spec, read back with pymodbus's own
client, stopped by PID."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from upstream_peer import free_port

HERE = Path(__file__).resolve().parent


class ModbusDevice:
    """tests/modbus_server.py (pymodbus) on a port of its own."""

    def __init__(self, spec: dict, folder: Path):
        self.port = free_port()
        path = Path(folder) / "modbus-spec.json"
        path.write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "modbus_server.py"), str(self.port), str(path)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "the pymodbus server did not start"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the pymodbus server does not listen on {self.port}")
                time.sleep(0.05)

    def holding(self, address) -> int:
        """Reads a holding register with pymodbus's own client."""
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=self.port)
        assert client.connect()
        try:
            return client.read_holding_registers(address, count=1, slave=1).registers[0]
        finally:
            client.close()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
