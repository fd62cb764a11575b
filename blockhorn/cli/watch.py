"""`blockhorn volume show NAME --watch`: rebuild progress until the volume is healthy.

On a terminal one status line is redrawn in place (a bar per replica that copies); otherwise
(a log, a pipe) one line is printed per interval. Ctrl-C ends it cleanly (exit 130).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

WATCH_INTERVAL_S = 1.0
BAR_WIDTH = 24            # characters


def progress_text(rb: dict[str, Any]) -> str:
    """`[#####.....]  42%  512.0/1024.0 MiB  120.3 MB/s  ETA 0:04` for a copying rebuild."""
    total, done = int(rb.get("total") or 0), int(rb.get("done") or 0)
    if rb.get("waiting"):
        return f"queued: waiting for {rb['waiting']}"
    frac = done / total if total else 0.0
    filled = int(frac * BAR_WIDTH)
    text = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:3.0f}%  "
            f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
    if rb.get("rate"):
        text += f"  {rb['rate'] / 1e6:.1f} MB/s"
    if rb.get("eta_s") is not None:
        eta = int(rb["eta_s"])
        text += f"  ETA {eta // 60}:{eta % 60:02d}"
    return f"{rb.get('mode') or 'rebuild'} {text}"


def status_line(v: dict[str, Any]) -> tuple[str, bool]:
    """One line for the volume, and whether the watch is over (healthy, nothing copying)."""
    parts = []
    busy = False
    for r in v.get("replicas", []):
        rb = r.get("rebuild") or {}
        if rb.get("state") in ("queued", "running"):
            busy = True
            parts.append(f"{r['name']}: {progress_text(rb)}")
        elif r.get("mode") != "RW":
            parts.append(f"{r['name']}: {r.get('mode') or '?'}")
    done = v.get("robustness") == "healthy" and not busy
    head = f"{v['name']}: {v.get('robustness')}"
    return (head + ("  " + "; ".join(parts) if parts else "")), done


def watch(client: Any, name: str, out: TextIO = sys.stdout,
          interval: float = WATCH_INTERVAL_S) -> int:
    tty = out.isatty()
    try:
        while True:
            v = client.show(name)
            line, done = status_line(v)
            if v.get("state") != "attached":
                done = True
                line += f" (volume is {v.get('state')}: nothing runs)"
            if tty:
                out.write("\r\x1b[2K" + line)
            else:
                out.write(line + "\n")
            out.flush()
            if done:
                if tty:
                    out.write("\n")
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        out.flush()
        return 130
