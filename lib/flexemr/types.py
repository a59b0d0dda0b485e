"""Small shared types imported everywhere (kept free of heavy imports)."""

from __future__ import annotations

import enum


class Pooling(enum.IntEnum):
    """Pooling mode of an embedding table (values travel on the wire)."""

    SUM = 0
    MEAN = 1
    MAX = 2

    @classmethod
    def parse(cls, name: str) -> "Pooling":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown pooling mode {name!r} (expected sum, mean or max)") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class Interaction(str, enum.Enum):
    """Feature interaction of the DLRM top half."""

    DOT = "dot"
    CAT = "cat"
