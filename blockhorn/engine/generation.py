"""Generations: which replicas an engine may trust at start (docs/DURABILITY.md, "Generations").

Vocabulary:
- The *in-sync set* is the set of RW replicas. Every change of it is a *commit* (G+1, S'):
  a replica set ERR, a resync finishing (the replica joins), an engine starting.
- A commit is written first to the engine's *record* (`generation.json`, when the engine has
  one), then to every replica that stays in the set, and last to a joining replica — whose
  `Rebuilding` flag is cleared in that same atomic write. No write, TRIM, ZERO or FLUSH is
  acknowledged while a commit is pending.
- A replica is *current* when it is a member of the newest set, not Rebuilding and not in
  Error. The newest set is the record's; without a usable record, the set carried by the
  replica with the highest generation — and then every member of it must be reachable, since
  an unreachable one may carry a newer set.

Why a current replica holds every acknowledged write: a replica leaves the set only by a
commit, and a commit completes — so acknowledgements resume — only once every member holds
it; a replica rejoins only through a resync, which marks it Rebuilding until the join commit
reaches it. So a member that is not Rebuilding was in the set at every commit since the last
one it holds, and none of those commits completed without it: every write acknowledged in
that time reached it. Among current replicas the highest revision (mutations that
succeeded) is the source; the others are resynced from it, never promoted.

*Quorum mode* (`choose(..., quorum=True)`, cluster volumes of 3 or more replicas: the engine
config's `quorum`): every commit also carries its *voters* U (the configured replica names) and
completes only with a majority of U in its set, so no write is acknowledged by a minority.
Then, when members of the newest set are unreachable, a start may still trust the reachable
ones if a majority of U answered *at the top generation T* with the same voters: any commit
above T that completed reached a majority of U, hence one of those replicas, which would carry
it (docs/DURABILITY.md, "The commit quorum"). That needs one more thing when U changes (a
replica added or removed between two engines): the first commit of an engine whose U differs
from the voters V of the newest commit it saw — or that is not in quorum mode at all (the
setting turned off: its later commits may be minorities) — completes only with a majority
of V as well (`prior_voters`), so the first commit above any generation always meets a
majority of the voters written there — also when U changes back to V later (V → U → V, or
quorum off and on again), which the equality of voters alone cannot tell from no change.

The functions here are pure (no I/O but the record file), so the rule is checked by a
hypothesis state machine (tests/t1_generation_rule.py).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

from blockhorn.fsutil import atomic_write, atomic_write_json, read_json
from blockhorn.replica.store import REVISION_COUNTER, REVISION_SIZE, VOLUME_META, decode_revision
from blockhorn.types import BlockhornError, ReplicaUnavailable

RECORD_VERSION = 1


@dataclass(frozen=True)
class Seen:
    """What an engine learns of one reachable replica at start (its STAT)."""
    name: str
    generation: int
    members: frozenset[str]
    rebuilding: bool
    error: bool
    revision: int
    suspect: bool       # opened Dirty (a crash) or halted after a failed mutation
    # The voters of the commit at `generation` (quorum mode); None: not quorum-committed.
    voters: frozenset[str] | None = None

    @classmethod
    def from_stat(cls, name: str, stat: dict[str, Any]) -> Seen:
        voters = stat.get("voters")
        return cls(name, int(stat.get("generation", 0)), frozenset(stat.get("members") or ()),
                   bool(stat.get("rebuilding")), bool(stat.get("error")),
                   int(stat.get("revision", 0)),
                   bool(stat.get("suspect", stat.get("opened_dirty"))),
                   frozenset(voters) if voters else None)


@dataclass(frozen=True)
class Record:
    generation: int
    members: frozenset[str]
    epoch: int = 0      # the attach epoch of the engine that wrote it (cluster; 0: one host)


def majority(voters: int) -> int:
    """The fewest replicas that make a majority of `voters`: any two such sets meet."""
    return voters // 2 + 1


@dataclass
class Decision:
    generation: int                 # the newest generation known; the start commits this + 1
    rw: list[str]                   # replicas that start RW (identical to the source)
    source: str                     # the replica whose content defines the volume
    adopt: bool                     # the source is suspect: the engine adopts it explicitly
    resync: list[str] = field(default_factory=list)   # reachable replicas to resync
    why: str = ""
    # The voters of the newest commit seen, where they differ from this engine's (the
    # replicas changed since) or this engine is not in quorum mode: its first commit must
    # hold a majority of each as well (`prior_voters`).
    prior_voters: list[frozenset[str]] = field(default_factory=list)


def newest_set(seen: list[Seen], record: Record | None
               ) -> tuple[int, frozenset[str], frozenset[str] | None]:
    """(generation, members, required): the record's set when it is at least as new as every
    replica (required None: missing members do not matter); else the set the reachable
    replicas with the highest generation carry, and `required` the replicas that must all
    answer (any of them may carry a newer set)."""
    top = max((s.generation for s in seen), default=0)
    if record is not None and record.generation >= top:
        return record.generation, record.members, None
    carried = [s.members for s in seen if s.generation == top]
    # Two replicas at the same generation carry the same set (one commit); if they ever
    # disagree, trust only replicas named by both and require everyone named by either.
    members = frozenset.intersection(*carried) if carried else frozenset()
    required = frozenset.union(*carried) if carried else frozenset()
    return top, members, required


def quorum_witnesses(configured: list[str], seen: list[Seen], generation: int
                     ) -> tuple[int, int]:
    """(k, n): k of the n voters of the commit at `generation` answered at that generation;
    k is 0 unless every reachable replica there carries the same voters, equal to the
    configured replicas (a changed U takes the rule's path with every member answering)."""
    top = [s for s in seen if s.generation == generation]
    voters = {s.voters for s in top}
    if len(voters) != 1:
        return 0, len(configured)
    (u,) = voters
    if not u or u != frozenset(configured):
        return 0, len(configured)
    return len({s.name for s in top} & u), len(u)


def prior_voters(configured: list[str], seen: list[Seen], quorum: bool
                 ) -> list[frozenset[str]]:
    """The voter sets that the replicas at the highest generation seen carry, other than
    the configured replicas in quorum mode: an engine whose replicas changed since that
    commit, or one not in quorum mode (its later commits may be minorities), completes its
    first commit only with a majority of each of them too (module docstring)."""
    top = max((s.generation for s in seen), default=0)
    return sorted({s.voters for s in seen if s.generation == top and s.voters
                   and not (quorum and s.voters == frozenset(configured))}, key=sorted)


def choose(configured: list[str], seen: list[Seen], record: Record | None,
           quorum: bool = False) -> Decision:
    """Apply the start rule; raise ReplicaUnavailable (with the reason) when it cannot.
    `quorum`: the volume's commits hold a majority of its voters (module docstring)."""
    by_name = {s.name: s for s in seen}
    generation, members, required = newest_set(seen, record)
    path = ""
    if quorum and len(seen) < majority(len(configured)):
        raise ReplicaUnavailable(
            f"{len(seen)} of {len(configured)} replicas answered, a majority "
            f"({majority(len(configured))}) is needed")
    if required is not None:
        if not required:
            # Replicas made before generations carried members: every configured replica is
            # a member, and all must answer before one of them is trusted.
            members = required = frozenset(configured)
        missing = sorted(m for m in required if m in configured and m not in by_name)
        k, n = quorum_witnesses(configured, seen, generation) if quorum else (0, 0)
        if missing and quorum and k >= majority(n):
            # No commit above `generation` completed: it would have reached one of these k.
            path = (f"; quorum: {k} of {n} voters answered at generation {generation} "
                    f"({', '.join(missing)} unreachable)")
        elif missing:
            raise ReplicaUnavailable(
                f"replica(s) {', '.join(missing)} of the newest in-sync set (generation "
                f"{generation}) are unreachable and may hold newer data: bring them back, or "
                "salvage explicitly from a replica you choose, accepting that writes only the "
                "missing ones hold are lost (`blockhorn volume attach VOLUME --salvage "
                "REPLICA`)"
                + (f"; the commit quorum cannot decide either: {k} of {n or len(configured)} "
                   f"voters answered at generation {generation}, a majority is needed"
                   if quorum else "") + _describe(seen))
    current = [s for s in seen if s.name in members and not s.rebuilding and not s.error]
    if not current:
        raise ReplicaUnavailable(
            "no current replica: none of the in-sync set "
            f"({', '.join(sorted(members)) or 'empty'}, generation {generation}) is reachable "
            "and whole" + _describe(seen))
    best = max(s.revision for s in current)
    top = [s for s in current if s.revision == best]
    clean = [s for s in top if not s.suspect]
    rw = [s.name for s in clean] if clean else [top[0].name]
    source = rw[0]
    resync = [s.name for s in seen if s.name not in rw]
    why = (f"generation {generation}, members {sorted(members)}, revision {best}; "
           f"{'clean' if clean else 'suspect'} source {source}{path}")
    # Also without quorum: an engine of a volume whose quorum was turned off must not
    # complete a commit that misses a majority of the voters a later quorum start counts.
    return Decision(generation, rw, source, not clean, resync, why,
                    prior_voters(configured, seen, quorum))


def salvage(seen: list[Seen], name: str) -> Decision:
    """The operator's override: `name` is the source whatever the rule says."""
    by_name = {s.name: s for s in seen}
    if name not in by_name:
        raise ReplicaUnavailable(f"cannot salvage from {name}: it is not reachable")
    generation = max((s.generation for s in seen), default=0)
    return Decision(generation, [name], name, True, [s.name for s in seen if s.name != name],
                    f"salvage from {name} (operator's choice)")


def _describe(seen: list[Seen]) -> str:
    if not seen:
        return "; no replica answered"
    return "; seen: " + ", ".join(
        f"{s.name} (gen {s.generation}, rev {s.revision}"
        + (", rebuilding" if s.rebuilding else "") + (", error" if s.error else "") + ")"
        for s in seen)


def seen_on_disk(name: str, directory: str) -> Seen | None:
    """What the rule needs of a replica that is not running (offline clones, backups), read
    from its files; None when the directory holds no readable replica."""
    try:
        meta = read_json(os.path.join(directory, VOLUME_META))
        with open(os.path.join(directory, REVISION_COUNTER), "rb") as f:
            revision = decode_revision(f.read(REVISION_SIZE))
    except (OSError, ValueError, BlockhornError):
        return None
    return Seen(name, int(meta.get("Generation", 0)), frozenset(meta.get("Members") or ()),
                bool(meta.get("Rebuilding")), bool(meta.get("Error")), revision,
                bool(meta.get("Dirty")), frozenset(meta.get("Voters") or ()) or None)


def trusted_on_disk(replicas: list[tuple[str, str]]) -> list[str]:
    """Directories of the replicas [(name, directory)] the start rule trusts, source first:
    where an offline reader (a clone) may read. Raises ReplicaUnavailable like `choose`."""
    seen = [s for s in (seen_on_disk(n, d) for n, d in replicas) if s is not None]
    decision = choose([n for n, _ in replicas], seen, None)
    where = dict(replicas)
    return [where[n] for n in decision.rw]


# --- the record ------------------------------------------------------------------------------

def load_record(path: str, epoch: int = 0) -> Record | None:
    """The record, or None when there is none for attach epoch `epoch`: on a cluster a node's
    record is that of the last engine *it* ran, and an attachment on another node since (a
    higher epoch) may have committed without it, so only this attachment's record counts."""
    if not path or not os.path.exists(path):
        return None
    data = read_json(path)
    if int(data.get("version", 0)) > RECORD_VERSION:
        raise BlockhornError(f"{path}: generation record version {data['version']} is newer "
                             "than this blockhorn understands", errno.EPROTO)
    try:
        record = Record(int(data["generation"]), frozenset(str(m) for m in data["members"]),
                        int(data.get("epoch", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise BlockhornError(f"{path}: corrupt generation record ({e})", errno.EUCLEAN) from None
    return record if record.epoch == epoch else None


def _salvage_marker(record: str) -> str:
    return record + ".salvaged"


def salvaged(record: str, salvage_id: str) -> bool:
    """True when an engine of this node already started from the salvage `salvage_id`: its
    start commit made the salvaged replica the newest set, and a second salvage from it
    (an engine restarted before the manager cleared the request) could drop writes
    acknowledged since."""
    if not record or not salvage_id:
        return False
    try:
        with open(_salvage_marker(record)) as f:
            return f.read().strip() == salvage_id
    except FileNotFoundError:
        return False


def record_salvage(record: str, salvage_id: str) -> None:
    """Durably note that the salvage `salvage_id` is done (after its start commit)."""
    if record and salvage_id:
        atomic_write(_salvage_marker(record), salvage_id.encode() + b"\n")


def save_record(path: str, generation: int, members: list[str], epoch: int = 0) -> None:
    """Durably (temp file, fsync, rename, fsync of the directory) before any replica."""
    atomic_write_json(path, {"version": RECORD_VERSION, "generation": generation,
                             "members": sorted(members), "epoch": epoch})
