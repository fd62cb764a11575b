"""Cluster settings: Longhorn's names, typed, validated, stored in the daemon's state store.

A setting that was never set reads as its default; `reset` forgets the stored value, so a later
change of the default reaches it. Values are stored as JSON in the state store's settings
(control/store). A stored name this version does not know (written by a newer one) is kept
and ignored. The table in docs/OPERATIONS.md lists every setting and when it takes effect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockhorn.config import REPLICA_TIMEOUT_S
from blockhorn.control.store import StateStore
from blockhorn.engine.limits import write_limits
from blockhorn.types import InvalidArgument, NotFound

ENGINE_REPLICA_TIMEOUT = "engine-replica-timeout"
REPLENISHMENT_WAIT = "replica-replenishment-wait-interval"
REBUILD_BANDWIDTH = "replica-rebuilding-bandwidth-limit"
REBUILDS_PER_NODE = "concurrent-replica-rebuild-per-node-limit"
VERIFY_BANDWIDTH = "volume-verify-bandwidth-limit"
SOFT_ANTI_AFFINITY = "replica-soft-anti-affinity"
ZONE_SOFT_ANTI_AFFINITY = "replica-zone-soft-anti-affinity"
OVER_PROVISIONING = "storage-over-provisioning-percentage"
MINIMAL_AVAILABLE = "storage-minimal-available-percentage"
DATA_LOCALITY = "default-data-locality"
DATA_LOCALITIES = ("disabled", "best-effort")
COMMIT_QUORUM = "engine-commit-quorum"
COMMIT_QUORUMS = ("auto", "on", "off")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Setting:
    """One setting. Its default's type is its type: a bool (true/false), an int (with a
    range) or a str (checked by `check`, which raises InvalidArgument; e.g. a URL)."""

    name: str
    default: bool | int | str
    unit: str             # "s", "MiB/s" or "" (a count, or a string setting)
    minimum: int
    maximum: int | None   # None: no upper bound
    description: str      # one line
    applies: str          # when a change takes effect
    check: Callable[[str], None] | None = None

    def parse(self, value: Any) -> bool | int | str:
        """`value` (JSON, or the CLI's text) as this setting's type, or a clear
        InvalidArgument naming what is allowed."""
        if isinstance(self.default, bool):
            text = str(value).strip().lower()
            if isinstance(value, bool) or text in _TRUE + _FALSE:
                return value if isinstance(value, bool) else text in _TRUE
            raise InvalidArgument(f"invalid value {value!r} for {self.name}: true or false")
        if isinstance(self.default, str):
            if not isinstance(value, str):
                raise InvalidArgument(f"invalid value {value!r} for {self.name}: a string")
            if self.check is not None:
                self.check(value)
            return value
        if isinstance(value, bool):
            value = None   # JSON true/false are not numbers here
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value.strip())
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise InvalidArgument(f"invalid value {value!r} for {self.name}: "
                                  f"a whole number{self._range_text()} is needed")
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise InvalidArgument(f"{self.name}={value} is out of range: "
                                  f"use{self._range_text()}")
        return value

    def _range_text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.maximum is None:
            return f" >= {self.minimum}{unit}"
        return f" from {self.minimum} to {self.maximum}{unit}"


REGISTRY: dict[str, Setting] = {s.name: s for s in [
    Setting(REPLENISHMENT_WAIT, 600, "s", 0, None,
            "how long a failed replica may stay ERR (or unstartable) before a new one on "
            "another disk replaces it",
            "at once: the daemon's next supervision pass (about a second)"),
    Setting(ENGINE_REPLICA_TIMEOUT, int(REPLICA_TIMEOUT_S), "s", 8, 30,
            "how long the engine waits for a replica's answer before setting it ERR",
            "engines started after the change (attach, or an engine restart)"),
    Setting(REBUILD_BANDWIDTH, 0, "MiB/s", 0, None,
            "most bandwidth one replica rebuild may use; 0 = unlimited",
            "at once: running rebuilds read it again within a second"),
    Setting(REBUILDS_PER_NODE, 5, "", 0, None,
            "most replica rebuilds running at once on one node; 0 disables rebuilding",
            "at once for rebuilds that start later (a running one keeps its slot)"),
    Setting(SOFT_ANTI_AFFINITY, False, "", 0, None,
            "allow two replicas of a volume on one node when there are too few nodes",
            "the next placement (volume create, replica replacement)"),
    Setting(ZONE_SOFT_ANTI_AFFINITY, True, "", 0, None,
            "allow two replicas of a volume in one zone when there are too few zones "
            "(false: never)", "the next placement (volume create, replica replacement)"),
    Setting(OVER_PROVISIONING, 100, "%", 0, None,
            "replica sizes a disk may be promised, in percent of its capacity less reserve",
            "the next placement (volume create, replica replacement)"),
    Setting(MINIMAL_AVAILABLE, 25, "%", 0, 100,
            "a disk with less free space than this, in percent of its capacity, takes no "
            "new replica", "the next placement (volume create, replica replacement)"),
    Setting(DATA_LOCALITY, "best-effort", "", 0, None,
            "best-effort: put one replica on the node the engine runs on when it can; "
            "disabled: no preference", "the next placement (volume create, replica replacement)",
            check=lambda v: _one_of(DATA_LOCALITY, v, DATA_LOCALITIES)),
    Setting(COMMIT_QUORUM, "auto", "", 0, None,
            "acknowledge writes only while a majority of a volume's replicas is in sync, so "
            "a volume whose engine's node died comes up from any majority; auto: on for "
            "cluster volumes of 3 or more replicas", "engines started after the change "
            "(attach, or an engine restart)",
            check=lambda v: _one_of(COMMIT_QUORUM, v, COMMIT_QUORUMS)),
    Setting(VERIFY_BANDWIDTH, 0, "MiB/s", 0, None,
            "default rate of `volume verify`: volume MiB compared per second; "
            "0 = unlimited",
            "the next `volume verify` without --rate"),
]}


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"invalid value {value!r} for {name}: use {' or '.join(allowed)}")


def commit_quorum(settings: Settings, cluster: bool, replicas: int) -> bool:
    """Whether an engine runs in quorum mode (docs/DURABILITY.md, "The commit quorum"): by
    default on a cluster with 3 or more replicas (with 2, a majority is both: every failure
    would stop writes; on one host no other node starts the volume)."""
    value = settings.get(COMMIT_QUORUM)
    if value == "auto":
        return cluster and replicas >= 3
    return value == "on"


REBUILD_LIMIT_SETTINGS = {REBUILD_BANDWIDTH, REBUILDS_PER_NODE}


def write_rebuild_limits(settings: Settings, path: str) -> None:
    """The node's rebuild limits file every engine reads (engine/limits.py): written when
    the daemon starts and whenever one of REBUILD_LIMIT_SETTINGS changes."""
    write_limits(path, settings.get_int(REBUILD_BANDWIDTH), settings.get_int(REBUILDS_PER_NODE))


def lookup(name: str) -> Setting:
    try:
        return REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown setting {name!r}; known settings: "
                       f"{', '.join(sorted(REGISTRY))}") from None


class Settings:
    """The settings of one daemon home, over its state store."""

    def __init__(self, store: StateStore, values: dict[str, str] | None = None) -> None:
        self.store = store
        self._values = values   # a snapshot (`snapshot`), else the store is read each time

    @classmethod
    def snapshot(cls, store: StateStore) -> Settings:
        """The settings as stored now, read once (on etcd, one round trip for many gets)."""
        return cls(store, store.setting_values())

    def _stored(self) -> dict[str, str]:
        return self._values if self._values is not None else self.store.setting_values()

    def get(self, name: str) -> bool | int | str:
        value: bool | int | str = self.describe(name)["value"]
        return value

    def get_bool(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, bool):
            raise TypeError(f"setting {name} is not true/false")
        return value

    def get_int(self, name: str) -> int:
        value = self.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"setting {name} is not a number")
        return value

    def describe(self, name: str) -> dict[str, Any]:
        return self._describe(lookup(name), self._stored())

    def list(self) -> list[dict[str, Any]]:
        stored = self._stored()
        return [self._describe(REGISTRY[n], stored) for n in sorted(REGISTRY)]

    def set(self, name: str, value: Any) -> dict[str, Any]:
        setting = lookup(name)
        self.store.put_setting(name, json.dumps(setting.parse(value)))
        return self.describe(name)

    def reset(self, name: str) -> dict[str, Any]:
        lookup(name)
        self.store.delete_setting(name)
        return self.describe(name)

    @staticmethod
    def _describe(s: Setting, stored: dict[str, str]) -> dict[str, Any]:
        value = s.default
        if s.name in stored:
            try:
                value = s.parse(json.loads(stored[s.name]))
            except (ValueError, InvalidArgument):
                value = s.default   # unreadable (hand-edited database): the default holds
        return {"name": s.name, "value": value, "default": s.default,
                "is_default": s.name not in stored, "unit": s.unit, "minimum": s.minimum,
                "maximum": s.maximum, "description": s.description, "applies": s.applies}
