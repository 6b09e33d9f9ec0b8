"""Helpers for the DICOM tests: the real outside tools (dicom3tools' dciodvfy, DCMTK), free ports.

The tools are Debian packages (``apt-get install -y dcmtk dicom3tools``; .ci/run installs them
when apt is available). A test that needs one skips, saying which and how to install it, only
when the executable is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

DATA = Path(os.environ.get("CXRKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
INSTALL_HINT = "apt-get install -y dcmtk dicom3tools (.ci/run does this where apt is available)"


def require_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return exe


def dciodvfy(path: "str | Path") -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for one file."""
    exe = require_tool("dciodvfy")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return [s for s in lines if s.startswith("Error")], [s for s in lines if s.startswith("Warning")]


def assert_dciodvfy_clean(path: "str | Path") -> None:
    errors, _ = dciodvfy(path)
    assert not errors, f"dciodvfy {path}:\n" + "\n".join(errors)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} not found (set CXRKIT_SHARED_DATA)")
    return DATA
