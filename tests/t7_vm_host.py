"""Tier 7 (real kernel, QEMU guest): the guest is a whole blockhorn host with kernel NBD.

This machine's kernel has no NBD module, so the local `nbd` frontend (nbd-client on /dev/nbdN,
what `--frontend auto` picks on such a host) is exercised in a guest running Debian's kernel:
the host's root filesystem is shared read-only over virtio-9p and mounted in the guest under an
overlayfs with a tmpfs upper layer (support/vm.py HOST_ROOT_SETUP); the guest chroots into it
and runs this checkout's own daemon and CLI (.venv), nbdkit and Debian's nbd-client, with the
blockhorn home, the replicas and everything written on tmpfs in the guest.

In the guest: the daemon (started by the first CLI command), a 2-replica volume attached with
`--frontend auto` (must be `nbd`, through the local relay: manager/nbdproxy.py), ext4, a
verifying write load (fsync'd 512 KiB files, each a copy of a known source file), kill -9 of the
engine's nbdkit under it, then a live `volume upgrade` under it, then the engine stopped
(SIGSTOP) for 40 s, past the kernel's default request timeout; then: no failed write, no request
timeout, no kernel I/O error, ext4 still rw, the engine restarted once, and after detach + a
fresh attach every file reads back equal to its source.
Last, the node's fence (node/fence.py) with kernel NBD: the engine and the local relay are
killed and /dev/nbd0 is disconnected, so a reader gets nothing instead of waiting.
"""

from __future__ import annotations

import re
import time

import pytest
from support import vm

from blockhorn.nbd.attach import NBD_CONNECTIONS

pytestmark = pytest.mark.vm

GUEST_MEMORY_MIB = 1024   # four Python processes (daemon, 2 replicas, relay) + nbdkit + tmpfs
GUEST_CPUS = 2            # those processes on two TCG threads: 136 -> 108 s measured
TIMEOUT_S = 400.0         # the whole guest; measured ~150 s on 2 loaded cores (TCG)
PHASE_S = 3               # seconds of load after each event, and before the first
FREEZE_S = 40             # the engine stopped this long: past the kernel's default 30 s

# Runs in the chroot (the host's root, writable through the overlay). Every step prints a
# line the test looks for; any failure exits non-zero with what failed.
INNER = r"""
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export PYTHONDONTWRITEBYTECODE=1
PY={root}/.venv/bin/python
H=/run/bh
cd {root}
bh() {{ "$PY" -m blockhorn --home $H "$@"; }}
now() {{ echo "${{EPOCHREALTIME/./}}"; }}
die() {{ echo "FAIL $*"; tail -n 20 $H/logs/*.log 2>/dev/null; exit 1; }}
step() {{ echo "STEP $1 $(( ($(now) - T0) / 1000 )) ms"; }}
T0=$(now)
# The first command starts the daemon (manager/client.py connect: autostart).
bh volume create v --size 64MiB --replicas 2 >/dev/null || die create
step daemon+create
bh volume attach v --frontend auto >/dev/null || die attach
step attach
bh volume show v --json >/tmp/show.json || die show
"$PY" - <<'EOF' || die attachment
import json, os, stat
v = json.load(open("/tmp/show.json"))
att = v["attachment"]
print("ATTACHED", v["frontend"], v["device"], "relay" if att.get("relay") else "norelay",
      oct(stat.S_IMODE(os.stat(att.get("relay") or "/").st_mode)))
# nbd-client's connections (-C, attach.NBD_CONNECTIONS): the relay's accepted sockets, those
# connected (St 03) under the listening socket's path. (The kernel's hardware queues would not
# tell: it has no more than CPUs, and this guest has two.)
with open("/proc/net/unix") as f:
    rows = [line.split() for line in f][1:]
print("CONNECTIONS", sum(1 for r in rows if len(r) == 8 and r[7] == att.get("relay")
                         and r[5] == "03"))
EOF
step show
mkfs.ext4 -q -F /dev/nbd0 && mount -t ext4 /dev/nbd0 /mnt || die mkfs
step mkfs
for s in 0 1 2 3 4 5 6 7; do
    dd if=/dev/urandom of=/tmp/s$s bs=64k count=8 status=none
done
# The load: f0..f7 rewritten in turn with fsync, each a copy of one of the sources s0..s7
# (the pairing shifts every round); /tmp/map keeps what each file must hold; every
# write+fsync's start and end (us) go to the output, for the pause of each event.
(
    i=0; errs=0
    while [ ! -e /tmp/stop ]; do
        f=$((i % 8)); s=$(( (i + i / 8) % 8 )); a=$(now)
        if cp /tmp/s$s /mnt/f$f && sync /mnt/f$f; then
            echo "LAT $a $(now)"
            echo "f$f s$s" >>/tmp/map
        else
            errs=$((errs + 1)); echo "write error $f" >&2
        fi
        i=$((i + 1))
    done
    echo "WRITES $i ERRORS $errs"
) >/tmp/load.out 2>&1 &
load=$!
echo LOAD
sleep {phase}
engine_nbdkit() {{ pgrep -f "^[^ ]*nbdkit .*config=$H/volumes/v/engine.json"; }}
old=$(engine_nbdkit) || die no engine nbdkit
a=$(now)
kill -9 $old
echo "KILLED at $(date +%T,%3N)"
until new=$(engine_nbdkit) && [ "$new" != "$old" ]; do
    [ $(( $(now) - a )) -gt 60000000 ] && die engine not restarted in 60 s
    sleep 0.05
done
b=$(now)
echo "EVENT kill $a $b"
sleep {phase}
a=$(now)
bh volume upgrade v --json >/tmp/upgrade.json || die upgrade
b=$(now)
echo "EVENT upgrade $a $b"
step upgrade
echo "UPGRADE $(tr -d '\n' </tmp/upgrade.json)"
sleep {phase}
# The engine frozen (SIGSTOP: a paused VM, a swap storm) longer than the kernel's default
# request timeout: the relay's connection to it stays up, so requests just wait; the kernel
# must keep both its connections (nbd-client -t, attach.NBD_REQUEST_TIMEOUT_S).
old=$(engine_nbdkit) || die no engine nbdkit after the upgrade
a=$(now)
kill -STOP $old
sleep {freeze}
kill -CONT $old
b=$(now)
echo "EVENT freeze $a $b"
step freeze
sleep {phase}
touch /tmp/stop; wait $load
cat /tmp/load.out
step loadstop
grep ' /mnt ' /proc/mounts
umount /mnt || die umount
# The kernel's NBD messages (none may say a request timed out: the attach sets -t 180).
dmesg | grep -i 'nbd' | sed 's/^/KERNEL /' | tail -n 8
# Where the kill's pause went: the daemon's lines about the restart (log clock = guest clock).
grep -E "is not running|started engine|engine restarted" $H/logs/daemon.log | tail -n 4
bh volume show v --json >/tmp/show.json || die show
"$PY" -c 'import json; v = json.load(open("/tmp/show.json")); print("ENGINE restarts", v["engine"]["restarts"], "message", v["message"])'
# Read back from the volume, not the page cache: the last close of /dev/nbd0 (umount) drops
# its cached pages, drop_caches the rest.
sync; echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nbd0 /mnt || die mount again
# The last copy into each file is what it must hold (every one was acknowledged by fsync).
declare -A want=()
while read -r f s; do want[$f]=$s; done </tmp/map
bad=0
for f in "${{!want[@]}}"; do
    cmp -s /mnt/$f /tmp/${{want[$f]}} || {{ echo "MISMATCH $f ${{want[$f]}}"; bad=1; }}
done
echo "VERIFIED ${{#want[@]}} files bad=$bad"
step verified
umount /mnt
# The fence of a node (node/fence.py), as a cluster node's watchdog or dead man's switch runs
# it, with the daemon stopped (it would start the engine and the relay again): the engine and
# the local relay are killed, and the release disconnects /dev/nbd0, so nothing here waits
# for an engine that may now run on another node. A reader of the device gets nothing.
bh daemon stop >/dev/null || die daemon stop
step daemonstop
grep -qx /dev/nbd0 $H/run/v/nbd-device || die no device record
"$PY" -c "from blockhorn.node import fence; from blockhorn.manager.paths import Home; \
print('FENCE killed', fence.fence(Home.at('$H'), ['v'], 'test'))" || die fence
a=$(now)
until [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
    [ $(( $(now) - a )) -gt 30000000 ] && die nbd0 still connected 30 s after the fence
    sleep 0.1
done
echo "RELEASED nbd0 after $(( ($(now) - a) / 1000 )) ms"
pgrep -f relay.sock && die relay left after the fence
[ -e $H/run/v/nbd-device ] && die device record left after the release
got=$(timeout 20 dd if=/dev/nbd0 bs=4k count=1 iflag=direct 2>/dev/null | wc -c)
[ "$got" = 0 ] || die "fenced nbd0 still reads ($got bytes)"
echo "FENCED reader got nothing"
step fenced
bh volume detach v >/dev/null || die detach
step detach
[ -e $H/run/v/relay.sock ] && die relay socket left after detach
pgrep -f relay.py && die relay left after detach
# No `daemon stop` here: the guest powers off next, and a stop (~6 s of TCG Python) proved
# nothing the script looked at.
step end
[ $bad = 0 ]
"""


def test_local_nbd_frontend_survives_engine_kill_and_upgrade(tmp_path) -> None:
    script = vm.HOST_ROOT_SETUP + (
        "cat >/hostroot/tmp/inner.sh <<'INNER_EOF'\n"
        + INNER.format(root=vm.ROOT, phase=PHASE_S, freeze=FREEZE_S)
        + "INNER_EOF\nchroot /hostroot /bin/bash /tmp/inner.sh\n")
    t0 = time.monotonic()
    with vm.Guest(str(tmp_path), script, modules=("nbd", "ext4", "9p", "9pnet_virtio",
                                                  "overlay"),
                  host_root=True, memory_mib=GUEST_MEMORY_MIB, cpus=GUEST_CPUS) as g:
        res = g.wait(TIMEOUT_S)
        console = g.console_tail(2000)
    out = res.output
    assert res.status == 0, out
    assert "I/O error" not in console, console[-3000:]
    assert "Remounting filesystem read-only" not in console, console[-3000:]
    # No kernel NBD request timeout fired during the (TCG-long) engine restarts.
    kernel = "\n".join(re.findall(r"^KERNEL (.*)$", out, re.M))
    assert "timed out" not in kernel and "timed out" not in console, kernel
    m = re.search(r"^ATTACHED (\S+) (\S+) (\S+) (\S+)$", out, re.M)
    assert m and m.groups() == ("nbd", "/dev/nbd0", "relay", "0o600"), out
    assert re.search(rf"^CONNECTIONS {NBD_CONNECTIONS}$", out, re.M), out
    load = re.search(r"^WRITES (\d+) ERRORS (\d+)$", out, re.M)
    assert load and int(load.group(2)) == 0 and "write error" not in out, out
    assert re.search(r" /mnt ext4 rw[ ,]", out), out
    # The supervisor says the engine was restarted, not that the device fails I/O.
    engine = re.search(r"^ENGINE restarts (\d+) message (.*)$", out, re.M)
    assert engine and engine.group(1) == "1" and "fails I/O" not in engine.group(2), out
    verified = re.search(r"^VERIFIED (\d+) files bad=0$", out, re.M)
    assert verified and int(verified.group(1)) == 8, out
    # The fence released the kernel device: engine and relay killed, nbd0 disconnected.
    fenced = re.search(r"^FENCE killed (\d+)$", out, re.M)
    assert fenced and int(fenced.group(1)) >= 2, out
    assert re.search(r"^RELEASED nbd0 after \d+ ms$", out, re.M), out
    assert re.search(r"^FENCED reader got nothing$", out, re.M), out
    steps = dict(re.findall(r"^STEP (\S+) (\d+) ms$", out, re.M))
    upgrade = re.search(r'"pause_s": ([0-9.]+)', out)
    events = {e: (int(a), int(b)) for e, a, b in re.findall(r"^EVENT (\S+) (\d+) (\d+)$", out,
                                                              re.M)}
    assert upgrade and set(events) == {"kill", "upgrade", "freeze"}, out
    pauses = event_pauses(out, events)
    print(f"\nvm host (local nbd frontend): boot {res.boot_s:.1f} s, script {res.run_s:.1f} s, "
          f"total {time.monotonic() - t0:.1f} s; steps (ms from start) {steps}; "
          f"{load.group(1)} writes; kill -9 to new engine "
          f"{(events['kill'][1] - events['kill'][0]) / 1e6:.2f} s; daemon's upgrade pause "
          f"{float(upgrade.group(1)):.2f} s; longest write+fsync through the kill "
          f"{pauses['kill']:.2f} s, through the upgrade {pauses['upgrade']:.2f} s, through "
          f"the {FREEZE_S} s freeze {pauses['freeze']:.2f} s")
    timeline = re.findall(r"^(?:KILLED at \S+|\S+ \S+ (?:ERROR|INFO|WARNING) .*(?:is not running|"
                          r"started engine|engine restarted).*)$", out, re.M)
    print("restart after the kill (guest clock):\n  " + "\n  ".join(timeline))
    print("kernel's NBD messages:\n  " + kernel.replace("\n", "\n  "))
    # Every write through each event finished (the relay's limit is 60 s without an engine);
    # one waited through the freeze, longer than the kernel's default request timeout.
    assert 0 < pauses["kill"] < 60 and 0 < pauses["upgrade"] < 60, pauses
    assert 30 < pauses["freeze"] < FREEZE_S + 30, pauses


def event_pauses(out: str, events: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Per event, the longest write+fsync (seconds) of those running during its window
    [start, end] (guest clock, us): the pause the workload saw."""
    lat = [(int(a), int(b)) for a, b in re.findall(r"^LAT (\d+) (\d+)$", out, re.M)]
    return {e: max((b - a for a, b in lat if a < end and b > start), default=0) / 1e6
            for e, (start, end) in events.items()}
