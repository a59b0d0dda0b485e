"""LOOKUP frames of a batch's parts: one encoding for the first send, hedges and re-issues.

The batcher sends a part first; the completion thread may send copies of it
(a hedge to a second replica, a re-issue after a lost connection, a retry
after UNKNOWN_VERSION).  A copy must ask for exactly what the first send
asked for, or the answer depends on which replica won: the same partials'
precision (fp16/bf16 flags), the same id width (int32 when every table of
the part has fewer than 2^31 rows), the same model version, the same
credit trailer.  Only the request id and the deadline budget (the time left
*now*) differ.  Both threads therefore encode through one ``LookupEncoder``.
"""

from __future__ import annotations

from flexemr.model.spec import ModelSpec
from flexemr.wire import codec

from flexemrd.inference.batch import Batch, Part

__all__ = ["LookupEncoder"]


class LookupEncoder:
    """Encodes any copy of a part of a batch as a LOOKUP frame (buffers, header first)."""

    __slots__ = ("partials", "inband_credits", "_flags", "_narrow")

    def __init__(self, spec: ModelSpec, partials: str = "fp32", inband_credits: bool = False) -> None:
        self.partials = partials
        self.inband_credits = inband_credits
        self._flags = codec.partials_flags(partials)   # LOOKUP flags asking for f16/bf16 partials
        # Ids of tables under 2^31 rows travel as int32 (admission checked every id against its table).
        self._narrow = [t.rows <= 2**31 for t in spec.tables]

    def encode(self, rid: int, batch: Batch, part: Part, budget_us: int | None = None) -> list:
        """The LOOKUP of ``part`` under request id ``rid``, for ``batch``'s model version.

        ``budget_us`` is the deadline budget to carry; None takes what is left
        of the batch's deadline now (the batcher passes one value for all the
        first sends of a batch).
        """
        return codec.encode_lookup(rid, batch.size, part.tables, part.counts, part.values,
                                   flags=self._flags, credit_trailer=self.inband_credits,
                                   budget_us=batch.budget_us() if budget_us is None else budget_us,
                                   version=batch.version,
                                   narrow_ids=all(self._narrow[t] for t in part.tables))
