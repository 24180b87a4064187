"""``castra`` commands for the tests, forked from an interpreter that has already
imported castra-zmq, instead of started as ``python -m castra_zmq.cli.main``.

Why: the suite starts about 200 routers and as many CLI commands, and each fresh
interpreter spends about 0.25 s of CPU starting and importing (click, pyzmq,
msgspec, loguru, uvloop) before it does anything the test looks at; on two cores
that was a third of the suite. A fork of a process that did those imports once runs
the same code (``castra_zmq.cli.main`` as ``__main__``, the same argv, environment,
working directory and standard streams) at a few milliseconds each. ``castra up``
forks its roles the same way (``castra_zmq.roleprocess``).

The zygote is a single-threaded process, one per test process, started on first
use. Over a SOCK_SEQPACKET socket pair the test side sends a command (JSON) with
its three standard streams (``SCM_RIGHTS``); the zygote forks, answers the child's
pid, and once the child has exited (a pidfd per child) its status, as
``Popen.returncode`` gives it (``-N``: killed by signal N). ``Command`` offers the
members of ``subprocess.Popen`` the tests use.

The guest command (``python -m castra_zmq.guest``, stdlib only) is forked the same
way (``guest_command``): ``tests/test_guest.py`` starts about sixty of them, each
0.15 s of CPU as a fresh interpreter.

Tests of what only a fresh interpreter shows (the ``castra`` console script, import
errors, ``python -m`` itself) start one the usual way.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

_MODULE = "castra_zmq.cli.main"
GUEST_MODULE = "castra_zmq.guest"
_MESSAGE_MAX = 1 << 20  # one command: its argv and environment


# -- the zygote process ---------------------------------------------------------------


def _preload() -> None:
    """Import what ``castra up`` and the CLI import, with no thread and no ZeroMQ
    context made (a fork keeps only the calling thread)."""
    import importlib

    from castra_zmq.roleprocess import preload

    for command in ("main", "bus", "publish", "status", "tail", "up"):  # main's group loads them lazily
        importlib.import_module(f"castra_zmq.cli.{command}")
    importlib.import_module("castra_zmq.fleettail")  # tail --fleet's, with nats-py
    importlib.import_module(GUEST_MODULE)
    from castra_zmq.supervisor import ROLES, UPLINK

    preload((*ROLES, UPLINK))


def _run_child(command: dict, streams: list[int]) -> None:
    """In the forked child: become ``python -m <module> <argv>`` (``castra_zmq.cli.main``
    or ``castra_zmq.guest``). Never returns."""
    code = 1
    try:
        for target, fd in enumerate(streams):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(command["cwd"])
        os.environ.clear()
        os.environ.update(command["env"])
        if command["sigint_ignored"]:  # as a shell starts `cmd &`: Python then keeps SIG_IGN
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if command["new_session"]:  # Popen(start_new_session=True)
            os.setsid()
        # As ``python -m``: the module is ``__main__`` and argv[0] its file (click
        # names the program from both: "python -m castra_zmq.cli.main").
        module = sys.modules[command["module"]]
        sys.modules["__main__"] = module
        sys.argv = [module.__file__, *command["argv"]]
        try:
            # castra_zmq.cli.main raises SystemExit; castra_zmq.guest's main returns
            # the status (``sys.exit(main())`` under ``__main__``).
            code = module.main() or 0
        except SystemExit as exit_:  # what the interpreter makes of it
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as an uncaught exception: its traceback, status 1
            import traceback

            traceback.print_exc()
        # What interpreter shutdown does for a fresh process: join its threads, run atexit.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    finally:
        os._exit(code)


def _serve(channel: socket.socket) -> None:
    children: dict[int, int] = {}  # pidfd -> pid
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is channel:
                data, fds, _flags, _addr = socket.recv_fds(channel, _MESSAGE_MAX, 3)
                if not data:  # the test process is gone
                    return
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                pid = os.fork()
                if pid == 0:
                    channel.close()
                    _run_child(json.loads(data), fds)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                selector.register(pidfd, selectors.EVENT_READ)
                channel.send(json.dumps({"started": pid}).encode())
            else:
                pidfd = key.fileobj
                selector.unregister(pidfd)
                pid = children.pop(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                channel.send(json.dumps({"exited": pid, "returncode": _returncode(status)}).encode())


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# -- the test side ----------------------------------------------------------------------


class Command:
    """A command the zygote started: ``subprocess.Popen``'s ``pid``, ``stdin``,
    ``stdout``, ``stderr``, ``returncode``, ``poll``, ``wait``, ``send_signal``,
    ``terminate`` and ``kill``."""

    def __init__(self, pid: int, stdin, stdout, stderr):
        self.pid = pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self.exited = threading.Event()

    def poll(self) -> int | None:
        if self.returncode is None and _has_exited(self.pid):
            self.exited.wait(5.0)  # the zygote reaps it and tells, at once
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"castra (pid {self.pid})", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # exited and reaped since (Popen.send_signal ignores it too)
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> tuple:
        """Write ``input``, read stdout and stderr to their ends (on threads, as
        Popen does), wait for the exit."""
        results: dict[str, bytes] = {}

        def drain(name: str, stream) -> None:
            results[name] = stream.read()
            stream.close()

        readers = [threading.Thread(target=drain, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        if self.stdin is not None:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass
        self.wait(timeout)
        for reader in readers:
            reader.join(timeout)
        return results.get("stdout"), results.get("stderr")


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` ended (a zombie the zygote has not reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


class Zygote:
    """The test process's side: starts the zygote, sends it commands, and turns its
    exit notes into ``Command.returncode``."""

    def __init__(self):
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests import zygote; zygote.main(int(sys.argv[1]))",
             str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
        )
        theirs.close()
        self.lock = threading.Lock()  # one command started at a time
        self.started: list[int] = []
        self.started_event = threading.Condition()
        self.commands: dict[int, Command] = {}
        self.early_exits: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True, name="zygote-reader").start()

    def _read(self) -> None:
        while True:
            data = self.channel.recv(4096)
            if not data:
                return
            note = json.loads(data)
            with self.started_event:
                if "started" in note:
                    self.started.append(note["started"])
                    self.started_event.notify_all()
                    continue
                command = self.commands.pop(note["exited"], None)
                if command is None:  # exited before run() registered it
                    self.early_exits[note["exited"]] = note["returncode"]
                    continue
            command.returncode = note["returncode"]
            command.exited.set()

    def run(self, argv: list[str], *, stdin=None, stdout=None, stderr=None, env=None, cwd=None,
            sigint_ignored: bool = False, new_session: bool = False, module: str = _MODULE) -> Command:
        """Start ``python -m <module> <argv>`` (``castra <argv>`` by default).
        ``stdin``/``stdout``/``stderr``: ``None`` (this process's), ``subprocess.PIPE``,
        ``subprocess.DEVNULL``, a file object or a descriptor, as with Popen;
        ``sigint_ignored``: started with SIGINT ignored; ``new_session``: in a session
        (and process group) of its own."""
        mine, theirs = [], []
        for target, how in enumerate((stdin, stdout, stderr)):
            ours, child = _stream(target, how)
            mine.append(ours)
            theirs.append(child)
        command_text = json.dumps({"argv": list(argv), "env": dict(os.environ if env is None else env),
                                   "cwd": str(cwd or os.getcwd()), "sigint_ignored": sigint_ignored,
                                   "new_session": new_session, "module": module}).encode()
        try:
            with self.lock, self.started_event:
                socket.send_fds(self.channel, [command_text], [fd for fd, _ in theirs])
                if not self.started_event.wait_for(lambda: self.started, timeout=10):
                    raise RuntimeError("the zygote did not start the command")
                pid = self.started.pop(0)
                command = Command(pid, *mine)
                if pid in self.early_exits:
                    command.returncode = self.early_exits.pop(pid)
                    command.exited.set()
                else:
                    self.commands[pid] = command
        finally:
            for fd, close in theirs:
                if close:
                    os.close(fd)
        return command


def _stream(target: int, how) -> tuple:
    """(our end as a file object or None, (the child's fd, whether to close it here))."""
    if how is None:
        return None, (target, False)
    if how == subprocess.PIPE:
        read, write = os.pipe()
        if target == 0:
            return os.fdopen(write, "wb"), (read, True)
        return os.fdopen(read, "rb"), (write, True)
    if how == subprocess.DEVNULL:
        return None, (os.open(os.devnull, os.O_RDWR), True)
    if isinstance(how, int):
        return None, (how, False)
    return None, (how.fileno(), False)


_zygote: Zygote | None = None
_zygote_pid: int | None = None


def castra_command(argv: list[str], **streams) -> Command:
    """``python -m castra_zmq.cli.main <argv>``, forked from this test process's zygote."""
    global _zygote, _zygote_pid
    if _zygote is None or _zygote_pid != os.getpid() or _zygote.process.poll() is not None:
        _zygote, _zygote_pid = Zygote(), os.getpid()
    return _zygote.run(argv, **streams)


def guest_command(argv: list[str], **streams) -> Command:
    """``python -m castra_zmq.guest <argv>`` (``castra-guest``), forked from the zygote."""
    return castra_command(argv, module=GUEST_MODULE, **streams)


def run_castra(argv: list[str], input: str | bytes | None = None, timeout: float = 30, env=None,
               text: bool = True, module: str = _MODULE, cwd=None) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, <module>, *argv], input=input, capture_output=True,
    text=text, timeout=timeout, cwd=cwd)``, forked from the zygote (``castra <argv>``
    by default)."""
    command = castra_command(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, module=module, cwd=cwd)
    if isinstance(input, str):
        input = input.encode()
    try:
        out, err = command.communicate(input, timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.wait(5)
        raise
    if text:
        out, err = out.decode(), err.decode()
    return subprocess.CompletedProcess(argv, command.returncode, out, err)


def main(fd: int) -> None:
    _preload()
    _serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    main(int(sys.argv[1]))
