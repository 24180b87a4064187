"""The floor of any ZeroMQ design: a bare XSUB/XPUB ``zmq.proxy`` in its own process.

    python -m bench.zmq_floor ipc://IN ipc://OUT

Binds both endpoints, prints ``ready`` on stdout, and forwards until SIGTERM (whose
default action is all the clean-up it needs). High-water marks are castra's (``Settings.hwm``), so the two proxies queue alike.
"""

from __future__ import annotations

import sys

import zmq

from castra_zmq.config import DEFAULTS


def main() -> None:
    publish_endpoint, subscribe_endpoint = sys.argv[1:3]
    context = zmq.Context()
    frontend = context.socket(zmq.XSUB)
    backend = context.socket(zmq.XPUB)
    for sock in (frontend, backend):
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = DEFAULTS.hwm
    frontend.bind(publish_endpoint)
    backend.bind(subscribe_endpoint)
    print("ready", flush=True)
    zmq.proxy(frontend, backend)


if __name__ == "__main__":
    main()
