"""Tier 2: which interface a share's service address goes on (blockhorn/sharemgr/address.py),
in a network namespace whose one interface is not named like the share's `--service-interface`
(hosts of a cluster need not share interface names):

- a named interface the host lacks, or none named: the interface whose subnet contains the
  service address; one named that exists is taken as named;
- added there, found there again, and removed from there whatever name the share gives;
- an address in no subnet of the host: a clear error (ENODEV) that names the address and what
  to do.
The checks run inside the namespace (`ip netns exec`), as a share manager on that host would.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import needs_root
from daemon_util import ROOT
from netns_util import hosts_on_bridge

pytestmark = needs_root()

INSIDE = """
import errno, json, sys
from blockhorn.sharemgr import address
from blockhorn.types import BlockhornError
service, outside = sys.argv[1], sys.argv[2]
out = {"missing": address.pick_interface("eth0", service),
       "unnamed": address.pick_interface("", service),
       "named": address.pick_interface("lo", service)}
address.ensure(out["missing"], service)
out["carrier"] = address.carrier(service)
out["again"] = address.pick_interface("", service)
address.remove("eth0", service)
out["after_remove"] = address.carrier(service)
try:
    address.pick_interface("eth0", outside)
except BlockhornError as e:
    out["error"] = [e.errno == errno.ENODEV, str(e)]
print(json.dumps(out))
"""


@pytest.fixture
def host() -> Iterator[tuple[str, str]]:
    """A namespace host whose interface is `lan<token>` on a /24: (namespace, subnet)."""
    from pyroute2 import NetNS
    tok = secrets.token_hex(2)
    ns, subnet = f"bq{tok}h", f"10.{200 + int(tok[:2], 16) % 50}.{int(tok[2:], 16)}"
    with hosts_on_bridge({ns: f"{subnet}.10/24"}, f"bq{tok}b"):
        with NetNS(ns) as ip:
            idx = ip.link_lookup(ifname="eth0")[0]
            ip.link("set", index=idx, state="down")
            ip.link("set", index=idx, ifname=f"lan{tok}", state="up")
        yield ns, subnet


def test_service_address_on_the_interface_of_its_subnet(host: tuple[str, str]) -> None:
    ns, subnet = host
    lan = f"lan{ns[2:6]}"
    got = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", INSIDE,
                          f"{subnet}.50/24", "192.0.2.50/24"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out["missing"] == out["unnamed"] == out["carrier"] == out["again"] == lan, out
    assert out["named"] == "lo" and out["after_remove"] is None, out
    ok, message = out["error"]
    assert ok and "192.0.2.50/24" in message and "--service-interface" in message, message
