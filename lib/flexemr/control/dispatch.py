"""One dispatcher for every source of control commands: emrctl's mailbox and the supervisor's signals.

``Dispatcher(target)`` turns a command (a :class:`~flexemr.control.commands.Command`
or its dict form) into a call of ``target.cmd_<name>(command)`` and always
returns a result dict, never raises::

    {"status": "ok", "cmd": "migrate", ...what the handler returned}
    {"status": "error", "cmd": "migrate", "error": "no engine 7 (engines: 0-1)"}

Handlers are plain methods, so tests call them directly; they report failure
by raising (ValueError / ControlError for expected problems: their message is
the whole error; anything else is logged with its traceback) or by returning a
dict with ``"status": "error"``.  Each command logs one INFO line with its
source, arguments, outcome and duration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flexemr.control.commands import SIGNAL_COMMANDS, BadCommand, Command
from flexemr.errors import ControlError

logger = logging.getLogger(__name__)


class Dispatcher:
    """Maps commands onto ``target.cmd_<name>(command) -> dict | None``."""

    def __init__(self, target: object) -> None:
        self.target = target

    def __call__(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The :class:`~flexemr.control.mailbox.MailboxServer` handler: a request from emrctl."""
        return self.dispatch(request, source="emrctl")

    def dispatch_signal(self, signame: str) -> dict[str, Any]:
        """Route a signal (``"SIGHUP"`` or ``"hup"``) through the same path as emrctl's commands."""
        key = signame.upper()
        key = key if key.startswith("SIG") else "SIG" + key
        command = SIGNAL_COMMANDS.get(key)
        if command is None:
            logger.info("signal %s has no command", key)
            return {"status": "error", "error": f"signal {key} has no command"}
        return self.dispatch(command, source=key)

    def dispatch(self, command: Command | Mapping[str, Any], source: str = "emrctl") -> dict[str, Any]:
        """Run one command and return its result dict (``status`` is ``ok`` or ``error``)."""
        start = time.perf_counter()
        try:
            cmd = command if isinstance(command, Command) else Command.from_dict(command)
        except (BadCommand, TypeError) as e:
            logger.info("command from %s rejected: %s", source, e)
            return {"status": "error", "cmd": _name_of(command), "error": str(e)}
        handler = getattr(self.target, "cmd_" + cmd.name, None)
        if not callable(handler):
            result: dict[str, Any] = {"status": "error", "cmd": cmd.name,
                                      "error": f"this daemon does not support {cmd.name!r}"}
        else:
            try:
                result = _wrap(cmd.name, handler(cmd))
            except (ControlError, ValueError) as e:
                result = {"status": "error", "cmd": cmd.name, "error": str(e)}
            except Exception as e:  # a handler bug must not take the supervisor down
                logger.exception("%s from %s failed", cmd.describe(), source)
                result = {"status": "error", "cmd": cmd.name, "error": f"{cmd.name} failed: {type(e).__name__}: {e}"}
        ms = (time.perf_counter() - start) * 1e3
        if result["status"] == "ok":
            logger.info("%s from %s: ok (%.1f ms)", cmd.describe(), source, ms)
        else:
            logger.info("%s from %s: error: %s (%.1f ms)", cmd.describe(), source, result.get("error"), ms)
        return result


def _wrap(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {"status": "ok", "cmd": name}
    if isinstance(value, Mapping):
        out = {"status": "ok", "cmd": name, **value}
        if out["status"] not in ("ok", "error"):
            out["status"] = "ok"
        if out["status"] == "error":
            out.setdefault("error", f"{name} failed")
        return out
    return {"status": "ok", "cmd": name, "result": value}


def _name_of(command: object) -> str | None:
    if isinstance(command, Mapping):
        name = command.get("cmd")
        return name if isinstance(name, str) else None
    return None
