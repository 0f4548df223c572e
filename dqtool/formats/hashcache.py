"""sha256 of files, remembered by their stat so an unchanged file is hashed once.

A plan (``dqtool compress``) hashes the teacher folder and the data on every run to
see whether they changed since a stage used them; for a multi-GB teacher that would
cost minutes per plan. This module keeps ``{real path: (size, mtime_ns, ctime_ns,
inode, device) -> sha256}`` in one JSON file and reads a file again only when one of
those fields differs.

Where: ``$DQTOOL_HASH_CACHE`` (a file path; ``off`` keeps the cache in memory only),
else ``$XDG_CACHE_HOME/dqtool/sha256-cache.json``, else
``~/.cache/dqtool/sha256-cache.json``. A cache file that cannot be read or parsed, or an
entry of the wrong shape, is ignored (those files are hashed again) and the file is
rewritten on the next save; a folder that cannot be written keeps the cache in memory.
Writes are atomic (temporary file + rename), so a killed run never leaves half a cache.

The trade-off of a stat key, and what closes its holes:

* A rewrite changes the file's ``ctime`` (the kernel sets it on every write and no
  user call can set it back), so a same-size rewrite whose ``mtime`` was restored with
  ``touch -r`` or ``os.utime`` is still seen; replacing the file (save to a temporary
  file and rename, as ``save_pretrained`` and ``safetensors`` do) changes the inode too.
* Time stamps are coarse on some file systems (FAT: 2 s), so a file rewritten within
  one tick of being hashed could keep every field. An entry is therefore stored only when
  the file's last change is at least :data:`RACY_NS` older than the hash (git's "racily
  clean" rule); a file that young is simply hashed again next time.
* What a stat key cannot see: a writer that changes bytes without the kernel updating
  the time stamps (raw block-device edits, some network file systems that cache
  attributes, a clock set backwards while restoring the same times). Integrity against
  tampering is the job of each dqtool folder's manifest, which ``verify_folder`` checks
  by reading every byte; this cache only decides whether an *input* changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

VERSION = 1
RACY_NS = 2_000_000_000          # a file changed less than 2 s before hashing is not cached
MAX_ENTRIES = 50_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def default_path() -> Path | None:
    """The cache file, or ``None`` when ``DQTOOL_HASH_CACHE=off`` (memory only)."""
    env = os.environ.get("DQTOOL_HASH_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dqtool" / "sha256-cache.json"


def sha256_bytes_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (no cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _valid(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 6 and all(type(x) is int for x in entry[:5])
            and isinstance(entry[5], str) and bool(_HEX64.match(entry[5])))


class HashCache:
    """A stat-keyed sha256 cache backed by one JSON file (``path=None``: memory only).

    ``hashed`` counts the files actually read, ``hits`` the answers from the cache.

    Example:
        >>> d = Path(tempfile.mkdtemp()); f = d / "w.bin"; _ = f.write_bytes(b"abc")
        >>> c = HashCache(None); c.sha256(f)[:8], c.hashed
        ('ba7816bf', 1)
        >>> c.entries  # changed just now: remembered only once it is RACY_NS old
        {}
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, list] = self._read()
        self.dirty = False
        self.hashed = 0
        self.hits = 0

    def _read(self) -> dict[str, list]:
        if self.path is None:
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return {}  # missing or corrupt: start empty, rewritten on the next save
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), dict):
            return {}
        return {k: v for k, v in doc["entries"].items() if isinstance(k, str) and _valid(v)}

    def sha256(self, file: str | os.PathLike) -> str:
        """sha256 of ``file``: from the cache when its stat key is unchanged, else read."""
        real = os.path.realpath(file)
        before = os.stat(real)
        key = _stat_key(before)
        entry = self.entries.get(real)
        if entry is not None and entry[:5] == key:
            self.hits += 1
            return entry[5]
        digest = sha256_bytes_of(real)
        self.hashed += 1
        after = os.stat(real)
        settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) >= RACY_NS
        if _stat_key(after) == key and settled:
            self.entries[real] = key + [digest]
            self.dirty = True
        elif self.entries.pop(real, None) is not None:
            self.dirty = True
        return digest

    def save(self) -> None:
        """Merge the new entries into the cache file (atomically); silent when it cannot."""
        if self.path is None or not self.dirty:
            return
        merged = {**self._read(), **self.entries}
        if len(merged) > MAX_ENTRIES:  # oldest insertions go first
            merged = dict(list(merged.items())[-MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": VERSION, "entries": merged}, f)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return  # read-only home, full disk: the cache stays in memory
        self.entries = merged
        self.dirty = False


_shared: HashCache | None = None


def shared() -> HashCache:
    """The process-wide cache at :func:`default_path` (re-opened when that path changes)."""
    global _shared
    path = default_path()
    if _shared is None or _shared.path != path:
        _shared = HashCache(path)
    return _shared


def sha256_files(files: dict[str, str | os.PathLike], cache: HashCache | None = None) -> dict[str, str]:
    """``{name: sha256}`` for ``{name: path}``, through the cache (saved once at the end)."""
    c = cache if cache is not None else shared()
    try:
        return {name: c.sha256(p) for name, p in files.items()}
    finally:
        c.save()


def hash_tree(folder: str | os.PathLike, cache: HashCache | None = None) -> dict[str, str]:
    """``{relative posix path: sha256}`` for every file under ``folder`` (sorted), cached.

    Example:
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "a").mkdir(); _ = (d / "a" / "t.jsonl").write_text("")
        >>> list(hash_tree(d, HashCache(None)))
        ['a/t.jsonl']
    """
    root = Path(folder)
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    return sha256_files(files, cache)


def describe_data(path: str | os.PathLike, files: dict[str, str | os.PathLike] | None = None,
                  cache: HashCache | None = None) -> dict:
    """How manifests record a data path: its real path and the sha256 of ``files``
    (``{name relative to the path: file}``, the splits a stage reads), or of every file
    in it when ``files`` is None (a single data file is recorded under its own name)."""
    p = Path(path)
    if files is not None:
        hashes = sha256_files(files, cache)
    else:
        hashes = hash_tree(p, cache) if p.is_dir() else sha256_files({p.name: p}, cache)
    return {"path": str(p.resolve()), "sha256": hashes}


def digest(files: dict[str, str]) -> str:
    """One sha256 for a ``{name: sha256}`` set (of the ``sha256sum`` listing, sorted by name).

    Example:
        >>> digest({}) == hashlib.sha256(b"").hexdigest()
        True
    """
    text = "".join(f"{h}  {n}\n" for n, h in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()
