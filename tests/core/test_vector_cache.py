"""The one vector cache behind `embed` and `embed-text`: keys, shards, resume, damage and the lock."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from respiramfm.cache import VectorCache, content_key, exclusive, group_id, remove_stale_tmp
from respiramfm.cache.tables import read_tsv, write_tsv
from respiramfm.errors import ConfigError, DataError


def _vecs(keys, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=dim).astype(np.float32) for k in keys}


def test_put_get_lookup_and_a_fresh_scan_agree(tmp_path):
    cache = VectorCache(tmp_path / "g", {"what": "test"})
    first, second = _vecs(["a", "b"]), _vecs(["c"], seed=1)
    name1 = cache.put(first, {"bad": "cannot decode"})
    name2 = cache.put(second)
    assert name1 != name2 and "a" in cache and "bad" not in cache and cache.failed == {"bad": "cannot decode"}
    np.testing.assert_array_equal(cache.get("b"), first["b"])
    found = cache.lookup(["c", "a", "missing", "a"])
    assert sorted(found) == ["a", "c"] and found["a"].dtype == np.float32
    with pytest.raises(DataError, match="cannot decode"):
        cache.get("bad")
    again = VectorCache(tmp_path / "g", scan=True)  # another process learns the same content from disk
    assert sorted(again.keys()) == ["a", "b", "c"] and again.failed == cache.failed
    np.testing.assert_array_equal(again.get("c"), second["c"])
    assert json.loads((tmp_path / "g" / "group.json").read_text()) == {"what": "test"}


def test_shard_names_depend_on_keys_only(tmp_path):
    a = VectorCache(tmp_path / "a", {}).put(_vecs(["x", "y"], seed=1), writer="rank0/2")
    b = VectorCache(tmp_path / "b", {}).put(_vecs(["y", "x"], seed=2), writer="rank1/2")
    c = VectorCache(tmp_path / "c", {}).put(_vecs(["x", "z"]))
    assert a == b != c


def test_index_accelerates_but_a_changed_shard_is_read_again(tmp_path):
    cache = VectorCache(tmp_path / "g", {})
    cache.put(_vecs(["a"]))
    name = cache.put(_vecs(["b", "c"]))
    cache.scan()
    cache.write_index()
    fresh = VectorCache(tmp_path / "g", scan=True)
    assert sorted(fresh.keys()) == ["a", "b", "c"]
    bad = tmp_path / "g" / name
    bad.write_bytes(bad.read_bytes()[:40])  # truncated after the index was written
    with pytest.raises(DataError, match="damaged cache shard") as err:
        VectorCache(tmp_path / "g", scan=True)
    assert err.value.path == str(bad)
    (tmp_path / "g" / "index.json").write_text("{not json")
    bad.unlink()
    assert sorted(VectorCache(tmp_path / "g", scan=True).keys()) == ["a"]  # a damaged index is rebuilt


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".shard-x.safetensors.k2j3.safetensors.tmp").write_bytes(b"half")
    (tmp_path / ".file_hashes.json.a1b2.tmp").write_bytes(b"{")
    (tmp_path / "keep.json").write_text("{}")
    assert remove_stale_tmp(tmp_path, "file_hashes.json") == 1
    assert remove_stale_tmp(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_keys_and_group_ids():
    assert content_key("Age: 3.") != content_key("Age: 3. ") and content_key(b"x") == content_key("x")
    assert group_id(encoder="e", kind="pooled") == group_id(kind="pooled", encoder="e")
    assert group_id(encoder="e", kind="pooled") != group_id(encoder="e", kind="tokens")


def test_writer_lock_refuses_and_short_sections_wait(tmp_path):
    lock = tmp_path / ".lock"
    busy = ConfigError("another run is writing here", path=tmp_path)
    with exclusive(lock, busy):
        with pytest.raises(ConfigError, match="another run"):
            with exclusive(lock, busy):
                pass
    order: list[str] = []

    def second():
        with exclusive(lock):  # no `busy`: waits for the holder
            order.append("second")

    with exclusive(lock):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join(timeout=30)
    assert order == ["first", "second"]


def test_tables_round_trip_and_refuse_a_wrong_header(tmp_path):
    write_tsv(tmp_path / "t.tsv", ("record_id", "reason"), [("r1", "empty\tcontext\nhere")])
    rows = read_tsv(tmp_path / "t.tsv", ("record_id", "reason"))
    assert rows == [{"record_id": "r1", "reason": "empty context here"}]
    assert read_tsv(tmp_path / "absent.tsv") == []
    with pytest.raises(DataError, match="malformed table"):
        read_tsv(tmp_path / "t.tsv", ("record_id", "text_sha256"))
