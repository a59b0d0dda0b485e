"""Small shared types imported everywhere (kept free of heavy imports): one home per concept.

Every list of accepted names (config keys, CLI choices, control commands)
derives from the enums here, so adding a mode means adding one member.
``CacheMode`` values are stored in the control segment and ``Pooling``
values travel on the wire: never renumber them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


def _either(labels: Sequence[str]) -> str:
    """``"a, b or c"``: how error messages list the accepted names."""
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"


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


class CacheMode(enum.IntEnum):
    """Embedding-cache policy: off, fixed capacity, or adaptive (grows when idle, shrinks under load).

    Integer values are stored in the control segment (runtime area, cache
    row).  ``CacheMode("fixed")`` works as well as ``CacheMode(1)``, so code
    written against the older string enum (``PolicyMode``) keeps working.
    """

    OFF = 0
    FIXED = 1
    ADAPTIVE = 2

    @classmethod
    def _missing_(cls, value: object) -> CacheMode | None:
        if isinstance(value, str):
            return cls.__members__.get(value.upper())
        return None

    @classmethod
    def parse(cls, value: CacheMode | str | int) -> CacheMode:
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown cache policy {value!r} (expected {_either(cls.labels())})") from None
        return cls(value)

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        """The names operators type, in the order help texts list them (adaptive, fixed, off)."""
        return tuple(m.label for m in reversed(list(cls)))

    @property
    def label(self) -> str:
        return self.name.lower()


class CreditMode(str, enum.Enum):
    """How an engine gets credits: a separate priority connection (FlexEMR), in-band, or no flow control."""

    PRIORITY = "priority"
    INBAND = "inband"
    OFF = "off"

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class MappingMode(str, enum.Enum):
    """Connection-to-engine mapping: each connection owned by one engine (FlexEMR), or shared by all."""

    OWNED = "owned"
    SHARED = "shared"

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)
