"""Peak memory of this process, reset per stage, and the freed heap handed back."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.parity.sections import render_provenance
from pipeline.parity.summary import StageTiming
from pipeline.processes import peak_rss_bytes, release_freed_memory, reset_peak_rss

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from /proc")


@linux
def test_the_peak_follows_an_allocation_and_resets_below_it() -> None:
    assert reset_peak_rss()  # from here, not from whatever peak earlier tests reached
    before = peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = peak_rss_bytes()
    del block
    release_freed_memory()

    assert reset_peak_rss()
    after = peak_rss_bytes()

    assert before is not None and during is not None and after is not None
    assert during >= before + 60 * 2**20
    assert after < during - 32 * 2**20  # the freed block no longer counts


def test_the_stage_table_shows_peak_memory_and_a_dash_where_unmeasured() -> None:
    timings = [
        StageTiming(stage="export", seconds=1.5, status="ran", peak_rss_bytes=3 * 2**30),
        StageTiming(stage="simplify", seconds=0.0, status="skipped"),
    ]

    table = "\n".join(render_provenance(timings, [], {}, {}))

    assert "peak memory (GiB)" in table
    assert "| export | ran | 1.50 | 3.00 |" in table
    assert "| simplify | skipped | 0.00 | - |" in table
