"""emrctl's connection to a running instance: stats straight from the segment, commands via the mailbox.

``status`` never round-trips through the supervisor: it maps the control
segment and copies the rows (lock-free seqlock reads), so it answers even when
the supervisor is busy.  Commands go through the mailbox and wait for the
supervisor's answer.
"""

from __future__ import annotations

from typing import Any

from flexemr.control.block import ControlBlock, InstanceNotRunning
from flexemr.control.commands import Command
from flexemr.control.mailbox import DEFAULT_TIMEOUT_S, MailboxClient
from flexemr.errors import ControlError


class CommandFailed(ControlError):
    """The daemon answered ``{"status": "error"}``; ``result`` is the whole answer."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        super().__init__(str(result.get("error") or f"{result.get('cmd', 'command')} failed"))


class DaemonClient:
    """Attach lazily to instance ``instance``; use as a context manager."""

    def __init__(self, instance: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.instance = instance
        self.timeout = timeout
        self._block: ControlBlock | None = None
        self._mailbox: MailboxClient | None = None

    @property
    def block(self) -> ControlBlock:
        """The attached segment; InstanceNotRunning if absent or left by a dead supervisor."""
        if self._block is None:
            block = ControlBlock.attach(self.instance)
            if not block.supervisor_alive():
                name, pid = block.name, block.supervisor_pid
                block.close()
                raise InstanceNotRunning(f"flexemr instance {self.instance!r} is not running (supervisor pid "
                                         f"{pid} is gone; stale control segment {name})")
            self._block = block
        return self._block

    def snapshot(self, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The status dict (see ControlBlock.snapshot); rates from ``previous`` when given."""
        return self.block.snapshot(previous)

    def send(self, command: Command) -> dict[str, Any]:
        """Run ``command`` in the daemon; returns its ok result, raises CommandFailed on an error result."""
        if self._mailbox is None:
            self._mailbox = MailboxClient(self.block)
        result = self._mailbox.request(command.to_dict(), timeout=self.timeout)
        if result.get("status") != "ok":
            raise CommandFailed(result)
        return result

    def close(self) -> None:
        if self._mailbox is not None:
            self._mailbox.close()
            self._mailbox = None
        if self._block is not None:
            self._block.close()
            self._block = None

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
