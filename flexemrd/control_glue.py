"""Glue between the ranker's processes and the control path (status, commands).

Kept apart from the data-path modules: engines and the inference process get
a ``publish`` callback / hooks from here and never import the control path
themselves.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class SupervisorControl:
    """Supervisor side: owns the shared resources and serves emrctl commands."""

    def __init__(self, plan, resources) -> None:
        self.plan = plan
        self.resources = resources
        self.supervisor = None

    def create(self) -> None:
        self.resources.create()

    def unlink(self) -> None:
        self.resources.unlink()

    def on_ready(self, sup) -> None:
        pass

    def tick(self, sup) -> None:
        pass

    def on_child_exit(self, child, code: int) -> None:
        pass


def engine_publisher(plan, engine_id: int):
    return None


def inference_hooks(plan):
    return None
