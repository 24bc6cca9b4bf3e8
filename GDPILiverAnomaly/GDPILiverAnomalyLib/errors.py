"""Exceptions the engine raises; their messages are meant for the user, one line each."""


class GDPIError(Exception):
    """Base class: a problem the user can fix (bad input, bad parameter, bad checkpoint)."""


class InputError(GDPIError):
    """An input image or mask is missing, unreadable or unsuitable."""


class CheckpointError(GDPIError):
    """A checkpoint is missing, corrupt or does not match its metadata."""


class ParameterError(GDPIError):
    """A parameter is out of range."""


class OutputError(GDPIError):
    """The output folder cannot be written."""


class Cancelled(Exception):
    """The job was cancelled cooperatively; nothing was written."""


def os_error_message(exc: OSError) -> str:
    """One line for a file-system failure: what went wrong (``disk full`` for ENOSPC),
    on which path(s)."""
    import errno

    reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}.get(
        exc.errno, exc.strerror or str(exc) or type(exc).__name__
    )
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason
