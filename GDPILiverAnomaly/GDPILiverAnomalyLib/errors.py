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
