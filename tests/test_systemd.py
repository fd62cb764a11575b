"""Every unit file passes `systemd-analyze verify` (rendered with this venv's `blockhorn`, since
verify insists that ExecStart's program exists)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "systemd")
INSTALLED = "/usr/local/bin/blockhorn"
BLOCKHORN = os.path.join(os.path.dirname(sys.executable), "blockhorn")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed (apt-get install systemd)")


def unit_names() -> list[str]:
    return sorted(f for f in os.listdir(UNITS) if f.endswith(".service"))


def test_expected_units_exist() -> None:
    assert unit_names() == ["blockhorn-engine@.service", "blockhorn-fuse@.service",
                            "blockhorn-replica@.service", "blockhorn-share@.service",
                            "blockhorn.service"]


@pytest.mark.parametrize("unit", unit_names())
def test_unit_verifies(unit: str, tmp_path: object) -> None:
    assert os.access(BLOCKHORN, os.X_OK), BLOCKHORN
    with open(os.path.join(UNITS, unit)) as f:
        text = f.read()
    assert INSTALLED in text
    out = os.path.join(str(tmp_path), unit)
    with open(out, "w") as f:
        f.write(text.replace(INSTALLED, BLOCKHORN))
    # A template is verified through an instance of it.
    target = out.replace("@.service", "@vol1-r0.service") if "@." in unit else out
    if target != out:
        os.symlink(out, target)
    proc = subprocess.run(["systemd-analyze", "verify", target], capture_output=True,
                          text=True, timeout=60)
    messages = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not messages, messages


def test_daemon_unit_contract() -> None:
    with open(os.path.join(UNITS, "blockhorn.service")) as f:
        text = f.read()
    for line in ("Type=notify", "KillMode=process", "Restart=on-failure",
                 f"ExecStart={INSTALLED} daemon"):
        assert line in text.splitlines(), line


def test_fuse_unit_contract() -> None:
    """READY=1 comes from `fuse serve` once the file is mounted; the loop device is removed
    before the stop signal reaches it (teardown order: loop, FUSE unmount, engine close)."""
    with open(os.path.join(UNITS, "blockhorn-fuse@.service")) as f:
        lines = f.read().splitlines()
    assert "Type=notify" in lines
    assert any(line.startswith(f"ExecStart={INSTALLED} fuse serve ") for line in lines)
    assert any(line.startswith("ExecStop=") and "losetup -d" in line for line in lines)
