"""Network namespaces as "hosts" on one bridge (pyroute2), for the multi-host share tests.

`hosts_on_bridge({"ns": "10.0.0.1/24", ...}, "br0")` creates the bridge in the root namespace
(optionally with an address of its own, so processes of the root namespace — etcd, replica
servers — are reachable from the hosts as a storage host would be) and one namespace per host
with `eth0` (a veth whose peer is on the bridge) and `lo` up; everything goes again at exit.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


def _remove(hosts: dict[str, str], bridge: str) -> None:
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError
    for ns in hosts:
        if ns in netns.listnetns():
            netns.remove(ns)
    with IPRoute() as ip:
        for link in (bridge, *(f"{ns}-v" for ns in hosts)):
            for idx in ip.link_lookup(ifname=link):
                try:
                    ip.link("del", index=idx)
                except NetlinkError as e:
                    # A veth goes by itself once the kernel has torn down the namespace of
                    # its peer, which it does asynchronously: gone between lookup and delete.
                    if e.code != errno.ENODEV:
                        raise


@contextlib.contextmanager
def hosts_on_bridge(hosts: dict[str, str], bridge: str, bridge_cidr: str = "") -> Iterator[None]:
    _remove(hosts, bridge)   # leftovers of an interrupted run
    try:
        _create(hosts, bridge, bridge_cidr)
        yield
    finally:
        _remove(hosts, bridge)   # also after a set-up that failed half-way


def _create(hosts: dict[str, str], bridge: str, bridge_cidr: str) -> None:
    from pyroute2 import IPRoute, NetNS, netns
    with IPRoute() as ip:
        ip.link("add", ifname=bridge, kind="bridge")
        br = ip.link_lookup(ifname=bridge)[0]
        # A fixed MAC: by default a bridge takes the lowest MAC of its ports and changes it
        # when that port goes (a host "dies"), and the other hosts' ARP entries for the
        # bridge's own address then point nowhere for up to ~30 s.
        ip.link("set", index=br, address="02:00:00:00:00:01")
        if bridge_cidr:
            addr, prefix = bridge_cidr.split("/")
            ip.addr("add", index=br, address=addr, prefixlen=int(prefix))
        ip.link("set", index=br, state="up")
        for ns, cidr in hosts.items():
            netns.create(ns)
            # The peer is made in this namespace, then moved into the host's and renamed
            # eth0: its name here is the host's own, as another site may be making hosts
            # at the same time (two test files at once).
            peer = f"{ns}-p"
            ip.link("add", ifname=f"{ns}-v", kind="veth", peer=peer)
            ip.link("set", index=ip.link_lookup(ifname=f"{ns}-v")[0], master=br, state="up")
            ip.link("set", index=ip.link_lookup(ifname=peer)[0], net_ns_fd=ns)
            with NetNS(ns) as nsip:
                idx = nsip.link_lookup(ifname=peer)[0]
                nsip.link("set", index=idx, ifname="eth0", state="up")
                addr, prefix = cidr.split("/")
                nsip.addr("add", index=idx, address=addr, prefixlen=int(prefix))
                nsip.link("set", index=nsip.link_lookup(ifname="lo")[0], state="up")


def set_link(ns: str, up: bool, ifname: str = "eth0") -> None:
    """Cut a host off the bridge (or reconnect it): its eth0 down (up)."""
    from pyroute2 import NetNS
    with NetNS(ns) as nsip:
        nsip.link("set", index=nsip.link_lookup(ifname=ifname)[0], state="up" if up else "down")


def addresses(ns: str, ifname: str = "eth0") -> list[str]:
    from pyroute2 import NetNS
    with NetNS(ns) as nsip:
        idx = nsip.link_lookup(ifname=ifname)[0]
        return [a.get_attr("IFA_ADDRESS") for a in nsip.get_addr(index=idx)]
