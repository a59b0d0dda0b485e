"""DATA PATH: range routing of ids to embedding servers and combining of partial pools."""

from flexemr.routing.split import ServerPart, SplitPlan, combine_partials, split_batch
from flexemr.routing.table import RoutingTable, Shard

__all__ = ["RoutingTable", "Shard", "ServerPart", "SplitPlan", "split_batch", "combine_partials"]
