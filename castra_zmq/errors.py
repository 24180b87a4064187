"""One exception root for everything castra-zmq raises on purpose.

Every error carries a short machine-readable ``reason``: it is what a guest sees in
``error: <reason>`` or in an error ack, and what the CLI prints.

Runs in: every process.
"""


class CastraError(Exception):
    """Root of castra-zmq's own errors; ``reason`` is safe to show to a peer."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class HandshakeError(CastraError):
    """The hello line is refused; the connection gets ``error: <reason>`` and closes."""


class FrameError(CastraError):
    """A frame cannot be decoded.

    ``fatal`` is true when the stream itself can no longer be trusted (a length
    violation): the session is closed after the error frame.
    """

    def __init__(self, reason: str, *, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


class FrameRejected(CastraError):
    """A well-formed JSON object that is not a valid frame of a known ``type``.

    The session stays open and the guest gets an error ack for ``frame_type``.
    """

    def __init__(self, frame_type: str, reason: str):
        super().__init__(reason)
        self.frame_type = frame_type


class ConfigError(CastraError):
    """A setting is invalid (bad state root, port, policy...)."""


class UnsafeStateRoot(ConfigError):
    """The state root, a directory in it or one above it could be changed by another
    user (wrong owner, writable by others, a symbolic link): castra refuses to use it."""


class RouterBusy(CastraError):
    """Another router owns the state root, or the listen address is taken."""


class RouterUnavailable(CastraError):
    """No router answers on the state root's ipc endpoints."""


class PublishFailed(CastraError):
    """A publish was not committed to the bus log (error ack or no ack in time)."""


class LogWriteFailed(CastraError):
    """A commit could not be written to the bus logs and was cut back off them:
    its publishes get ``log_write_failed: <why>`` (``reason``)."""
