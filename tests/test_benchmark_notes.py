"""The load note the benchmarks write into their results fragments says when it was read."""

from __future__ import annotations

import os

from benchmarks import workloads


def test_load_note_names_when_it_was_read(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (7.25, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert workloads.load_note() == (
        "1-minute load average at the start: 7.2 on 2 cores (a loaded machine: timings are noisy)"
    )
    end = workloads.load_note("at the end")
    assert end.startswith("1-minute load average at the end: 7.2 on 2 cores")
    assert "at the start" not in end
