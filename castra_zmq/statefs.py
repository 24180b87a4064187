"""The state root on disk, trusted only once no other user can redirect it.

``castra up`` often runs as root, and a state root is only a path: whoever can
rename a directory on that path, or plant a symbolic link in it, decides where
root's lock, logs and snapshots are written and which sockets its host tools
talk to. So:

* Every directory above the state root (symbolic links on the way are followed,
  and the directories they lead through are checked too) belongs to root or to
  the effective uid, and is not writable by group or others unless it is sticky
  (as ``/tmp`` is: there only an entry's owner may rename it). Otherwise its
  owner, or anyone who may write to it, could move the state root away and put
  their own in its place.
* The state root and its directories (``run/``, ``logs/``, ``logs/bus/``,
  ``state/``) are real directories (not symbolic links) owned by the effective
  uid. ``castra up`` makes them 0700 and refuses a symbolic link, or an entry
  owned by another user, inside them; host tools change nothing and refuse a
  directory that group or others may write to.
* Files are opened with ``O_NOFOLLOW`` (a symbolic link is refused, never
  followed) and ``O_NONBLOCK`` (a FIFO in place of a file does not hang the
  reader), and must be regular files. A file castra writes must also be owned
  by the effective uid and have no other hard link.
* Small files (``router.json``, ``journal.json``, ``status.json``) are replaced
  whole: written to a new temp file (``O_EXCL``: never an existing file or
  link), made 0600 on its descriptor, synced, renamed over the old one (a
  rename replaces a symbolic link; it does not write through it).

Directories are walked by descriptor (``openat``), so a check and the use that
follows it see the same directory.

Runs in: every process that opens a file under the state root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from pathlib import Path

from .errors import UnsafeStateRoot

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_MAX_SYMLINKS = 40  # what the kernel follows in one path
_ABOVE = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC  # traversal needs x, not r, on others' directories
_OWN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


# -- directories ----------------------------------------------------------------------


def check_state_root(state_root: Path, private_dirs: Sequence[Path], *, prepare: bool) -> bool:
    """Whether ``state_root`` and its ``private_dirs`` (each listed after its parent)
    exist; raises ``UnsafeStateRoot`` when another user could change them.

    With ``prepare`` (``castra up``), what is missing is made (0700), the
    directories are set to 0700 and their entries are checked; it returns True.
    Without (host tools, before they connect to a socket by its path), nothing is
    changed, and False means a directory is missing: no router ever ran there.
    """
    euid = os.geteuid()
    with ExitStack() as cleanup:
        above = _open_above(state_root, euid, create=prepare)
        if above is None:
            return False
        cleanup.callback(os.close, above)
        opened: dict[Path, int | None] = {}
        for directory in (state_root, *private_dirs):
            holder = above if directory == state_root else opened[directory.parent]
            fd = None if holder is None else _open_own(holder, directory, euid, prepare)
            if fd is not None:
                cleanup.callback(os.close, fd)
            opened[directory] = fd
        if prepare:
            for directory in private_dirs:
                _refuse_links_and_strangers(opened[directory], directory, euid)
        return None not in opened.values()


def _open_above(state_root: Path, euid: int, *, create: bool) -> int | None:
    """A descriptor (``O_PATH``) of the directory holding ``state_root``, each
    directory on the way checked; None if one is missing and not ``create``."""
    if state_root.name in ("", ".."):
        raise UnsafeStateRoot(f"state root {state_root} must end in a directory name")
    pending = list(state_root.parts[1:-1])
    where = Path("/")
    fd = os.open("/", _ABOVE)
    try:
        _check_above(fd, where, state_root, euid)
        links = 0
        while pending:
            name = pending.pop(0)
            try:
                child = os.open(name, _ABOVE | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                _make_dir(fd, name, where / name)
                pending.insert(0, name)  # open what is there now, as any other entry
                continue
            except OSError as exc:
                if not _is_link(fd, name):
                    raise _unusable(where / name, exc) from None
                # A symbolic link: go on from where it leads, checking that way too.
                links += 1
                if links > _MAX_SYMLINKS:
                    raise _unusable(where / name, OSError(errno.ELOOP, os.strerror(errno.ELOOP))) from None
                target = Path(os.readlink(name, dir_fd=fd))
                if target.is_absolute():
                    os.close(fd)
                    fd, where = os.open("/", _ABOVE), Path("/")
                pending[:0] = target.parts[1:] if target.is_absolute() else target.parts
                continue
            os.close(fd)
            fd = child
            where = where.parent if name == ".." else where / name
            _check_above(fd, where, state_root, euid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_above(fd: int, where: Path, state_root: Path, euid: int) -> None:
    info = os.fstat(fd)
    if info.st_uid not in (0, euid):
        raise UnsafeStateRoot(
            f"refusing state root {state_root}: {where} above it belongs to uid {info.st_uid}, "
            "who could move the state root away; choose a state root in a directory of yours"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise UnsafeStateRoot(
            f"refusing state root {state_root}: {where} above it may be written by group or others "
            "and is not sticky, so they could move the state root away; choose a state root in a "
            "directory of yours"
        )


def _open_own(holder: int, directory: Path, euid: int, prepare: bool) -> int | None:
    """A descriptor of ``directory`` (in ``holder``), which must be ours and private."""
    name = directory.name
    if prepare:
        _make_dir(holder, name, directory)
    try:
        fd = os.open(name, _OWN, dir_fd=holder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if _is_link(holder, name):
            raise UnsafeStateRoot(f"refusing {directory}: it is a symbolic link; castra follows none "
                                  "in its state root") from None
        raise _unusable(directory, exc) from None
    try:
        info = os.fstat(fd)
        if info.st_uid != euid:
            raise UnsafeStateRoot(
                f"refusing {directory}: it belongs to uid {info.st_uid}, not to uid {euid} (you), "
                "who could swap its sockets and files; use a state root of your own"
            )
        if prepare:
            if stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE:
                os.fchmod(fd, PRIVATE_DIR_MODE)
        elif info.st_mode & 0o022:
            raise UnsafeStateRoot(f"refusing {directory}: group or others may write to it, so they "
                                  "could swap its sockets and files; `castra up` makes it 0700")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_links_and_strangers(fd: int, directory: Path, euid: int) -> None:
    """Refuse a symbolic link, or another user's entry, left in one of our
    directories (from a time it was open to others)."""
    with os.scandir(fd) as entries:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise UnsafeStateRoot(f"refusing {directory / entry.name}: it is a symbolic link; castra "
                                      "follows none in its state root (remove it)")
            if info.st_uid != euid:
                raise UnsafeStateRoot(f"refusing {directory / entry.name}: it belongs to uid {info.st_uid}, "
                                      f"not to uid {euid} (you) (remove it)")


def _make_dir(dir_fd: int, name: str, path: Path) -> None:
    try:
        os.mkdir(name, PRIVATE_DIR_MODE, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _unusable(path, exc) from None


def _unusable(path: Path, exc: OSError) -> UnsafeStateRoot:
    if exc.errno == errno.ENOTDIR:
        return UnsafeStateRoot(f"refusing {path}: it is not a directory")
    return UnsafeStateRoot(f"cannot use {path}: {exc.strerror}")


# -- files --------------------------------------------------------------------------


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = PRIVATE_FILE_MODE) -> int:
    """``os.open`` that follows no symbolic link and accepts only a regular file.

    A refusal is an ``OSError`` (``ELOOP`` for a link, ``EPERM`` for the rest),
    so it takes the same path as any other failure to open.
    """
    try:
        fd = os.open(path, flags | _FILE, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "symbolic link refused", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file", str(path))
    return fd


def open_private(path: Path, flags: int, mode: int = PRIVATE_FILE_MODE) -> int:
    """``open_regular`` for a file castra writes: it must also be ours, and
    linked nowhere else (a hard link planted to another file would be written)."""
    fd = open_regular(path, flags, mode)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_nlink != 1:
        os.close(fd)
        why = "owned by another user" if info.st_uid != os.geteuid() else "has other hard links"
        raise OSError(errno.EPERM, why, str(path))
    return fd


def read_regular(path: Path) -> bytes:
    """The content of the regular file at ``path`` (no symbolic link followed)."""
    with open(open_regular(path), "rb") as file:
        return file.read()


def replace_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with a file holding ``data`` (0600), all or nothing.

    The temp file ``<name>.tmp`` beside it is made new (``O_EXCL``); one left by
    a crash, or a link planted in its place, is removed first, never written
    through. ``sync`` fsyncs the data before the rename.
    """
    tmp = path.with_name(path.name + ".tmp")
    with suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # the umask only narrows the mode asked for; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
