"""Tier 1: `volume show --watch` rendering (blockhorn/cli/watch.py): a line per interval when
not on a terminal, done when healthy, Ctrl-C exits 130. The volumes shown are what the
daemon's `show` returns (docs/API.md); the live path is covered by the rebuild tests."""

from __future__ import annotations

import io

from blockhorn.cli.watch import progress_text, status_line, watch

MiB = 1 << 20


def volume(robustness: str, rebuild: dict | None, mode: str = "WO") -> dict:
    return {"name": "v", "state": "attached", "robustness": robustness, "replicas": [
        {"name": "v-r0", "mode": "RW", "rebuild": None},
        {"name": "v-r1", "mode": mode, "rebuild": rebuild}]}


class Shows:
    """Answers `show` with the next volume of a list (the last one repeats)."""

    def __init__(self, *vols: dict, interrupt_at: int | None = None) -> None:
        self.vols = list(vols)
        self.calls = 0
        self.interrupt_at = interrupt_at

    def show(self, name: str) -> dict:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.vols[min(self.calls - 1, len(self.vols) - 1)]


def test_progress_text_has_bar_rate_and_eta() -> None:
    text = progress_text({"mode": "full", "done": 256 * MiB, "total": 1024 * MiB,
                          "rate": 128e6, "eta_s": 75})
    assert "[######..................]" in text and " 25%" in text
    assert "256.0/1024.0 MiB" in text and "128.0 MB/s" in text and "ETA 1:15" in text
    assert "queued" in progress_text({"waiting": "a free rebuild slot"})


def test_watch_prints_a_line_per_interval_until_healthy() -> None:
    running = {"state": "running", "mode": "full", "done": MiB, "total": 4 * MiB,
               "rate": 1e6, "eta_s": 3}
    client = Shows(volume("degraded", running), volume("degraded", dict(running, done=3 * MiB)),
                   volume("healthy", {"state": "done", "done": 4 * MiB, "total": 4 * MiB},
                          mode="RW"))
    out = io.StringIO()
    assert watch(client, "v", out, interval=0) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and " 25%" in lines[0] and " 75%" in lines[1], lines
    assert lines[2] == "v: healthy", lines
    assert status_line(volume("healthy", None, mode="RW")) == ("v: healthy", True)


def test_watch_ctrl_c_exits_130() -> None:
    running = {"state": "running", "done": 0, "total": MiB}
    out = io.StringIO()
    assert watch(Shows(volume("degraded", running), interrupt_at=2), "v", out, interval=0) == 130
    assert len(out.getvalue().splitlines()) == 1
