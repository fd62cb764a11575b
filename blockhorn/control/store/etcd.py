"""The state store on etcd (the StateStore interface of control/store/base.py), for many hosts.

Layout: one JSON document per record, under a prefix (default `/blockhorn/`):

    <p>meta/schema               "1"
    <p>volumes/<name>            VolumeRow fields
    <p>replicas/<name>           ReplicaRow fields (with `volume`, `idx`; `moving`: a
                                 MoveTarget's to_dict() while a drain moves it, else null)
    <p>engines/<volume>          EngineRow fields
    <p>ports/<port>              {"volume", "owner"}: a TCP port held (one key per port, so
                                 two allocations of one port cannot both succeed); owner
                                 `<replica>~move`: that replica's move target's
    <p>shares/<volume>           ShareRow fields
    <p>share-records/<volume>    Ganesha's client recovery records of the share (a JSON tree)
    <p>settings/<name>           the setting's JSON text
    <p>jobs/<name>               JobRow fields
    <p>runs/<id, 16 digits>      RunRow fields; <p>meta/run-seq holds the last id given
    <p>backup-targets/<name>     BackupTargetRow fields
    <p>nodes/<name>              NodeRow fields
    <p>disks/<node>/<path, %-quoted>   DiskRow fields
    <p>live/<node>               present while the node's daemon keeps its lease alive
    <p>leader                    the leading node's name, under that node's live/ lease
    <p>leftovers/<node>/<sha256 of the directory, 16 hex>   LeftoverRow fields: a replica
                                 directory that node's daemon removes (manager/leftovers.py)
    <p>meta/cluster-key          the cluster key (hex) every node's engines and replicas use
    <p>meta/schedule             {"changes": n}: the scheduling mark (its mod revision), put by
                                 every change that promises disk room (base.py `guarded`)

Every change is one etcd transaction guarded by compare-and-swap on the mod revisions of the
keys it read (mod revision 0: "the key does not exist"): read, compute, commit if nobody
changed those keys meanwhile, else read again and retry. So a change is atomic and never lost
to a concurrent writer on another thread or host, without locks. A change that promises disk
room also puts `meta/schedule`, and with a `guard` (the mod revision a scheduling decision
read) compares it: the decision's reads and its write are then one step too. The machinery
is in control/store/etcd_cas.py, the jobs and runs in control/store/etcd_jobs.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import quote

from blockhorn.cluster.etcd import Etcd, EtcdError, LeaseNotFound
from blockhorn.control.store.base import (
    NewReplica,
    Stale,
    move_port_owner,
    now_rfc3339,
    pick_port,
    port_host,
    unpack_new,
)
from blockhorn.control.store.etcd_cas import Doc
from blockhorn.control.store.etcd_jobs import EtcdJobs
from blockhorn.control.store.records import (
    DISK_FIELDS,
    NODE_FIELDS,
    VOLUME_FIELDS,
    BackupTargetRow,
    DiskRow,
    EngineRow,
    LeftoverRow,
    MoveTarget,
    NodeRow,
    ProcessRecord,
    ReplicaRow,
    ShareRow,
    VolumeRow,
)
from blockhorn.types import AlreadyExists, Busy, InvalidArgument, NotFound

log = logging.getLogger("blockhorn.control")

SCHEMA_VERSION = 1
# Key prefixes (relative) whose changes `watch` reports: what a node's supervision acts on.
WATCHED = ("volumes/", "replicas/", "live/")
SCHEDULE = "meta/schedule"   # the scheduling mark's key


def _proc(d: Doc) -> ProcessRecord | None:
    return ProcessRecord(int(d["pid"]), float(d.get("create_time") or 0.0)) \
        if d.get("pid") is not None else None


def _set_proc(d: Doc, proc: ProcessRecord | None, restarted: bool) -> Doc:
    d["pid"], d["create_time"] = (proc.pid, proc.create_time) if proc else (None, None)
    d["restarts"] = int(d.get("restarts", 0)) + int(restarted)
    return d


def _leftover_key(node: str, directory: str) -> str:
    return f"leftovers/{node}/{hashlib.sha256(directory.encode()).hexdigest()[:16]}"


def _leftover(replica: Doc, volume_created: str) -> tuple[str, Doc]:
    """(key, document) of the leftover record of a replica document's directory."""
    row = LeftoverRow(replica["node"], replica["name"], replica["volume"],
                      replica["directory"], volume_created)
    return _leftover_key(row.node, row.directory), asdict(row)


def _volume(d: Doc) -> VolumeRow:
    return VolumeRow(d["name"], d["size"], d["replica_count"], d["access_mode"], d["desired"],
                     d.get("frontend"), d.get("attachment"), d.get("robustness"),
                     d.get("message"), d.get("tcp_port"), d["created"],
                     bool(d.get("device_stale")), list(d.get("groups") or []),
                     d.get("standby"), d.get("node"), bool(d.get("fresh")),
                     list(d.get("node_selector") or []), list(d.get("disk_selector") or []),
                     int(d.get("epoch") or 0), d.get("salvage"), d.get("expanding"))


def _replica(d: Doc) -> ReplicaRow:
    return ReplicaRow(d["name"], d["volume"], d["idx"], d["directory"], d["address"],
                      _proc(d), d.get("restarts", 0), d.get("failed_since"), d.get("node"),
                      MoveTarget.from_dict(d.get("moving")))


class EtcdStore(EtcdJobs):
    def __init__(self, urls: str | list[str], prefix: str = "/blockhorn/") -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise InvalidArgument(f"bad etcd key prefix {prefix!r}: it starts and ends with /")
        self.prefix = prefix
        self.etcd = Etcd(urls)
        self._leases: dict[str, int] = {}   # node -> the lease of its live/ key
        # A store written by a newer blockhorn is not ours to change.
        kv = self.etcd.get(self._k("meta/schema"))
        if kv is None:
            self.etcd.create(self._k("meta/schema"), str(SCHEMA_VERSION))
        elif int(kv.value or b"0") > SCHEMA_VERSION:
            raise InvalidArgument(f"the etcd store under {prefix} has schema "
                                  f"{kv.value.decode()}, newer than this blockhorn's "
                                  f"{SCHEMA_VERSION}: upgrade blockhorn")

    def close(self) -> None:
        self.etcd.close()

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None] | None:
        """One watch over the prefix (a daemon thread), calling `on_change` for changes of
        WATCHED keys only: every node's heartbeat rewrites its node document each beat."""
        stop = threading.Event()

        def changed(keys: list[bytes]) -> None:
            if not keys or any(k[len(self.prefix):].startswith(WATCHED)
                               for k in (k.decode(errors="replace") for k in keys)):
                on_change()

        threading.Thread(target=self.etcd.watch, args=(self.prefix, changed, stop),
                         name="etcd-watch", daemon=True).start()
        return stop.set

    # --- scheduling ------------------------------------------------------------------------

    def schedule_mark(self) -> int:
        return self._get(SCHEDULE)[1]

    def _promise(self, read: dict[str, int], put: dict[str, Any], guard: int | None,
                 what: str) -> None:
        """Add to a change (read, put) the move of the scheduling mark; Stale when `guard`
        is given and the mark moved since."""
        doc, rev = self._get(SCHEDULE)
        if guard is not None and rev != guard:
            raise Stale(f"{what}: the disks' promised room changed since it was decided")
        read[SCHEDULE] = rev
        put[SCHEDULE] = {"changes": int((doc or {}).get("changes", 0)) + 1}

    def reserve_expand(self, name: str, size: int, guard: int | None = None,
                       node: str | None = None) -> None:
        vkey = f"volumes/{name}"

        def step() -> bool:
            d, rev = self._get(vkey)
            if d is None:
                raise NotFound(f"volume {name!r} does not exist")
            read = {vkey: rev}
            put = {vkey: {**d, "expanding": size, "expanding_node": node}}
            self._promise(read, put, guard, f"expand {name}")
            return self._commit(read, put)
        self._retry(step, f"reserve room for the expand of {name}")

    def end_expand(self, name: str, size: int) -> None:
        self._update(f"volumes/{name}", lambda d: {**d, "expanding": None,
                                                   "expanding_node": None}
                     if d.get("expanding") == size else None)

    def end_expands_of(self, node: str | None) -> list[str]:
        def end(size: int) -> Callable[[Doc], Doc | None]:
            return lambda d: ({**d, "expanding": None, "expanding_node": None}
                              if (d.get("expanding"), d.get("expanding_node")) == (size, node)
                              else None)
        ended = []
        for rel, d, _ in self._list("volumes/"):
            if d.get("expanding") is not None and d.get("expanding_node") == node:
                self._update(rel, end(d["expanding"]))
                ended.append(str(d["name"]))
        return ended

    # --- volumes ---------------------------------------------------------------------------

    def add_volume(self, name: str, size: int, replicas: list[NewReplica],
                   engine: tuple[str, str], is_free: Callable[[int], bool],
                   guard: int | None = None) -> VolumeRow:
        created = now_rfc3339()

        def step() -> bool:
            if self._get(f"volumes/{name}")[0] is not None:
                raise AlreadyExists(f"volume {name!r} already exists")
            taken = {int(k.rsplit("/", 1)[1]) for k, _, _ in self._list("ports/")}
            read = {f"volumes/{name}": 0, f"engines/{name}": 0}
            put: dict[str, Any] = {
                f"volumes/{name}": {"name": name, "size": size,
                                    "replica_count": len(replicas), "access_mode": "rwo",
                                    "desired": "detached", "created": created,
                                    "device_stale": False, "groups": [], "fresh": True},
                f"engines/{name}": {"volume": name, "nbd_socket": engine[0],
                                    "control_socket": engine[1], "pid": None, "restarts": 0}}
            for idx, rep in enumerate(replicas):
                rname, directory, address, node = unpack_new(rep)
                host = port_host(address)
                if host is not None:
                    port = pick_port(taken, is_free, rname)
                    taken.add(port)
                    read[f"ports/{port}"] = 0
                    put[f"ports/{port}"] = {"volume": name, "owner": rname}
                    address = f"{host}:{port}"
                read[f"replicas/{rname}"] = 0
                put[f"replicas/{rname}"] = {"name": rname, "volume": name, "idx": idx,
                                            "directory": directory, "address": address,
                                            "pid": None, "restarts": 0, "failed_since": None,
                                            "node": node}
            self._promise(read, put, guard, f"create volume {name}")
            return self._commit(read, put)
        self._retry(step, f"create volume {name}")
        return self.volume(name)

    def volume(self, name: str) -> VolumeRow:
        doc, _ = self._get(f"volumes/{name}")
        if doc is None:
            raise NotFound(f"volume {name!r} does not exist")
        return _volume(doc)

    def volumes(self) -> list[VolumeRow]:
        return sorted((_volume(d) for _, d, _ in self._list("volumes/")), key=lambda v: v.name)

    def update_volume(self, name: str, **fields: Any) -> None:
        if not fields or set(fields) - VOLUME_FIELDS:
            raise ValueError(f"cannot update volume fields {sorted(set(fields) - VOLUME_FIELDS)}")
        if "device_stale" in fields:
            fields["device_stale"] = bool(fields["device_stale"])
        if "size" not in fields:
            self._update(f"volumes/{name}", lambda d: {**d, **fields},
                         NotFound(f"volume {name!r} does not exist"))
            return
        vkey = f"volumes/{name}"

        def step() -> bool:   # a size grown promises room: the mark moves with it
            d, rev = self._get(vkey)
            if d is None:
                raise NotFound(f"volume {name!r} does not exist")
            new = {**d, **fields}
            if (new.get("expanding") or 0) <= new["size"]:
                new["expanding"] = new["expanding_node"] = None   # the size holds it now
            read, put = {vkey: rev}, {vkey: new}
            if new["size"] > d["size"]:
                self._promise(read, put, None, f"expand {name}")
            return self._commit(read, put)
        self._retry(step, f"update volume {name}")

    def claim_attachment(self, name: str, node: str | None, expect: str | None,
                         *, detached: bool = False, **fields: Any) -> int:
        if set(fields) - VOLUME_FIELDS:
            raise ValueError(f"cannot update volume fields {sorted(set(fields) - VOLUME_FIELDS)}")
        epoch = 0
        vkey, ekey = f"volumes/{name}", f"engines/{name}"

        def step() -> bool:
            nonlocal epoch
            (d, vrev), (e, erev) = self._get(vkey), self._get(ekey)
            if d is None or e is None:
                raise NotFound(f"volume {name!r} does not exist")
            if d.get("node") != expect:
                raise Busy(f"volume {name!r} is now attached on node {d.get('node')}, not "
                           f"{expect}: someone else moved it")
            if detached and d.get("desired") == "attached":
                raise Busy(f"volume {name!r} was attached on node {d.get('node')} meanwhile")
            epoch = int(d.get("epoch") or 0) + 1
            # The engine record goes in the same step: the new node must never see itself
            # asked to attach with the old node's engine pid still recorded.
            return self._commit({vkey: vrev, ekey: erev},
                                {vkey: {**d, **fields, "node": node, "epoch": epoch},
                                 ekey: _set_proc(e, None, False)})
        self._retry(step, f"attach {name} on {node}")
        return epoch

    def delete_volume(self, name: str) -> None:
        """The volume and everything that belongs to it, in one transaction."""
        def step() -> bool:
            doc, rev = self._get(f"volumes/{name}")
            if doc is None:
                raise NotFound(f"volume {name!r} does not exist")
            gone = [f"volumes/{name}", f"engines/{name}", f"shares/{name}",
                    f"share-records/{name}"]
            reps = [(k, d) for k, d, _ in self._list("replicas/") if d["volume"] == name]
            gone += [k for k, _ in reps]
            gone += [k for k, d, _ in self._list("ports/") if d["volume"] == name]
            # Each replica's node removes its directory (also one down now, once it is back).
            left = dict(_leftover(d, doc.get("created", "")) for _, d in reps
                        if d.get("node"))
            return self._commit({f"volumes/{name}": rev}, left, gone)
        self._retry(step, f"remove volume {name}")

    # --- replicas and engines --------------------------------------------------------------

    def replicas(self, volume: str) -> list[ReplicaRow]:
        return sorted((_replica(d) for _, d, _ in self._list("replicas/")
                       if d["volume"] == volume), key=lambda r: r.idx)

    def all_replicas(self) -> list[ReplicaRow]:
        return sorted((_replica(d) for _, d, _ in self._list("replicas/")),
                      key=lambda r: (r.volume, r.idx))

    def set_replica_process(self, name: str, proc: ProcessRecord | None,
                            restarted: bool = False) -> None:
        self._update(f"replicas/{name}", lambda d: _set_proc(d, proc, restarted))

    def set_replica_address(self, name: str, address: str) -> None:
        self._update(f"replicas/{name}", lambda d: {**d, "address": address})

    def set_replica_failed_since(self, name: str, when: float | None) -> None:
        def change(d: Doc) -> Doc | None:
            if when is not None and d.get("failed_since") is not None:
                return None   # the first failure's time stays
            return {**d, "failed_since": when}
        self._update(f"replicas/{name}", change)

    def clear_failed(self, volume: str) -> None:
        def step() -> bool | None:
            reps = [(k, d, rev) for k, d, rev in self._list("replicas/")
                    if d["volume"] == volume and d.get("failed_since") is not None]
            if not reps:
                return None
            return self._commit({k: rev for k, _, rev in reps},
                                {k: {**d, "failed_since": None} for k, d, _ in reps})
        self._retry(step, f"clear failures of {volume}")

    def set_replica_directory(self, name: str, directory: str) -> None:
        rel = f"replicas/{name}"

        def step() -> bool | None:
            d, rev = self._get(rel)
            if d is None:
                return None
            read, put = {rel: rev}, {rel: {**d, "directory": directory, "failed_since": None}}
            self._promise(read, put, None, f"replace replica {name}")
            return self._commit(read, put)
        self._retry(step, f"replace replica {name}")

    def move_replica(self, name: str, node: str, directory: str, address: str,
                     guard: int | None = None) -> None:
        rel = f"replicas/{name}"

        def step() -> bool | None:
            d, rev = self._get(rel)
            if d is None:
                return None
            vol, _ = self._get(f"volumes/{d['volume']}")
            created = (vol or {}).get("created", "")
            read, put, gone = self._drop_move(d, created, keep=(node, directory))
            read[rel] = rev
            put[rel] = {**d, "node": node, "directory": directory, "address": address,
                        "pid": None, "create_time": None, "failed_since": None,
                        "moving": None}
            if d.get("node") and (d["node"], d["directory"]) != (node, directory):
                # The old node removes the old directory (manager/leftovers.py).
                put.update([_leftover(d, created)])
            self._promise(read, put, guard, f"move replica {name}")
            return self._commit(read, put, gone)
        self._retry(step, f"move replica {name}")

    def _move_ports(self, name: str) -> tuple[list[tuple[str, int]], list[tuple[str, Doc, int]]]:
        """(the replica's own port keys, its move target's port keys with their documents),
        each with its mod revision."""
        own, target = [], []
        for k, d, rev in self._list("ports/"):
            if d.get("owner") == name:
                own.append((k, rev))
            elif d.get("owner") == move_port_owner(name):
                target.append((k, d, rev))
        return own, target

    def _drop_move(self, d: Doc, created: str, keep: tuple[str, str] | None = None
                   ) -> tuple[dict[str, int], dict[str, Any], list[str]]:
        """(read, put, delete) that give up replica document `d`'s move: the target's port
        released, its directory a leftover of its node (unless it is `keep`)."""
        m = MoveTarget.from_dict(d.get("moving"))
        if m is None:
            return {}, {}, []
        _, target = self._move_ports(d["name"])
        read = {k: rev for k, _, rev in target}
        put: dict[str, Any] = {}
        if (m.node, m.directory) != keep:
            put.update([_leftover({**d, "node": m.node, "directory": m.directory}, created)])
        return read, put, [k for k, _, _ in target]

    def start_move(self, name: str, node: str, directory: str, address: str,
                   guard: int | None = None) -> None:
        rel = f"replicas/{name}"

        def step() -> bool | None:
            d, rev = self._get(rel)
            if d is None:
                return None
            cur = MoveTarget.from_dict(d.get("moving"))
            if cur is not None:
                if (cur.node, cur.directory, cur.address) == (node, directory, address) \
                        and cur.give_up is None:
                    return None
                if cur.give_up is not None:
                    raise Busy(f"replica {name}: its move to node {cur.node} is being given "
                               f"up ({cur.give_up}): try again once it is")
                raise Busy(f"replica {name} is being moved to node {cur.node} already")
            read = {rel: rev}
            put: dict[str, Any] = {rel: {**d, "moving": MoveTarget(
                node, directory, address, None, time.time()).to_dict()}}
            self._promise(read, put, guard, f"move replica {name}")
            return self._commit(read, put)
        self._retry(step, f"start moving replica {name}")

    def set_move_process(self, name: str, proc: ProcessRecord | None) -> None:
        def change(d: Doc) -> Doc | None:
            cur = MoveTarget.from_dict(d.get("moving"))
            if cur is None:
                return None
            cur.process = proc
            return {**d, "moving": cur.to_dict()}
        self._update(f"replicas/{name}", change)

    def give_up_move(self, name: str, reason: str) -> None:
        def change(d: Doc) -> Doc | None:
            cur = MoveTarget.from_dict(d.get("moving"))
            if cur is None or cur.give_up is not None:
                return None
            cur.give_up = reason
            return {**d, "moving": cur.to_dict()}
        self._update(f"replicas/{name}", change)

    def finish_move(self, name: str) -> None:
        rel = f"replicas/{name}"

        def step() -> bool | None:
            d, rev = self._get(rel)
            m = MoveTarget.from_dict((d or {}).get("moving"))
            if d is None or m is None:
                return None
            vol, _ = self._get(f"volumes/{d['volume']}")
            own, target = self._move_ports(name)
            read = {rel: rev, **dict(own), **{k: r for k, _, r in target}}
            put: dict[str, Any] = {rel: {
                **d, "node": m.node, "directory": m.directory, "address": m.address,
                "pid": m.process.pid if m.process else None,
                "create_time": m.process.create_time if m.process else None,
                "failed_since": None, "moving": None}}
            # The target's port is the replica's now; the old one's is free.
            put.update({k: {**pd, "owner": name} for k, pd, _ in target})
            if d.get("node") and (d["node"], d["directory"]) != (m.node, m.directory):
                # The old node stops the old process and removes its directory.
                put.update([_leftover(d, (vol or {}).get("created", ""))])
            return self._commit(read, put, [k for k, _ in own])
        self._retry(step, f"finish the move of replica {name}")

    def cancel_move(self, name: str) -> None:
        rel = f"replicas/{name}"

        def step() -> bool | None:
            d, rev = self._get(rel)
            if d is None or not d.get("moving"):
                return None
            vol, _ = self._get(f"volumes/{d['volume']}")
            read, put, gone = self._drop_move(d, (vol or {}).get("created", ""))
            read[rel] = rev
            put[rel] = {**d, "moving": None}
            return self._commit(read, put, gone)
        self._retry(step, f"cancel the move of replica {name}")

    def leftovers(self, node: str) -> list[LeftoverRow]:
        return [LeftoverRow(**d) for _, d, _ in self._list(f"leftovers/{node}/")]

    def forget_leftover(self, row: LeftoverRow) -> None:
        self.etcd.delete(self._k(_leftover_key(row.node, row.directory)))

    def engine(self, volume: str) -> EngineRow:
        d, _ = self._get(f"engines/{volume}")
        if d is None:
            raise NotFound(f"volume {volume!r} has no engine record")
        return EngineRow(d["volume"], d["nbd_socket"], d["control_socket"], _proc(d),
                         d.get("restarts", 0))

    def set_engine_sockets(self, volume: str, nbd_socket: str, control_socket: str) -> None:
        self._update(f"engines/{volume}", lambda d: {**d, "nbd_socket": nbd_socket,
                                                      "control_socket": control_socket})

    def set_engine_process(self, volume: str, proc: ProcessRecord | None,
                           restarted: bool = False) -> None:
        self._update(f"engines/{volume}", lambda d: _set_proc(d, proc, restarted))

    # --- settings --------------------------------------------------------------------------

    def setting_values(self) -> dict[str, str]:
        return {kv.key.decode().rsplit("/", 1)[1]: kv.value.decode()
                for kv in self.etcd.get_prefix(self._k("settings/"))}

    def put_setting(self, name: str, value: str) -> None:
        self.etcd.put(self._k(f"settings/{name}"), value)

    def delete_setting(self, name: str) -> None:
        self.etcd.delete(self._k(f"settings/{name}"))

    # --- ports -----------------------------------------------------------------------------

    def allocate_port(self, volume: str, owner: str, is_free: Callable[[int], bool]) -> int:
        got: list[int] = []

        def step() -> bool:
            held = self._list("ports/")
            port = pick_port({int(k.rsplit("/", 1)[1]) for k, _, _ in held}, is_free, owner)
            old = [k for k, d, _ in held if d["volume"] == volume and d["owner"] == owner]
            got[:] = [port]
            return self._commit({f"ports/{port}": 0},
                                {f"ports/{port}": {"volume": volume, "owner": owner}}, old)
        self._retry(step, f"allocate a port for {owner}")
        return got[0]

    def ports(self, volume: str) -> dict[str, int]:
        return {d["owner"]: int(k.rsplit("/", 1)[1]) for k, d, _ in self._list("ports/")
                if d["volume"] == volume}

    # --- shares ----------------------------------------------------------------------------

    def add_share(self, volume: str, options: dict[str, Any]) -> None:
        def step() -> bool:
            vol, rev = self._get(f"volumes/{volume}")
            if vol is None:
                raise NotFound(f"volume {volume!r} does not exist")
            if self._get(f"shares/{volume}")[0] is not None:
                raise AlreadyExists(f"volume {volume!r} has a share already")
            return self._commit({f"volumes/{volume}": rev, f"shares/{volume}": 0},
                                {f"shares/{volume}": {"volume": volume, "options": options,
                                                      "pid": None, "restarts": 0}})
        self._retry(step, f"add the share of {volume}")

    def share(self, volume: str) -> ShareRow:
        d, _ = self._get(f"shares/{volume}")
        if d is None:
            raise NotFound(f"volume {volume!r} has no share settings")
        return ShareRow(volume, d["options"], _proc(d), d.get("restarts", 0))

    def set_share_process(self, volume: str, proc: ProcessRecord | None,
                          restarted: bool = False) -> None:
        self._update(f"shares/{volume}", lambda d: _set_proc(d, proc, restarted))

    def share_records(self, volume: str) -> dict[str, Any] | None:
        return self._get(f"share-records/{volume}")[0]

    def put_share_records(self, volume: str, records: dict[str, Any] | None,
                          epoch: int) -> bool:
        vkey, rkey = f"volumes/{volume}", f"share-records/{volume}"
        stored = False

        def step() -> bool | None:
            nonlocal stored
            d, rev = self._get(vkey)
            if d is None or int(d.get("epoch") or 0) != epoch:
                return None   # gone, or attached anew since: not this node's to write
            # Guarded by the volume's revision: a claim_attachment in between makes it retry
            # and then find the new epoch.
            stored = self._commit({vkey: rev}, {rkey: records} if records is not None else {},
                                  [rkey] if records is None else [])
            return stored
        self._retry(step, f"store the NFS client records of {volume}")
        return stored

    # --- nodes and disks -------------------------------------------------------------------

    def put_node(self, row: NodeRow) -> bool:
        return self._commit({f"nodes/{row.name}": 0}, {f"nodes/{row.name}": asdict(row)})

    def node(self, name: str) -> NodeRow:
        d, _ = self._get(f"nodes/{name}")
        if d is None:
            raise NotFound(f"node {name!r} does not exist (see `blockhorn node ls`)")
        return NodeRow(**d)

    def nodes(self) -> list[NodeRow]:
        return sorted((NodeRow(**d) for _, d, _ in self._list("nodes/")), key=lambda n: n.name)

    def update_node(self, name: str, **fields: Any) -> None:
        if not fields or set(fields) - NODE_FIELDS:
            raise ValueError(f"cannot update node fields {sorted(set(fields) - NODE_FIELDS)}")
        self._update(f"nodes/{name}", lambda d: {**d, **fields},
                     NotFound(f"node {name!r} does not exist (see `blockhorn node ls`)"))

    @staticmethod
    def _disk_key(node: str, path: str) -> str:
        return f"disks/{node}/{quote(path, safe='')}"

    def node_alive(self, name: str, ttl_s: int) -> None:
        """`live/<name>` under this store's lease for the node, renewed at each call; a new
        lease when it expired (the node was away longer than ttl_s: it was down meanwhile)."""
        lease = self._leases.get(name)
        if lease is not None:
            try:
                self.etcd.keepalive(lease)
            except LeaseNotFound:
                lease = None
        if lease is None:
            lease, _ = self.etcd.grant(ttl_s)
            self._leases[name] = lease
            self.etcd.put(self._k(f"live/{name}"), "1", lease)
        self.update_node(name, heartbeat=time.time())

    def shared_key(self, candidate: bytes) -> bytes:
        _, kv = self.etcd.create(self._k("meta/cluster-key"), candidate.hex())
        if kv is None:   # created and deleted between compare and read: nobody deletes it
            raise EtcdError("the cluster key vanished from etcd while it was read")
        return bytes.fromhex(kv.value.decode())

    def try_lead(self, node: str, ttl_s: int) -> str | None:
        """`leader` is created under the node's live/ lease, so it goes with the node's
        liveness: a dead leader's key expires with its lease and another node takes it."""
        if node not in self._leases:
            self.node_alive(node, ttl_s)
        try:
            _, kv = self.etcd.create(self._k("leader"), node, self._leases[node])
        except LeaseNotFound:   # our lease just expired: the next heartbeat grants a new one
            self._leases.pop(node, None)
            return None
        return kv.value.decode() if kv is not None else None

    def live_nodes(self, ttl_s: int) -> set[str]:
        return {kv.key.decode().rsplit("/", 1)[1]
                for kv in self.etcd.get_prefix(self._k("live/"))}

    def add_disk(self, row: DiskRow) -> None:
        key = self._disk_key(row.node, row.path)

        def step() -> bool:
            _, node_rev = self._get(f"nodes/{row.node}")
            if node_rev == 0:
                raise NotFound(f"node {row.node!r} does not exist (see `blockhorn node ls`)")
            if self._get(key)[0] is not None:
                raise AlreadyExists(f"disk {row.path} of node {row.node} is registered already")
            return self._commit({f"nodes/{row.node}": node_rev, key: 0}, {key: row.to_dict()})
        self._retry(step, f"add disk {row.path}")

    def disks(self, node: str | None = None) -> list[DiskRow]:
        rows = [DiskRow(**d) for _, d, _ in self._list(f"disks/{node}/" if node else "disks/")]
        return sorted(rows, key=lambda d: (d.node, d.path))

    def update_disk(self, node: str, path: str, **fields: Any) -> None:
        if not fields or set(fields) - DISK_FIELDS:
            raise ValueError(f"cannot update disk fields {sorted(set(fields) - DISK_FIELDS)}")
        self._update(self._disk_key(node, path), lambda d: {**d, **fields},
                     NotFound(f"node {node!r} has no disk {path}"))

    def remove_disk(self, node: str, path: str) -> None:
        if self.etcd.delete(self._k(self._disk_key(node, path))) == 0:
            raise NotFound(f"node {node!r} has no disk {path}")

    # --- backup targets --------------------------------------------------------------------

    def put_backup_target(self, row: BackupTargetRow) -> None:
        self.etcd.put(self._k(f"backup-targets/{row.name}"),
                      json.dumps(row.to_dict(), sort_keys=True))

    def backup_targets(self) -> list[BackupTargetRow]:
        return [BackupTargetRow(**d) for _, d, _ in self._list("backup-targets/")]

    def delete_backup_target(self, name: str) -> bool:
        return self.etcd.delete(self._k(f"backup-targets/{name}")) > 0

