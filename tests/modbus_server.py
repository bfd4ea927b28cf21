"""A Modbus server for the tests: pymodbus, started as its own process.

Usage: python modbus_server.py PORT SPEC.json      (TCP on 127.0.0.1:PORT, any unit id)
       python modbus_server.py /dev/pts/N SPEC.json [UNITS [BAUD]]  (RTU, units 1..UNITS, default 1; 9600 baud)
SPEC: {"holding": {"0": 1234, ...}, "input": {...}, "coil": {"0": true}, "discrete": {...}}
with 0-based addresses as on the wire. Registers 0..299 (bits 0..99) exist;
anything beyond answers exception 02 (illegal data address). Prints "ready"
once listening; stops on SIGTERM.
"""

import json
import sys

from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext, ModbusSlaveContext
from pymodbus.framer import FramerType
from pymodbus.server import StartSerialServer, StartTcpServer


def block(values, size):
    data = [0] * size
    for address, value in values.items():
        data[int(address)] = value
    # pymodbus 3.8 with ModbusSlaveContext: request address N is block address N+1.
    return ModbusSequentialDataBlock(1, data)


def main():
    where = sys.argv[1]
    spec = json.loads(open(sys.argv[2]).read())
    store = ModbusSlaveContext(
        hr=block(spec.get("holding", {}), 300),
        ir=block(spec.get("input", {}), 300),
        co=block({k: int(v) for k, v in spec.get("coil", {}).items()}, 100),
        di=block({k: int(v) for k, v in spec.get("discrete", {}).items()}, 100),
    )
    if where.startswith("/"):
        # Units 1..UNITS only: a request for another unit finds nobody.
        units = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        context = ModbusServerContext(slaves={u: store for u in range(1, units + 1)}, single=False)
        print("ready", flush=True)
        baud = int(sys.argv[4]) if len(sys.argv) > 4 else 9600
        StartSerialServer(context=context, framer=FramerType.RTU, port=where, baudrate=baud)
    else:
        context = ModbusServerContext(slaves=store, single=True)
        print("ready", flush=True)
        StartTcpServer(context=context, address=("127.0.0.1", int(where)))


if __name__ == "__main__":
    main()
