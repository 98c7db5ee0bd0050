"""The server's refusals: UserErrors that carry their HTTP status.

Every one is answered as JSON with a one-line message; any other exception is a bug, answered
500 with its traceback in a file."""
from __future__ import annotations

from ..errors import UserError


class HTTPRefusal(UserError):
    status = 400


class PathRefused(HTTPRefusal):
    """A path or name that leaves the home folder, or that could (.., absolute, symlink, encoded)."""
    status = 400


class NotFound(HTTPRefusal):
    status = 404


class Conflict(HTTPRefusal):
    """The thing exists, or another job writes the same files, or the worker is busy with it."""
    status = 409


class TooLarge(HTTPRefusal):
    status = 413


class Unavailable(HTTPRefusal):
    """The worker is not running (shutting down, or its model failed to load)."""
    status = 503


def status_of(e: BaseException) -> int:
    """HTTP status of a refusal: its own, else 400 for any other UserError (a bad setting)."""
    return getattr(e, "status", 400)
