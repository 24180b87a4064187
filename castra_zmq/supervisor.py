"""The supervisor (``castra up``): owns the state root and the role processes.

Start-up: prepare ``<state_root>`` (0700; refused when another user could change
it, see ``statefs``), take ``run/router.lock`` so one router owns it, bind the
guest port (so a taken port is refused before anything starts, and a restarted
bridge inherits the same listening socket without dropping queued connections),
then start proxy, journal, status, bridge (and with ``--uplink`` the uplink) in
that order, each waiting for its ready line. Roles are forked from this process
once it has imported them all (``roleprocess``): a start or restart costs a fork,
not an interpreter. A role that exits is restarted with back-off; on
SIGINT/SIGTERM the roles stop in reverse order.
``run/router.json`` tells ``castra status`` the listen address, uptime and each
role's state.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import select
import signal
import subprocess
import time

import msgspec
from loguru import logger

from .config import Settings
from .errors import CastraError, RouterBusy
from .events import now_ms
from .identity import load_identities
from .listener import LISTEN_FD_ENV, bind_listener
from .owner import RoleState, RouterInfo, UplinkInfo, read_router_info, router_pid
from .roleprocess import RoleProcess, is_role_process, preload
from .runtime import READY_FD_ENV
from .statefs import open_private, replace_file
from .uplinkconnect import PASSWORD_ENV, connect_options

ROLES = ("proxy", "journal", "status", "bridge")
UPLINK = "uplink"  # with --uplink only: last, once the bridge commits (federation, issue 14)
_READY_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_STABLE_AFTER = 10.0  # a role up this long has its back-off reset
_CHECK_INTERVAL = 0.05  # seconds between looks at the roles


class Role:
    def __init__(self, name: str):
        self.name = name
        self.process: RoleProcess | None = None
        self.ready_fd = -1
        self.state = RoleState(state="stopped")
        self.started = 0.0
        self.backoff = _BACKOFF_MIN
        self.restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings.validate()
        self.endpoints = settings.endpoints
        self.role_names = ROLES + ((UPLINK,) if settings.uplink_servers is not None else ())
        self.roles = {name: Role(name) for name in self.role_names}
        # In router.json: `castra bus tail --fleet` reaches NATS as the uplink does.
        self.uplink_info = None if settings.uplink_servers is None else msgspec.convert(
            {field: getattr(settings, field) for field in UplinkInfo.__struct_fields__}, UplinkInfo)
        self.lock_fd: int | None = None
        self.listener = None
        self.stopping = False
        self.signalled = -1  # turns readable on SIGINT/SIGTERM (see start)
        self.started_ms = now_ms()

    @property
    def listen(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- start-up ---------------------------------------------------------------------

    def start(self) -> None:
        self.signalled, wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.handle_signal)
        signal.signal(signal.SIGINT, self.handle_signal)
        load_identities(self.settings.identities_file)  # refuse a bad file here, not in a restart loop
        if self.settings.uplink_servers is not None:
            connect_options(self.settings)  # the same for the uplink's credential and TLS files
        self.endpoints.prepare()
        self.take_lock()
        self.reap_orphans()
        try:
            self.listener = bind_listener(self.settings.host, self.settings.port)
        except OSError as exc:
            self.release()
            if exc.errno == errno.EADDRINUSE:
                raise RouterBusy(
                    f"{self.settings.host}:{self.settings.port} is already in use; "
                    "stop what listens there or choose another --port"
                ) from None
            raise CastraError(f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror}") from None
        if not is_loopback(self.settings.host):
            logger.warning("listening beyond loopback: any host that can reach this address can connect",
                           listen=self.listen)
        preload(self.role_names)
        for name in self.role_names:
            role = self.roles[name]
            self.spawn(role)
            if not self.wait_ready(role):
                self.stop()
                raise CastraError(f"the {name} process did not start; see the log lines above")
        self.write_info()

    def take_lock(self) -> None:
        try:
            fd = open_private(self.endpoints.lock_file, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise CastraError(f"cannot open {self.endpoints.lock_file}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = router_pid(self.endpoints)
            raise RouterBusy(
                f"another router (pid {pid}) already owns {self.endpoints.state_root}; "
                "stop it first, or use another --state-root"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def reap_orphans(self) -> None:
        """Stop roles a killed supervisor left behind (its router.json names them).

        They got SIGTERM from the kernel when it died (see ``runtime.die_with_parent``)
        and are finishing; a bridge among them still holds the port, so wait for
        them, and kill those that do not go.
        """
        stale = read_router_info(self.endpoints)
        if stale is None:
            return
        orphans = [state.pid for name, state in stale.processes.items()
                   if state.pid and is_role_process(state.pid, name)]
        deadline = time.monotonic() + _STOP_TIMEOUT
        for pid in orphans:
            while process_runs(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process_runs(pid):
                logger.bind(pid=pid, reason="left by a killed router").warning("killing orphaned role")
                os.kill(pid, signal.SIGKILL)

    def spawn(self, role: Role) -> None:
        """Start ``role``'s process; ``wait_ready`` waits for its ready line."""
        read_end, write_end = os.pipe()
        env = dict(os.environ, **self.settings.to_env(), **{READY_FD_ENV: str(write_end)})
        if role.name != UPLINK:
            env.pop(PASSWORD_ENV, None)  # a secret only where it is used
        fds = [write_end]
        if role.name == "bridge":
            env[LISTEN_FD_ENV] = str(self.listener.fileno())
            fds.append(self.listener.fileno())
        try:
            role.process = RoleProcess.start(role.name, env, fds)
        finally:
            os.close(write_end)
        role.started = time.monotonic()
        role.ready_fd = read_end
        role.restart_at = None
        role.state.state = "starting"
        role.state.pid = role.process.pid

    def wait_ready(self, role: Role) -> bool:
        """Wait for the role's ready line; False if it exits or times out first."""
        fd = role.ready_fd
        try:
            ready = readable_within(fd, _READY_TIMEOUT) and os.read(fd, 64).startswith(b"ready")
        finally:
            os.close(fd)
        role.state.state = "running" if ready else "failed"
        logger.bind(pid=role.process.pid).log("INFO" if ready else "ERROR",
                                              f"{role.name} {'ready' if ready else 'failed to start'}")
        return ready

    # -- supervision ------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping:
            self.check_roles()
            # Not a sleep: that goes on after a signal's handler ran.
            if readable_within(self.signalled, _CHECK_INTERVAL):
                os.read(self.signalled, 64)
        self.stop()

    def handle_signal(self, signum, _frame) -> None:
        if not self.stopping:
            logger.info("stopping", reason=signal.Signals(signum).name)
        self.stopping = True

    def check_roles(self) -> None:
        now = time.monotonic()
        for role in self.roles.values():
            if role.restart_at is not None:
                if now >= role.restart_at and not self.stopping:
                    self.spawn(role)
                    role.state.restarts += 1
                    self.wait_ready(role)
                    self.write_info()
                continue
            code = role.process.poll() if role.process else None
            if code is None:
                continue
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if now - role.started >= _STABLE_AFTER:
                role.backoff = _BACKOFF_MIN
            role.restart_at = now + role.backoff
            logger.bind(pid=role.process.pid, reason=how).warning(
                f"{role.name} died; restarting in {role.backoff:.1f}s")
            role.backoff = min(role.backoff * 2, _BACKOFF_MAX)
            role.state = RoleState(state="restarting", restarts=role.state.restarts, last_exit=how)
            self.write_info()

    def write_info(self) -> None:
        info = RouterInfo(
            pid=os.getpid(),
            listen=self.listen,
            state_root=str(self.endpoints.state_root),
            started_ms=self.started_ms,
            processes={name: role.state for name, role in self.roles.items()},
            uplink=self.uplink_info,
        )
        replace_file(self.endpoints.router_info, msgspec.json.encode(info))

    # -- shutdown ---------------------------------------------------------------------

    def stop(self) -> None:
        for name in reversed(self.role_names):
            role = self.roles[name]
            process = role.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            if not exits_within(process, _STOP_TIMEOUT):
                logger.bind(pid=process.pid, reason="no exit after SIGTERM").warning(f"killing {name}")
                process.kill()
                process.wait()
            role.state = RoleState(state="stopped", restarts=role.state.restarts)
        self.release()
        logger.info("router stopped")

    def release(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        endpoints = self.endpoints
        for path in (endpoints.router_info, endpoints.publish_socket, endpoints.subscribe_socket,
                     endpoints.status_socket, endpoints.journal_socket):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # drops the flock
            self.lock_fd = None


def exits_within(process: subprocess.Popen | RoleProcess, timeout: float) -> bool:
    """Whether ``process`` exits within ``timeout`` seconds; True as soon as it does
    (``Popen.wait`` looks with sleeps growing to 50 ms, for each role in turn)."""
    try:
        exit_fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): look every 10 ms
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return process.poll() is not None
    try:
        readable_within(exit_fd, timeout)
    finally:
        os.close(exit_fd)
    return process.poll() is not None


def readable_within(fd: int, timeout: float) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds. poll, not select:
    select refuses a descriptor numbered 1024 or more, which a process with many
    files open (a test worker, a tool that runs routers) may be given."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def process_runs(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
