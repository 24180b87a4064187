"""castra-zmq: the host side of the Castra guest bus.

Roles, one module each: ``bridge`` (guest TCP and host publishes; single writer
of ``bus.log``), ``proxy`` (ZeroMQ XSUB/XPUB), ``journal`` (the logger: per-VM
logs derived from ``bus.log``), ``status`` (per-VM table) and
``supervisor`` (``castra up``). Protocol types live in ``wire``, ``handshake``,
``framing`` and ``topics``; every path is derived in ``endpoints``.
"""

__version__ = "0.1.0"
