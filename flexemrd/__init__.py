"""flexemrd: the flexemr daemon (supervisor, engines, inference, embedding server)."""
