"""flexemr: disaggregated serving for embedding recommendation models.

The importable core shared by the daemon (``flexemrd``) and the admin CLI
(``emrctl``): model directory, wire format, routing, rings, transports,
control segment, cache.  Nothing here forks, installs signal handlers or exits.
"""

__version__ = "0.1.0"
