"""The model directory contract (DESIGN.md): spec, tables, dense weights."""

from flexemr.model.spec import ModelSpec, TableSpec, load_spec, write_spec

__all__ = ["ModelSpec", "TableSpec", "load_spec", "write_spec"]
