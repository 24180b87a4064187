"""castra-zmq: the host side of the Castra guest bus.

Roles, one module each: ``bridge`` (guest TCP), ``proxy`` (ZeroMQ XSUB/XPUB),
``journal`` (single writer of the bus log), ``status`` (per-VM table) and
``supervisor`` (``castra up``). Protocol types live in ``wire``, ``handshake``,
``framing`` and ``topics``; every path is derived in ``endpoints``.
"""

__version__ = "0.1.0"
