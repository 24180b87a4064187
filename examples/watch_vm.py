"""Print every message addressed to one VM, one line each, as it arrives.

A host tool built on ``castra_zmq.client``: it subscribes to ``vm:<name>`` on the
router's ipc bus (no TCP, no handshake) and prints ``seq``, sender, topic and the
payload's JSON. Start a router first, then run it next to it:

    castra up &
    python examples/watch_vm.py alpha
    castra bus publish --topic vm:alpha --payload '{"cmd":"reload"}'   # in another shell

It sees what is committed after it started; older messages are in the log
(``castra bus tail --vm alpha``). ``--count N`` exits after N messages, Ctrl-C
at any time; ``--state-root`` picks the router as for ``castra``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from castra_zmq import client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print every message addressed to one VM as it arrives.")
    parser.add_argument("vm", help="the VM's name, as `castra status` shows it")
    parser.add_argument("--state-root", help="the router's state root (default: $CASTRA_STATE_ROOT "
                                             "or ~/.local/state/castra)")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    args = parser.parse_args(argv)

    messages = client.subscribe([f"vm:{args.vm}"], state_root=args.state_root)
    try:
        for message in itertools.islice(messages, args.count):
            payload = bytes(message.payload).decode("utf-8", "replace")
            print(f"seq={message.seq} from={message.sender} topic={message.topic} {payload}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        messages.close()  # closes the socket and its context now, not at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
