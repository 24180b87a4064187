"""``castra up``: start and supervise the router in the foreground."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from castra_zmq.config import DEFAULTS, LOG_LEVELS, Settings
from castra_zmq.errors import CastraError
from castra_zmq.runtime import setup_logging
from castra_zmq.supervisor import Supervisor
from castra_zmq.terminal import wants_color

from .options import split_servers, state_root_option, uplink_security_options


@click.command()
@state_root_option
@click.option("--host", default=DEFAULTS.host, show_default=True,
              help="Address guests connect to. Anything but loopback is logged as a warning.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULTS.port, show_default=True,
              help="TCP port for guests (0 picks a free one).")
@click.option("--fsync", type=click.Choice(["batch", "never"]), default=DEFAULTS.fsync, show_default=True,
              help="batch: fsync every group commit before acking; never: leave it to the OS.")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.1), default=DEFAULTS.heartbeat_timeout, show_default=True,
              help="Seconds of silence after which a bus session is closed.")
@click.option("--handshake-timeout", type=click.FloatRange(min=0.1), default=DEFAULTS.handshake_timeout, show_default=True,
              help="Seconds a new connection has to send its hello line.")
@click.option("--commit-timeout", type=click.FloatRange(min=0.1), default=DEFAULTS.commit_timeout, show_default=True,
              help="Kept for compatibility, no effect: the bridge commits each publish in the "
                   "loop turn that read it, and host tools set their own deadline.")
@click.option("--subscriber-queue", "subscriber_queue_bytes", type=click.IntRange(min=1024),
              default=DEFAULTS.subscriber_queue_bytes, show_default=True,
              help="Bytes queued to one guest (acks, replies, deliveries): past half, its socket is "
                   "not read; past all, it is reset as slow_consumer.")
@click.option("--slow-consumer-timeout", type=click.FloatRange(min=0.1), default=DEFAULTS.slow_consumer_timeout,
              show_default=True,
              help="Seconds a guest may leave over half its --subscriber-queue unread before it is "
                   "reset as slow_consumer.")
@click.option("--queue-bytes", type=click.IntRange(min=1024 * 1024), default=DEFAULTS.queue_bytes,
              show_default=True,
              help="Bytes one internal queue may hold for one host-side peer (a subscriber, a bridge): "
                   "what it cannot hold is dropped.")
@click.option("--max-vm-logs", "vm_logs_max", type=click.IntRange(min=1), default=DEFAULTS.vm_logs_max,
              show_default=True,
              help="Per-VM log files in logs/bus/; VMs past it are logged in bus.log only.")
@click.option("--identities", "identities_file", type=click.Path(dir_okay=False, exists=True),
              help="Allow-list of VM names, one a line, each optionally with a secret and topic "
                   "grants (`beta token=s3cr3t subscribe=vm:*,metrics publish=alerts*`); others get "
                   "`error: unknown vm`.")
@click.option("--max-connections", type=click.IntRange(min=1), default=DEFAULTS.max_connections,
              show_default=True, help="Guest connections open at once.")
@click.option("--max-per-address", "max_connections_per_address", type=click.IntRange(min=0),
              default=DEFAULTS.max_connections_per_address, show_default=True,
              help="Guest connections from one source address (0: no cap; guests behind QEMU "
                   "user networking all come from 127.0.0.1).")
@click.option("--max-sessions-per-vm", type=click.IntRange(min=1), default=DEFAULTS.max_sessions_per_vm,
              show_default=True,
              help="Bus sessions one VM name may hold at once (its agent, a publish...); a hello past it "
                   "gets `error: too many sessions for this vm`. A guest reset without closing its "
                   "connections keeps its sessions until --heartbeat-timeout: leave room for them.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=DEFAULTS.log_level,
              metavar=f"[{'|'.join(LOG_LEVELS)}]", envvar="CASTRA_LOG_LEVEL", show_default=True, show_envvar=True,
              help="Least severe level logged: INFO has sessions, subscriptions and refusals; DEBUG "
                   "adds a line per publish.")
@click.option("--log-json", is_flag=True,
              help="Log one JSON object a line (time, level, role, message and the fields), for log shippers.")
@click.option("--uplink", "uplink_servers", metavar="nats://HOST:PORT[,...]", callback=split_servers,
              help="Share messages with the other hosts through the NATS JetStream stream CASTRA on "
                   "these servers (an uplink process). Without it, no uplink.")
@click.option("--host-name",
              help="This host's name in the fleet, with --uplink: its uploads go under castra.v1.<name>. "
                   "[default: this machine's host name]")
@uplink_security_options
def up(state_root: Path, identities_file: str | None, **options) -> None:
    """Start the router (proxy, journal, status, bridge) and supervise it.

    Prints one line when guests can connect, restarts any process that dies, and
    stops everything cleanly on Ctrl-C or SIGTERM. Logs go to stderr, levels in
    colour on a terminal (not with NO_COLOR set or TERM=dumb).

    \b
    Examples:
      castra up
      castra up --state-root /tmp/castra --port 7071
      castra up --log-level DEBUG                              # a line per publish too
      castra up --log-json 2>>router.jsonl                     # for a log shipper
      CASTRA_STATE_ROOT=/srv/castra castra up --host 0.0.0.0   # beyond loopback
      castra up --uplink nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222
      CASTRA_UPLINK_PASSWORD=$(cat /etc/castra/nats-pass) castra up --host-name a \\
          --uplink nats://n1:4222,nats://n2:4222 --uplink-user castra-a --uplink-tls-ca /etc/castra/nats-ca.pem
      castra up --host-name a --uplink nats://n1:4222 --uplink-creds /etc/castra/a.creds
    """
    if options["uplink_servers"] is not None and options["host_name"] is None:
        options["host_name"] = socket.gethostname()
    # Option names are Settings field names: the rest pass straight through.
    settings = Settings(
        state_root=str(state_root),
        identities_file=str(Path(identities_file).absolute()) if identities_file else None,
        log_color=wants_color(sys.stderr),
        **options,
    )
    setup_logging("supervisor", settings)
    try:
        supervisor = Supervisor(settings)
        supervisor.start()
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    click.echo(f"castra router ready on {supervisor.listen} (state root {supervisor.endpoints.state_root})",
               err=False)
    supervisor.run()
