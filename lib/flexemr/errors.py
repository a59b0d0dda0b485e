"""Exception hierarchy shared by every flexemr process.

Data-path code returns status values for expected conditions (a full ring, a
busy connection) and raises only for broken invariants or bad input.
"""

from __future__ import annotations


class FlexemrError(Exception):
    """Base class of every flexemr error."""


class ConfigError(FlexemrError):
    """A configuration file or flag is invalid; the message names the key."""


class ModelError(FlexemrError):
    """A model directory is invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid model directory:\n  " + "\n  ".join(self.problems))


class RequestError(FlexemrError):
    """A request is malformed or out of range; the message names the field."""


class ProtocolError(FlexemrError):
    """A wire frame is malformed (bad magic, version, size or layout).

    ``code`` is the wire ErrorCode to answer with (BAD_FRAME by default).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        self.code = code
        super().__init__(message)


class RemoteError(FlexemrError):
    """A peer answered with an error frame."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class DeadlineExceeded(RemoteError, TimeoutError):
    """The request ran out of time; the message names the stage (queue, embedding servers, client)."""


class ControlError(FlexemrError):
    """A control command failed or the daemon could not be reached."""
