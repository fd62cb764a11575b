"""The share's service address: a per-volume IP address that the share manager adds to a
configured interface of the serving host while it serves, and that Ganesha binds to.

Clients mount the service address, not the host: on failover the share manager started on
the new host adds it there and announces it (gratuitous ARP), so clients follow it
(tests/test_share_netns.py). Deciding that a host died and starting the share on another
one is the cluster leader's job (manager/leader.py, node daemons on etcd).
pyroute2 is synchronous; these small idempotent functions run in a worker thread.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from blockhorn.types import BlockhornError, InvalidArgument


def parse(cidr: str) -> tuple[str, int]:
    """`10.0.0.50/24` -> ("10.0.0.50", 24); a bare address is a /32."""
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise InvalidArgument(f"bad service address {cidr!r}: use ADDRESS/PREFIX, "
                              "e.g. 10.0.0.50/24") from None
    if iface.version != 4:
        raise InvalidArgument(f"service address {cidr!r}: only IPv4 is supported")
    return str(iface.ip), iface.network.prefixlen


def _index(ip: object, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)   # type: ignore[attr-defined]
    if not found:
        raise BlockhornError(f"interface {ifname!r} does not exist on this host: set the "
                             "volume's service interface to one that does", errno.ENODEV)
    return int(found[0])


def pick_interface(ifname: str, cidr: str) -> str:
    """The interface the service address `cidr` goes on here: `ifname` when this host has
    an interface of that name; else (none named, or hosts whose interfaces are named
    differently) the one with an address of its own whose subnet contains the service
    address, the longest prefix first. BlockhornError (ENODEV) when none does."""
    from pyroute2 import IPRoute
    address, _ = parse(cidr)
    want = ipaddress.ip_address(address)
    with IPRoute() as ip:
        if ifname and ip.link_lookup(ifname=ifname):
            return ifname
        best: tuple[int, int] | None = None   # (prefix length, interface index)
        for a in ip.get_addr(family=socket.AF_INET):
            own, prefix = a.get_attr("IFA_ADDRESS"), int(a["prefixlen"])
            if own == address:
                continue   # the service address itself, left from an earlier start
            if want in ipaddress.ip_network(f"{own}/{prefix}", strict=False) \
                    and (best is None or prefix > best[0]):
                best = (prefix, int(a["index"]))
        if best is None:
            named = f"there is no interface {ifname!r} here and " if ifname else ""
            raise BlockhornError(f"service address {cidr}: {named}no interface of this host "
                                 "has an address in its subnet: give the hosts an address "
                                 "there, or name the interface (--service-interface IF)",
                                 errno.ENODEV)
        return str(ip.get_links(best[1])[0].get_attr("IFLA_IFNAME"))


def carrier(cidr: str) -> str | None:
    """The interface that carries the address of `cidr` now, if one does."""
    from pyroute2 import IPRoute
    address, _ = parse(cidr)
    with IPRoute() as ip:
        for a in ip.get_addr(family=socket.AF_INET):
            if a.get_attr("IFA_ADDRESS") == address:
                return str(ip.get_links(int(a["index"]))[0].get_attr("IFLA_IFNAME"))
    return None


def present(ifname: str, cidr: str) -> bool:
    from pyroute2 import IPRoute
    address, _ = parse(cidr)
    with IPRoute() as ip:
        idx = _index(ip, ifname)
        return any(a.get_attr("IFA_ADDRESS") == address for a in ip.get_addr(index=idx))


def ensure(ifname: str, cidr: str) -> bool:
    """Add `cidr` to `ifname` unless it is there; True when this call added it."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    address, prefix = parse(cidr)
    with IPRoute() as ip:
        idx = _index(ip, ifname)
        try:
            ip.addr("add", index=idx, address=address, prefixlen=prefix)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise BlockhornError(f"cannot add {cidr} to {ifname}: {e}", e.code) from None
    announce(ifname, address)
    return True


def announce(ifname: str, address: str) -> None:
    """Send a gratuitous ARP for `address` from `ifname`: clients that cached the MAC of the
    host that served the address before (a failover) switch at once instead of after their
    neighbour entry times out (measured here: about 15 s more outage without it)."""
    eth_p_arp = 0x0806
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((ifname, 0))
            mac = s.getsockname()[4]
            if len(mac) != 6 or mac == bytes(6):
                return   # loopback and other interfaces without ARP
            ip = socket.inet_aton(address)
            # Ethernet broadcast + ARP request with sender = target = the address (RFC 5227).
            frame = (b"\xff" * 6 + mac + struct.pack("!H", eth_p_arp)
                     + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + bytes(6) + ip)
            s.send(frame)
    except OSError:
        pass   # best effort: without it clients find the new host when their entry expires


def remove(ifname: str, cidr: str) -> None:
    """Remove the service address from whichever interface carries it (the one picked at
    the start need not be `ifname`: `pick_interface`); none does: nothing to do."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    address, prefix = parse(cidr)
    ifname = carrier(cidr) or ""
    if not ifname:
        return   # not here: what we wanted
    with IPRoute() as ip:
        try:
            idx = _index(ip, ifname)
            ip.addr("del", index=idx, address=address, prefixlen=prefix)
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:   # already gone: what we wanted
                raise BlockhornError(f"cannot remove {cidr} from {ifname}: {e}",
                                     e.code) from None
        except BlockhornError:
            pass   # the interface went away, and the address with it
