"""The cache folder's keyed JSON files (``iso_kernels.cache.KeyedJsonFile``): values stored under exact keys,
and unreadable files treated as empty. The calibration file built on it: tests/planning/test_calibration.py."""

import json
import warnings

import pytest

from iso_kernels.cache import KeyedJsonFile


def measurements(path):
    return KeyedJsonFile(path, "measurement", "measuring again", parse=lambda value: tuple(value))


def test_cache_roundtrip_and_key_mismatch(tmp_path):
    store = measurements(tmp_path / "cache" / "measurements.json")  # the folder is made on the first save
    key = {"gpu": "NVIDIA H100 80GB HBM3", "model": "llama2-70b", "tp": 8, "dtype": "bfloat16"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file yet: nothing to warn about
        assert store.load(key) is None
    path = store.save(key, [1.0, float("inf")])
    assert path == tmp_path / "cache" / "measurements.json"
    store.save({**key, "tp": 1}, [2.0])
    assert store.load(dict(reversed(list(key.items())))) == (1.0, float("inf"))  # key order does not matter
    assert store.load({**key, "tp": 1}) == (2.0,)  # parsed
    assert store.load({**key, "tp": 4}) is None
    assert measurements(path).load(key) == (1.0, float("inf"))  # another reader of the same file
    store.save(key, [3.0])  # replaces, does not duplicate
    assert store.load(key) == (3.0,)
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_cache_ignores_corrupt_file(tmp_path):
    path = tmp_path / "measurements.json"
    path.write_text("{not json")
    store = measurements(path)
    with pytest.warns(UserWarning, match="unreadable measurement cache .*; measuring again"):
        assert store.load({"tp": 2}) is None
    assert store.save({"tp": 2}, [1.0]) == path  # a save replaces the corrupt file
    assert store.load({"tp": 2}) == (1.0,)


def test_cache_key_must_be_a_json_dict(tmp_path):
    store = measurements(tmp_path / "measurements.json")
    with pytest.raises(TypeError, match="key must be JSON"):
        store.save({"f": object()}, [1.0])
    with pytest.raises(TypeError, match="key must be a dict"):
        store.load([("tp", 2)])
