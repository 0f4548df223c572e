"""Output folders that record how they were made, and are never seen half-written.

Every stage writes into a temporary sibling folder and renames it into place only
after the stage succeeded and ``dqtool-manifest.json`` was written. The manifest
holds the dqtool version, the stage, its inputs (with hashes), its config, and the
sha256 of every file in the folder, so a later stage (or ``verify_folder``) can tell
a complete, untouched output from a truncated or edited one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dqtool.base.errors import DQToolError

MANIFEST_NAME = "dqtool-manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of one file, read in chunks.

    Example:
        >>> p = tmp / "a"; _ = p.write_bytes(b"")  # tmp: an empty folder (conftest.py)
        >>> sha256_file(p)[:8]
        'e3b0c442'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    """``{relative posix path: sha256}`` for every file under ``folder`` (sorted).

    Example:
        >>> hash_folder(tmp)
        {}
    """
    root = Path(folder)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_manifest(folder: str | os.PathLike, stage: str, inputs: dict, config: Any, extra: dict | None = None) -> dict:
    """Write ``dqtool-manifest.json`` into ``folder``, hashing every file already there.

    Call it last, once every other file of the output is written.

    Example:
        >>> d = tmp; _ = (d / "w.bin").write_bytes(b"x")
        >>> m = write_manifest(d, "demo", {"src": "none"}, {"k": 1})
        >>> sorted(m["files"])
        ['w.bin']
    """
    from dqtool.base.version import __version__

    manifest = {
        "dqtool_version": __version__,
        "stage": stage,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": jsonable(inputs),
        "config": jsonable(config),
        "files": hash_folder(folder),
    }
    if extra:
        manifest.update(jsonable(extra))
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a dqtool output folder, or ``None`` when the folder has none.

    A manifest that is not valid JSON is an error (the folder was tampered with).
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DQToolError(f"{path} is not valid JSON ({e}); re-create the folder with dqtool") from e


def verify_folder(folder: str | os.PathLike, stage: str | None = None) -> dict:
    """Check that ``folder`` is a complete, unmodified dqtool output; return its manifest.

    Raises :class:`DQToolError` naming the first missing or changed file.

    Example:
        >>> d = tmp; _ = write_manifest(d, "demo", {}, {})
        >>> verify_folder(d, "demo")["stage"]
        'demo'
    """
    manifest = read_manifest(folder)
    if manifest is None:
        raise DQToolError(f"{folder} has no {MANIFEST_NAME}: it was not written by dqtool or is incomplete")
    if stage is not None and manifest.get("stage") != stage:
        raise DQToolError(f"{folder} is the output of stage '{manifest.get('stage')}', expected '{stage}'")
    for rel, digest in manifest.get("files", {}).items():
        p = Path(folder) / rel
        if not p.is_file():
            raise DQToolError(f"{p} is missing: the folder is incomplete; re-run the stage that made it")
        if sha256_file(p) != digest:
            raise DQToolError(f"{p} does not match its hash in {MANIFEST_NAME}: it is truncated or modified; re-run the stage that made it")
    return manifest


def check_output(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Fail early when ``out_dir`` exists (unless ``force``) or is not a folder.

    Stages call it before loading anything, so a wrong OUT costs no time.

    Example:
        >>> check_output(tmp)
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: output folder ... already exists: choose another path or pass --force to replace it
    """
    from dqtool.base.fsutil import check_output_path

    out = check_output_path(out_dir)
    if out.exists() and not out.is_dir():
        raise DQToolError(f"output path {out} exists and is not a folder: choose another path")
    if out.exists() and not force:
        raise DQToolError(f"output folder {out} already exists: choose another path or pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output(out_dir: str | os.PathLike, force: bool = False, hint: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is an error unless ``force``; with ``force`` it is replaced
    only after the new output is complete. On any exception the temporary folder is
    removed, so no half-written output ever sits at ``out_dir``. A full disk (or another
    write error) becomes one :class:`DQToolError` line naming the path. The temp folder's
    name carries this process's PID, so a later run can remove it if this one is killed.

    Example:
        >>> root = tmp
        >>> with atomic_output(root / "out") as tmp:
        ...     _ = (tmp / "f.txt").write_text("done")
        >>> (root / "out" / "f.txt").read_text()
        'done'
    """
    from dqtool.base.fsutil import apply_umask, folder_bytes, io_error, is_write_error, temp_prefix

    out = check_output(out_dir, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
        apply_umask(tmp, folder=True)  # mkdtemp makes 0700; the output follows the umask
    except OSError as e:
        raise io_error(e, out.parent) from e
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_error(e):
            raise
        if e.filename and str(e.filename).startswith(str(tmp)):   # name the output, not the temp folder
            e.filename = str(out) + str(e.filename)[len(str(tmp)):]
        done = (f"the output needs more than the {written:,} bytes written before the error, which were removed; "
                if written else "")
        raise io_error(e, out, hint=f"{done}{out} was not created or changed; "
                                    + (hint or "run the command again")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
