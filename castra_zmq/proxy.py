"""The proxy role: one ZeroMQ XSUB/XPUB proxy, the bus every other role attaches to.

Publishers (bridge, journal, status, CLI, host tools) connect PUB sockets to the
XSUB side (``run/bus-in.sock``); subscribers connect SUB sockets to the XPUB side
(``run/bus-out.sock``). High-water marks are sized above the total publish credit
in flight, so normal load never drops; see ARCHITECTURE.md.
"""

from __future__ import annotations

import os
import threading

import zmq
from loguru import logger

from . import runtime
from .config import Settings, settings_from_env


def run(settings: Settings) -> None:
    endpoints = settings.endpoints
    context = zmq.Context()
    frontend = context.socket(zmq.XSUB)
    backend = context.socket(zmq.XPUB)
    for sock in (frontend, backend):
        sock.linger = 0
        sock.sndhwm = settings.hwm
        sock.rcvhwm = settings.hwm
    # Owner-only socket files: set the umask around bind.
    previous = os.umask(0o077)
    try:
        frontend.bind(endpoints.publish)
        backend.bind(endpoints.subscribe)
    finally:
        os.umask(previous)
    stopping = threading.Event()

    def stop() -> None:
        stopping.set()
        context.term()  # makes zmq.proxy return with ContextTerminated

    # The proxy blocks in C; run it in a thread so the main thread can take signals.
    def serve() -> None:
        try:
            zmq.proxy(frontend, backend)
        except zmq.ContextTerminated:
            pass
        finally:
            frontend.close(linger=0)
            backend.close(linger=0)

    thread = threading.Thread(target=serve, name="proxy", daemon=True)
    thread.start()
    runtime.stop_on_signals(lambda: threading.Thread(target=stop, daemon=True).start())
    logger.info("proxy ready", publish=endpoints.publish, subscribe=endpoints.subscribe)
    runtime.notify_ready()
    while thread.is_alive():
        thread.join(0.5)
    logger.info("proxy stopped")


def main() -> None:
    runtime.setup_logging("proxy")
    runtime.die_with_parent()
    run(settings_from_env())


if __name__ == "__main__":
    main()
