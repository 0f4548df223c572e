"""The stat-keyed sha256 cache: an unchanged file is not read again, a changed one always
is (same size and restored mtime included), and a bad cache file is ignored and rewritten."""

import hashlib
import json
import os
from pathlib import Path

import pytest

import dqtool.formats.hashcache as hc


def _old_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return path


@pytest.fixture
def settled(monkeypatch):
    """Files written by a test are younger than RACY_NS (their ctime cannot be set back)."""
    monkeypatch.setattr(hc, "RACY_NS", 0)


@pytest.fixture
def reads(monkeypatch):
    seen = []
    real = hc.sha256_bytes_of
    monkeypatch.setattr(hc, "sha256_bytes_of", lambda p, *a: seen.append(Path(p).name) or real(p, *a))
    return seen


def test_unchanged_file_is_answered_from_the_cache_file(tmp_path, settled, reads):
    f = _old_file(tmp_path / "model.safetensors", b"w" * 4096)
    cache = tmp_path / "c" / "cache.json"
    assert hc.HashCache(cache).sha256(f) == hashlib.sha256(b"w" * 4096).hexdigest()  # not saved yet
    c = hc.HashCache(cache)
    c.sha256(f)
    c.save()
    reads.clear()
    again = hc.HashCache(cache)  # a new process: loads the file
    assert again.sha256(f) == hashlib.sha256(b"w" * 4096).hexdigest()
    assert reads == [] and again.hits == 1 and again.hashed == 0


def test_same_size_rewrite_with_restored_mtime_is_seen(tmp_path, settled):
    f = _old_file(tmp_path / "model.safetensors", b"a" * 4096)
    st = f.stat()
    c = hc.HashCache(tmp_path / "cache.json")
    assert c.sha256(f) == hashlib.sha256(b"a" * 4096).hexdigest()
    with open(f, "r+b") as fh:  # in place: same inode, same size
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back, as `touch -r` would
    assert (f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    # ctime moved (no user call can set it), so the stat key differs and the file is read again.
    assert c.sha256(f) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest() and c.hashed == 2


def test_retrained_file_new_bytes_and_mtime_is_seen(tmp_path, settled):
    f = _old_file(tmp_path / "model.safetensors", b"a" * 4096)
    c = hc.HashCache(tmp_path / "cache.json")
    c.sha256(f)
    c.save()
    f.write_bytes(b"c" * 4096)  # what a retrain saving to the same path does
    assert hc.HashCache(tmp_path / "cache.json").sha256(f) == hashlib.sha256(b"c" * 4096).hexdigest()


def test_a_file_changed_within_the_racy_window_is_not_cached(tmp_path, reads):
    f = tmp_path / "young.bin"
    f.write_bytes(b"x")  # ctime is now: a same-tick rewrite could keep every stat field
    c = hc.HashCache(tmp_path / "cache.json")
    c.sha256(f)
    c.sha256(f)
    assert reads == ["young.bin", "young.bin"] and c.entries == {}


@pytest.mark.parametrize("garbage", [b"\x00\xff not json", b'{"version": 1, "entries": [1, 2]}',
                                     b'{"version": 99, "entries": {}}', b"",
                                     b'{"version": 1, "entries": {"/x": [1, 2, 3, 4, 5, "not-a-sha"]}}'])
def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, settled, garbage):
    f = _old_file(tmp_path / "w.bin", b"payload")
    cache = tmp_path / "cache.json"
    cache.write_bytes(garbage)
    c = hc.HashCache(cache)
    assert c.sha256(f) == hashlib.sha256(b"payload").hexdigest() and c.hashed == 1
    c.save()
    doc = json.loads(cache.read_text())
    assert doc["version"] == hc.VERSION and list(doc["entries"]) == [os.path.realpath(f)]


def test_forged_entry_with_a_wrong_stat_key_is_not_trusted(tmp_path, settled):
    f = _old_file(tmp_path / "w.bin", b"payload")
    cache = tmp_path / "cache.json"
    st = f.stat()
    wrong = [st.st_size, st.st_mtime_ns, st.st_ctime_ns + 1, st.st_ino, st.st_dev, "0" * 64]
    cache.write_text(json.dumps({"version": 1, "entries": {os.path.realpath(f): wrong}}))
    assert hc.HashCache(cache).sha256(f) == hashlib.sha256(b"payload").hexdigest()


def test_unwritable_cache_location_keeps_working_in_memory(tmp_path, settled):
    blocker = tmp_path / "file"
    blocker.write_text("")
    f = _old_file(tmp_path / "w.bin", b"payload")
    c = hc.HashCache(blocker / "cache.json")  # parent is a file: cannot be created
    assert c.sha256(f) == hashlib.sha256(b"payload").hexdigest()
    c.save()
    assert c.sha256(f) == hashlib.sha256(b"payload").hexdigest() and c.hits == 1


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DQTOOL_HASH_CACHE", str(tmp_path / "h.json"))
    assert hc.shared().path == tmp_path / "h.json"
    monkeypatch.setenv("DQTOOL_HASH_CACHE", "off")
    assert hc.shared().path is None
    monkeypatch.delenv("DQTOOL_HASH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hc.default_path() == tmp_path / "xdg" / "dqtool" / "sha256-cache.json"


def test_describe_source_records_every_top_level_file_and_the_manifest(tmp_path, tiny_dir):
    import shutil

    from dqtool.formats.hf import describe_source
    from dqtool.formats.manifest import write_manifest

    d = tmp_path / "m"
    shutil.copytree(tiny_dir("bart"), d)
    (d / "README.md").write_text("notes")
    (d / "sub").mkdir()
    (d / "sub" / "x.bin").write_bytes(b"1")
    desc = describe_source(d)
    expect = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.iterdir()
              if f.is_file() and f.suffix != ".md"}
    assert desc["files_sha256"] == expect and "config.json" in expect and "tokenizer.json" in expect
    assert desc["weights_sha256"] == {"model.safetensors": expect["model.safetensors"]}
    assert "manifest_sha256" not in desc
    write_manifest(d, "demo", {}, {})
    m = describe_source(d)
    assert m["manifest_sha256"] == hashlib.sha256((d / "dqtool-manifest.json").read_bytes()).hexdigest()
    assert m["files_sha256"] == expect  # the manifest is recorded by its own hash, not as a file
