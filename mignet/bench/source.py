"""A benchmark source process: sends one stream and prints its timing as JSON.

Separate from ``mignet send`` so a benchmark can ask for shapes the CLI does not offer
(a device-heavy guest) without growing the user-facing command.
"""

from __future__ import annotations

import argparse
import json
import sys

from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.savevm import Sender
from mignet.transport import connect
from mignet.units import parse_size


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("uri", help="where to send; '-': print 'ready' once the guest exists, then "
                               "read the URI from stdin (so the benchmark can time what follows)")
    p.add_argument("--size", default="2G")
    p.add_argument("--fill", default="random")
    p.add_argument("--blobs", type=int, default=0, help="64 KiB device sections to add")
    args = p.parse_args()
    ram = GuestRam.generate(parse_size(args.size), args.fill, seed=5)
    devices = DeviceSet.heavy(args.blobs, seed=5) if args.blobs else DeviceSet.example(5)
    uri = args.uri
    if uri == "-":
        print("ready", flush=True)
        uri = sys.stdin.readline().strip()
    channel = connect(uri)
    stats = Sender(channel, ram, devices).run()
    channel.close()
    print(json.dumps({"seconds": stats.elapsed, "transferred": stats.transferred,
                      "ram": ram.total}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
