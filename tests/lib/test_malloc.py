"""retain_freed_memory: glibc takes the thresholds; bad thresholds are refused.

Its effect (the ranker's CPU per 1,000 lookups ~20-30% lower: fewer page faults and unmaps per batch) is
measured by the ranker benchmark (docs/PERFORMANCE.md, *Where the time goes*), not here: glibc's own
dynamic thresholds make any small synthetic churn fault a different, unrepresentative amount.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flexemr.malloc import retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_thresholds_in_a_fresh_process():
    code = "from flexemr.malloc import retain_freed_memory; import numpy as np; " \
           "assert retain_freed_memory(); a = np.ones(1 << 22); del a; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_thresholds_must_be_positive():
    with pytest.raises(ValueError, match="thresholds"):
        retain_freed_memory(trim_threshold=0)
    with pytest.raises(ValueError, match="thresholds"):
        retain_freed_memory(mmap_threshold=-5)
