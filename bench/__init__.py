"""Benchmarks: ``python -m bench`` races castra-zmq against mosquitto, NATS and a bare
ZeroMQ proxy (see ``bench/__main__.py``); never part of the test run."""
