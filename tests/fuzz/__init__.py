"""Fuzz suite: hostile frames against a live cluster (marked slow; see README.md)."""
