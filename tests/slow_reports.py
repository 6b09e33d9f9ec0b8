"""Slow runs (``pytest -m slow``) store what they measured: ``benchmarks/run_report.py`` writes
``benchmarks/reports/<name>.json`` (or ``$CXRKIT_REPORT_DIR``) with the date, machine and code."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=None)
def _mod():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_report.py"
    spec = importlib.util.spec_from_file_location("cxrkit_run_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def now_utc() -> str:
    return _mod().now_utc()


def write_report(name: str, payload: dict[str, Any], started_utc: str | None = None) -> Path:
    return _mod().write_report(name, payload, started_utc)
