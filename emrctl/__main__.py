"""``python -m emrctl``: the same as the ``emrctl`` console script."""

from __future__ import annotations

from emrctl.cli import main

if __name__ == "__main__":
    main()
