"""
Fresh-connection C{PING} round trips: connect, send C{PING}, read the
C{PONG} line.  Standard library only, so that it also runs as a script in a
process of its own (measure 8 runs it beside the load driver, so that the
driver's event loop never delays a sample):

    python pinger.py PORT COUNT SPACING_S

prints one JSON line: {"samples": [seconds, ...], "errors": n}.
"""

from __future__ import annotations

import json
import socket
import sys
import time

#: Bound for one round trip.
PING_TIMEOUT = 5.0


def ping_once(port: int, timeout: float = PING_TIMEOUT) -> float:
    """Seconds from C{connect} to the whole C{PONG} line on a fresh connection."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"PING\n")
        data = b""
        while b"\n" not in data:
            chunk = s.recv(256)
            if not chunk:
                raise ConnectionError(f"port {port} closed the connection before PONG")
            data += chunk
        elapsed = time.perf_counter() - start
    if not data.startswith(b"PONG "):
        raise ConnectionError(f"port {port} answered {data!r} to PING")
    return elapsed


def ping_many(port: int, count: int, spacing: float = 0.0) -> tuple[list[float], int]:
    """C{count} round trips, C{spacing} seconds apart; the samples and the failures."""
    samples: list[float] = []
    errors = 0
    for i in range(count):
        if spacing and i:
            time.sleep(spacing)
        try:
            samples.append(ping_once(port))
        except OSError:
            errors += 1
    return samples, errors


if __name__ == "__main__":
    port, count, spacing = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    samples, errors = ping_many(port, count, spacing)
    print(json.dumps({"samples": samples, "errors": errors}), flush=True)
