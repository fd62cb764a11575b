"""Tier 1: the settings registry's parsing and the state store behind it (no daemon)."""

from __future__ import annotations

import pytest

from blockhorn.control.store import SqliteStore
from blockhorn.manager.settings import REGISTRY, Setting, Settings, lookup
from blockhorn.types import InvalidArgument, NotFound


def test_numbers_parse_strictly() -> None:
    timeout = lookup("engine-replica-timeout")
    assert timeout.parse("12") == 12 and timeout.parse(" 30 ") == 30 and timeout.parse(8) == 8
    assert timeout.parse(9.0) == 9
    for bad in ("abc", "", "8.5", 8.5, True, None, [8], "0x10"):
        with pytest.raises(InvalidArgument, match="whole number from 8 to 30 s"):
            timeout.parse(bad)
    for out in (7, 31, "-8"):
        with pytest.raises(InvalidArgument, match="out of range"):
            timeout.parse(out)
    with pytest.raises(NotFound, match="known settings: concurrent-replica-rebuild"):
        lookup("engine-replica-timeout-s")


def test_string_settings_take_a_check() -> None:
    def url(v: str) -> None:
        if not v.startswith(("s3://", "nfs://")):
            raise InvalidArgument(f"bad target {v!r}")

    s = Setting("x-target", "", "", 0, None, "a target", "now", check=url)
    assert s.parse("s3://b@r/p") == "s3://b@r/p"
    with pytest.raises(InvalidArgument):
        s.parse("ftp://x")
    with pytest.raises(InvalidArgument):
        s.parse(5)


def test_store_keeps_values_and_reset_forgets_them(tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "db"))
    settings = Settings(store)
    assert {d["name"]: d["value"] for d in settings.list()} == \
        {n: s.default for n, s in REGISTRY.items()}
    assert settings.set("volume-verify-bandwidth-limit", "40")["value"] == 40
    store.put_setting("from-a-newer-version", '"x"')      # unknown names are kept, ignored
    store.put_setting("replica-rebuilding-bandwidth-limit", "not json")
    again = Settings(SqliteStore(str(tmp_path / "db")))
    assert again.get_int("volume-verify-bandwidth-limit") == 40
    assert again.get_int("replica-rebuilding-bandwidth-limit") == 0   # unreadable: default
    assert not again.describe("volume-verify-bandwidth-limit")["is_default"]
    assert again.reset("volume-verify-bandwidth-limit")["is_default"]
    assert again.get_int("volume-verify-bandwidth-limit") == 0
