"""The ``castra`` command: a thin click layer over ``castra_zmq``."""
