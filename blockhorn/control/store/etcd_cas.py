"""The compare-and-swap machinery of the etcd store (control/store/etcd.py): every change is
read, compute, commit-if-unchanged, retried (the module docstring there)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from blockhorn.cluster.etcd import Etcd, EtcdError, cmp_mod, op_delete, op_put

CAS_ATTEMPTS = 100   # retries of one change lost to concurrent writers before giving up

Doc = dict[str, Any]


class Conflict(EtcdError):
    """A change lost its compare-and-swap CAS_ATTEMPTS times in a row."""


class EtcdCas:
    prefix: str   # every key's, "/.../"
    etcd: Etcd

    def _k(self, rel: str) -> str:
        return self.prefix + rel

    def _get(self, rel: str) -> tuple[Doc | None, int]:
        kv = self.etcd.get(self._k(rel))
        return (json.loads(kv.value), kv.mod_revision) if kv else (None, 0)

    def _list(self, rel: str) -> list[tuple[str, Doc, int]]:
        """(key relative to the prefix, document, mod revision) of every key under `rel`."""
        return [(kv.key.decode()[len(self.prefix):], json.loads(kv.value), kv.mod_revision)
                for kv in self.etcd.get_prefix(self._k(rel))]

    def _commit(self, read: dict[str, int], put: dict[str, Any],
                delete: list[str] | None = None) -> bool:
        """Put/delete (relative keys) if every key in `read` still has its mod revision."""
        won, _ = self.etcd.txn([cmp_mod(self._k(k), rev) for k, rev in read.items()],
                               [op_put(self._k(k), json.dumps(v, sort_keys=True))
                                for k, v in put.items()]
                               + [op_delete(self._k(k)) for k in delete or []])
        return won

    def _retry(self, step: Callable[[], bool | None], what: str) -> None:
        """Run `step` (read, compute, _commit) until it commits or has nothing to do (None)."""
        for _ in range(CAS_ATTEMPTS):
            if step() is not False:
                return
        raise Conflict(f"{what}: lost {CAS_ATTEMPTS} compare-and-swaps in a row to other "
                       "writers; try again")

    def _update(self, rel: str, change: Callable[[Doc], Doc | None],
                missing: Exception | None = None) -> None:
        """Apply `change` to one document (None from it: leave the document alone)."""
        def step() -> bool | None:
            doc, rev = self._get(rel)
            if doc is None:
                if missing is not None:
                    raise missing
                return None
            new = change(doc)
            return None if new is None else self._commit({rel: rev}, {rel: new})
        self._retry(step, f"update {rel}")
