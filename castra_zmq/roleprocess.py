"""A role process forked from the supervisor, which imported every role first.

A role started as ``python -m castra_zmq.<role>`` spends about 0.25 s of CPU on a
new interpreter and its imports (pyzmq, msgspec, loguru, uvloop) before it does
anything: most of ``castra up``'s start-up, all of a restart's. The supervisor
imports the roles' modules once (``preload``, before it has a thread or a ZeroMQ
context, so a fork copies nothing half-done) and forks each role from there: a
start or restart costs a fork. The child starts a session of its own, gets
/dev/null on stdin, keeps only stdout, stderr and the descriptors it is given,
takes the environment it is given (its settings, ready and start pipes) and runs
``castra_zmq.<role>.main()``; it never returns into the supervisor's code.

Its name (``/proc/<pid>/comm``, what ``top`` and ``ps -o comm`` show) is
``castra-<role>``, which is also how a later supervisor recognises a role left
behind (``is_role_process``); ``ps aux`` shows ``castra-<role> (castra up ...)``.

Runs in: the supervisor (``castra up``), and for a moment in each forked role.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import NoReturn

import setproctitle

_NAME_MAX = 15  # the kernel keeps 16 bytes of a thread's name, the NUL included


def process_name(role: str) -> str:
    return f"castra-{role}"[:_NAME_MAX]


def preload(roles: Iterable[str]) -> None:
    """Import each role's module (and with it everything it imports) now, in the
    supervisor, so that forked roles start with them."""
    for role in roles:
        importlib.import_module(f"castra_zmq.{role}")


class RoleProcess:
    """The handful of ``subprocess.Popen``'s members the supervisor uses
    (``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``), for a
    role forked by ``start``."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, role: str, env: Mapping[str, str], pass_fds: Iterable[int]) -> RoleProcess:
        for stream in (sys.stdout, sys.stderr):  # or the child would write it again
            stream.flush()
        pid = os.fork()
        if pid == 0:
            _become_role(role, env, pass_fds)
        return cls(pid)

    def poll(self) -> int | None:
        """The exit code (minus the signal's number if killed), None while it runs."""
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        return self._reap(0)

    def _reap(self, options: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, options)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # a reaped pid may be another process's by now
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def is_role_process(pid: int, role: str) -> bool:
    """Whether ``pid`` still runs ``role`` (a pid may have been reused)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read().rstrip(b"\n") == process_name(role).encode()
    except OSError:
        return False


def _become_role(role: str, env: Mapping[str, str], pass_fds: Iterable[int]) -> NoReturn:
    code = 1
    try:
        os.setsid()  # Ctrl-C reaches the supervisor only: it stops roles in order
        # Before the environment changes: setproctitle moves it to make room.
        setproctitle.setproctitle(f"{process_name(role)} (castra {' '.join(sys.argv[1:])})")
        setproctitle.setthreadtitle(process_name(role))  # the title's first 15 bytes otherwise
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        _close_all_but({0, 1, 2, *pass_fds})
        os.environ.clear()
        os.environ.update(env)
        importlib.import_module(f"castra_zmq.{role}").main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever it is, the child must not return into the supervisor
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # not the supervisor's atexit handlers, not its stack


def _close_all_but(keep: set[int]) -> None:
    start = 0
    for fd in sorted(keep):
        if start < fd:  # closerange(n, n) would close everything (close_range(n, -1))
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))

