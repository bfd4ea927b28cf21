#!/usr/bin/env python3
"""Relays bytes between two serial ends (ptys), paced at a baud rate.

A pty pair moves bytes instantly; a real RS-485 line takes 11 bits per byte
(start, 8 data, parity or second stop, stop). This relay sits between the
gateway's pty pair and the device's, and releases each byte no sooner than
11/BAUD seconds after the previous one in the same direction, so a cycle
measured through it is a cycle at that baud rate.

Usage: serial_relay.py GATEWAY_SIDE DEVICE_SIDE BAUD
"""

import os
import select
import sys
import termios
import time
import tty


def raw(path):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def main():
    a, b, baud = raw(sys.argv[1]), raw(sys.argv[2]), int(sys.argv[3])
    per_byte = 11.0 / baud
    # Per direction: bytes waiting, and when the wire is free again.
    pending = {a: bytearray(), b: bytearray()}
    free_at = {a: 0.0, b: 0.0}
    peer = {a: b, b: a}
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        waits = []
        for src in (a, b):
            buf = pending[src]
            if not buf:
                continue
            start = max(free_at[src], now)
            # Bytes whose time on the wire has passed go out together.
            due = 0 if start > now else min(len(buf), int((now - start) / per_byte) + 1)
            if due:
                os.write(peer[src], bytes(buf[:due]))
                del buf[:due]
                free_at[src] = start + due * per_byte
            if buf:
                waits.append(max(free_at[src], now) + per_byte - now)
        timeout = min(waits) if waits else 1.0
        readable, _, _ = select.select([a, b], [], [], max(0.0, timeout))
        for src in readable:
            try:
                data = os.read(src, 4096)
            except BlockingIOError:
                continue
            if not pending[src] and free_at[src] < time.monotonic():
                free_at[src] = time.monotonic()
            pending[src] += data


if __name__ == "__main__":
    main()
