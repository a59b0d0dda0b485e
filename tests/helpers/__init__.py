"""Helpers the test suites share: daemon processes (daemons.py) and checked client load (load.py)."""
