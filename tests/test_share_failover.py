"""Automatic failover of a share between hosts, with state in a real etcd.

Hosts are network namespaces on one bridge: A and B run `blockhorn share agent` (each in its
own network and mount namespace), C is an NFS client. The root namespace is the storage host:
etcd and three replica servers listen on the bridge's own address, so the engines on A and B
reach the replicas over TCP as they would on other machines.

- Host A dies (its agent and everything it started killed -9, its namespace deleted): B takes
  over by itself; the test measures when B serves and when a client write succeeds again, and
  ends by reading back every file a client had written (nfs-cp exit 0) and comparing checksums.
- Host A is cut off the network (etcd, replicas and clients unreachable): it fences itself —
  Ganesha and the engine killed, the service address dropped — before B can own the share;
  reconnected, it stays standby and does not take the address back.

The site (namespaces, etcd, replicas, agents, the NFS client) is tests/failover_site.py, shared
with `make bench` (scripts/bench_failover.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator

import psutil
import pytest
from daemon_util import IS_ROOT, wait_until
from failover_site import (
    SERVICE,
    VOLUME,
    Site,
    cat,
    failover_site,
    payload,
    put,
    run_failover,
)
from netns_util import addresses, set_link
from test_share_nfs import MISSING

from blockhorn.cluster.agent import recorded_loop
from blockhorn.cluster.etcd import Etcd
from blockhorn.cluster.spec import owner_key

NEEDS = [*MISSING, *(c for c in ("etcd", "nbdkit", "nbdfuse") if not shutil.which(c))]
REASON = ("needs root, etcd, NFS-Ganesha, nbdkit/nbdfuse and libnfs-utils "
          "(apt-get install etcd-server nfs-ganesha nfs-ganesha-vfs libnfs-utils libnbd-bin)")
if os.environ.get("CI") and (NEEDS or not IS_ROOT):
    raise RuntimeError(f"CI cannot run the failover tests: {REASON}; missing {NEEDS}")
pytestmark = pytest.mark.skipif(bool(NEEDS) or not IS_ROOT, reason=REASON)


def gone(proc: psutil.Process) -> bool:
    """Exited (a zombie nobody reaped yet counts: its parent was killed)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def site(tmp_path: object) -> Iterator[Site]:
    with failover_site(str(tmp_path)) as s:
        yield s


def test_host_dies_other_host_takes_over(site: Site) -> None:
    result = run_failover(site)
    print(f"\nautomatic failover: host B serving {result.serving_s:.1f} s after host A died, "
          f"client writes again after {result.write_s:.1f} s")
    with Etcd(site.etcd_url) as e:
        kv = e.get(owner_key(VOLUME))
        assert kv is not None and json.loads(kv.value)["host"] == "host-b"
    for rep in site.replicas:   # B's engine fenced A's epoch at every replica
        with open(os.path.join(rep.cfg.directory, "fence.epoch")) as f:
            assert int(f.read()) == kv.create_revision
    for name, digest in result.acked.items():   # everything acknowledged, through host B
        assert hashlib.sha256(cat(name)).hexdigest() == digest, name
    assert result.serving_s < 20 and result.write_s < 60


def test_owner_cut_off_fences_itself_before_another_host_serves(site: Site) -> None:
    site.start_agent("a")
    wait_until(lambda: site.serving("a"), 60, "host A serving")
    ganesha_a = site.agent_status("a")
    site.start_agent("b")
    wait_until(lambda: site.agent_status("b").get("role") == "standby", 30, "host B standby")
    assert put(site.tmp, "before", payload(1))
    assert SERVICE.split("/")[0] in addresses("bhxa")
    share_a = os.path.join(site.home("a"), "agent", VOLUME, "share", "status.json")
    with open(share_a) as f:
        ganesha = psutil.Process(json.load(f)["ganesha_pid"])

    set_link("bhxa", up=False)   # etcd, replicas and clients all unreachable from A
    cut = time.time()
    wait_until(lambda: site.agent_status("a").get("role") == "fenced", 30, "host A fenced")
    fenced = site.agent_status("a")
    assert gone(ganesha)
    assert SERVICE.split("/")[0] not in addresses("bhxa")
    wait_until(lambda: site.serving("b"), 60, "host B serving")
    took = site.agent_status("b")
    print(f"\nfencing: host A fenced {fenced['fenced_at'] - cut:.1f} s after it was cut off, "
          f"host B owner after {took['owned_at'] - cut:.1f} s, serving after "
          f"{took['serving_since'] - cut:.1f} s")
    # No overlap: A had stopped serving before B could even own the share.
    assert fenced["fenced_at"] < took["owned_at"]
    assert fenced["fenced_at"] - ganesha_a["serving_since"] > 0

    set_link("bhxa", up=True)
    wait_until(lambda: site.agent_status("a").get("role") == "standby" and
               site.agent_status("a").get("owner") == "host-b", 30, "host A standby again")
    assert SERVICE.split("/")[0] not in addresses("bhxa")
    wait_until(lambda: put(site.tmp, "after", payload(2)), 60, "a client write through B")
    assert cat("before") == payload(1) and cat("after") == payload(2)


def test_agent_killed_alone_its_dead_mans_switch_stops_serving(site: Site) -> None:
    """Only the agent process dies (the host stays up): its dead man's switch kills the
    engine, nbdfuse and Ganesha and drops the service address, so A neither writes to the
    replicas nor answers clients; B takes over; an agent started again on A removes what is
    left (the loop device) and stands by."""
    site.start_agent("a")
    wait_until(lambda: site.serving("a"), 60, "host A serving")
    site.start_agent("b")
    wait_until(lambda: site.agent_status("b").get("role") == "standby", 30, "host B standby")
    agent = psutil.Process(site.agents["a"].pid)
    engine = next(p for p in agent.children() if p.name() == "nbdkit")
    assert recorded_loop(os.path.join(site.home("a"), "agent", VOLUME))
    share_a = os.path.join(site.home("a"), "agent", VOLUME, "share", "status.json")
    with open(share_a) as f:
        ganesha = psutil.Process(json.load(f)["ganesha_pid"])

    agent.kill()
    site.agents["a"].wait(10)
    wait_until(lambda: gone(engine) and gone(ganesha) and
               SERVICE.split("/")[0] not in addresses("bhxa"), 10,
               "the engine and Ganesha to die and the service address to go")
    wait_until(lambda: site.serving("b"), 60, "host B serving")

    site.start_agent("a")
    wait_until(lambda: site.agent_status("a").get("role") == "standby" and
               site.agent_status("a").get("owner") == "host-b", 30, "host A standby")
    assert gone(ganesha)
    assert SERVICE.split("/")[0] not in addresses("bhxa")
    assert not recorded_loop(os.path.join(site.home("a"), "agent", VOLUME))
    wait_until(lambda: put(site.tmp, "after", payload(3)), 60, "a client write through B")
    assert cat("after") == payload(3)
