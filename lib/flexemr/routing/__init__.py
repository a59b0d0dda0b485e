"""DATA PATH: range routing of ids to embedding servers and combining of partial pools."""

from __future__ import annotations

from flexemr.routing.combine import Accumulator, combine_partials
from flexemr.routing.split import ServerPart, SplitPlan, split_batch
from flexemr.routing.table import RoutingTable, Shard

__all__ = ["Accumulator", "RoutingTable", "Shard", "ServerPart", "SplitPlan", "split_batch", "combine_partials"]
