"""Control path: the shared-memory control segment, its command mailbox, commands and their dispatcher.

Who uses what:

* supervisor: ``ControlBlock.create`` / ``unlink``; ``MailboxServer(block).serve_one(Dispatcher(self), t)``;
  writes process facts (``engines[i].set_process``, ``set_inference``, ``servers[i].set_process`` for
  local embedding servers), the owner map
  (``set_owner``, ``runtime.publish``) and rates (``update_rates``).
* engine i: ``ControlBlock.attach``; ``engines[i].update(...)``, ``engines[i].conn(c).update(...)``;
  polls ``runtime.epoch`` between batches.
* inference: ``ranker.update`` (with the failover counters), ``servers[i].update``, ``cache.update``,
  ``add_tables``; polls ``runtime.epoch``.
* emrctl: ``ControlBlock.attach(...).snapshot()`` and ``MailboxClient(block).request(cmd)``.

Nothing here imports torch, prometheus_client or click; the data path never
imports this package.
"""

from __future__ import annotations

from flexemr.control.block import (
    CacheMode,
    ControlBlock,
    EngineState,
    InstanceNotRunning,
    Row,
    RuntimeState,
    apply_rates,
)
from flexemr.control.commands import (
    COMMANDS,
    SIGNAL_COMMANDS,
    BadCommand,
    CachePolicy,
    CacheResize,
    Command,
    Migrate,
    Rebalance,
    Reload,
    Shutdown,
    Status,
    parse_size,
)
from flexemr.control.dispatch import Dispatcher
from flexemr.control.mailbox import ControlTimeout, MailboxClient, MailboxServer

__all__ = [
    "COMMANDS", "SIGNAL_COMMANDS", "BadCommand", "CacheMode", "CachePolicy", "CacheResize", "Command",
    "ControlBlock", "ControlTimeout", "Dispatcher", "EngineState", "InstanceNotRunning", "MailboxClient", "MailboxServer",
    "Migrate", "Rebalance", "Reload", "Row", "RuntimeState", "Shutdown", "Status", "apply_rates", "parse_size",
]
