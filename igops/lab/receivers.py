"""Local stand-ins for PagerDuty's Events API v2 and Pingdom's API 3.1.

One process serves both, each on its own address. They validate requests the way the real
services document, record every request as a JSON line (and in memory for
GET /_lab/requests), and take injected faults (POST /_lab/faults {"status": 429, "count": 2})
so that monitoring code can be tested against retries and outages. The Pingdom stand-in
really probes its checks, but only on loopback addresses: no traffic leaves the machine.

Run: python -m igops.lab.receivers --pagerduty ADDR:PORT --pingdom ADDR:PORT --record-dir DIR
(tokens from IGOPS_PAGERDUTY_ROUTING_KEY and IGOPS_PINGDOM_TOKEN).

The receivers are in pagerduty_receiver.py and pingdom_receiver.py, what they share (the
Receiver base, its recording and faults, the HTTP handler) in receiver_base.py.
"""

from __future__ import annotations

import argparse
import os
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from igops.lab.pagerduty_receiver import PagerDuty
from igops.lab.pingdom_receiver import Pingdom
from igops.lab.receiver_base import handler_for


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m igops.lab.receivers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pagerduty", required=True, type=_address, metavar="ADDR:PORT")
    parser.add_argument("--pingdom", required=True, type=_address, metavar="ADDR:PORT")
    parser.add_argument("--record-dir", required=True, type=Path)
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=5.0,
        help="seconds between Pingdom probes of each check (the real service: minutes)",
    )
    args = parser.parse_args(argv)
    args.record_dir.mkdir(parents=True, exist_ok=True)
    pagerduty = PagerDuty(args.record_dir, os.environ.get("IGOPS_PAGERDUTY_ROUTING_KEY"))
    pingdom = Pingdom(args.record_dir, os.environ.get("IGOPS_PINGDOM_TOKEN"), args.probe_interval)
    servers = [
        ThreadingHTTPServer(args.pagerduty, handler_for(pagerduty)),
        ThreadingHTTPServer(args.pingdom, handler_for(pingdom)),
    ]
    for server in servers:
        server.daemon_threads = True
    threading.Thread(target=pingdom.probe_forever, name="pingdom-prober", daemon=True).start()
    threading.Thread(target=servers[0].serve_forever, name="pagerduty", daemon=True).start()
    servers[1].serve_forever()


if __name__ == "__main__":
    main()
