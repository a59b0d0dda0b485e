"""The one exception of the cluster tool: its message is what the operator reads."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2     # not root, bad option, missing tool: nothing was changed


class ClusterError(Exception):
    """A cluster operation failed; ``str(e)`` names what is wrong.  ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
