"""The baseline receiver: a plain ``recv_into`` loop into a fresh numpy array.

Run as a separate process, like mignet's receiver, so both pay the same first-touch page
faults and process start-up; prints one JSON line when listening and one when done.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from mignet.bench.procstat import peak_rss
from mignet.guest.ram import allocate_guest_memory


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, required=True)
    args = p.parse_args()
    server = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"event": "listening", "uri": f"tcp:127.0.0.1:{server.getsockname()[1]}"}), flush=True)
    conn, _ = server.accept()
    server.close()
    t0 = time.monotonic()
    ram = allocate_guest_memory(args.size)  # the same memory mignet's receiver gets
    view = ram.data
    got = 0
    while got < args.size:
        n = conn.recv_into(view[got:])
        if n == 0:
            print(json.dumps({"event": "failed", "received": got}), flush=True)
            return 1
        got += n
    seconds = time.monotonic() - t0
    print(json.dumps({"event": "completed", "seconds": seconds, "bytes": got,
                      "peak_rss": peak_rss()}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
