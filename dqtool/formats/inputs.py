"""What each ``compress`` stage read, compared with what the recipe names now.

A stage folder is reused only when its own files verify, its config is the recipe's,
*and* every input recorded in its manifest is the one the recipe names today:

=========  ==================================================================
stage      inputs compared (``inputs`` in its ``dqtool-manifest.json``)
=========  ==================================================================
distill    teacher: model files (weights, config) and tokenizer files, by sha256
qat        upstream distill manifest's sha256; teacher; data files of the train
           split (and the eval split when ``eval_steps`` is set)
convert    upstream qat manifest's sha256
export     upstream convert (packed) manifest's sha256
bench      every export manifest's and the student manifest's sha256; teacher;
           data files of the bench split
=========  ==================================================================

Contents are compared, not paths: a teacher moved to another folder with the same bytes
is the same input; a teacher retrained in place is not. An input the manifest does not
record (a folder made by an older dqtool) counts as changed, so the stage runs again.
Each difference becomes a reason the plan prints, e.g.
``teacher changed: sha256 3f2a9c01d4e5... -> 8b7d6e5f4a3b... [model.safetensors]``.

Hashing goes through :mod:`dqtool.formats.hashcache`, so an unchanged multi-GB teacher is not
read again on each plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dqtool.base.errors import DQToolError
from dqtool.formats.hashcache import digest, sha256_bytes_of

# Files of a Hugging Face folder that make up its tokenizer (the rest is the model).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "source.spm", "target.spm",
    "sentencepiece.model", "tokenizer.model"})


def is_tokenizer_file(name: str) -> bool:
    """Whether a top-level file of a model folder belongs to the tokenizer.

    Example:
        >>> is_tokenizer_file("merges.txt"), is_tokenizer_file("model.safetensors")
        (True, False)
    """
    return name in TOKENIZER_FILES or name.endswith((".spm", ".tiktoken"))


def short(h: str | None) -> str:
    return f"{h[:12]}..." if h else "none"


# --------------------------------------------------------------------------- existence

def _split_files(data: Path, split: str) -> dict[str, Path]:
    from dqtool.data.pairs import split_files

    try:
        return split_files(data, split)
    except DQToolError as e:
        raise DQToolError(f"recipe key 'data': {e}") from e


def _needed_splits(recipe) -> list[str]:
    splits = []
    for q in recipe.qats.values():
        splits += [q.train_split] + ([q.eval_split] if q.eval_steps else [])
    if recipe.bench.data:
        splits.append(recipe.bench.split)
    return list(dict.fromkeys(splits))


def check_sources(recipe) -> None:
    """The teacher loads (a folder with config.json and weights, or a reachable hub id) and
    the data path has every split a stage reads; else one line naming the recipe key."""
    from dqtool.formats.hf import load_config

    try:
        load_config(recipe.teacher)
    except DQToolError as e:
        raise DQToolError(f"recipe key 'teacher': {e}") from e
    for split in _needed_splits(recipe):
        _split_files(Path(recipe.data), split)


# --------------------------------------------------------------------------- comparison

def manifest_sha256(folder: Path) -> str | None:
    from dqtool.formats.manifest import MANIFEST_NAME

    p = Path(folder) / MANIFEST_NAME
    return sha256_bytes_of(p) if p.is_file() else None


def _parts(files: dict[str, str]) -> dict[str, dict[str, str]]:
    model = {n: h for n, h in files.items() if not is_tokenizer_file(n)}
    tok = {n: h for n, h in files.items() if is_tokenizer_file(n)}
    return {"teacher": model, "tokenizer": tok}


def _names(old: dict, new: dict, limit: int = 3) -> str:
    names = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    more = f", +{len(names) - limit} more" if len(names) > limit else ""
    return f" [{', '.join(names[:limit])}{more}]" if names else ""


def teacher_changes(recorded: Any, now: dict) -> list[str]:
    """Reasons the recorded teacher differs from ``now`` (both from ``describe_source``).

    Example:
        >>> old = {"kind": "folder", "files_sha256": {"model.safetensors": "a" * 64, "vocab.json": "b" * 64}}
        >>> new = {"kind": "folder", "files_sha256": {"model.safetensors": "c" * 64, "vocab.json": "b" * 64}}
        >>> teacher_changes(old, new)[0].startswith("teacher changed: sha256 ")
        True
        >>> teacher_changes(old, old)
        []
    """
    if not isinstance(recorded, dict):
        return ["teacher not recorded in the manifest (made by an older dqtool)"]
    if now["kind"] == "hub" or recorded.get("kind") == "hub":
        was, is_ = recorded.get("id") or recorded.get("path"), now.get("id") or now.get("path")
        return [] if recorded.get("kind") == now["kind"] and was == is_ else [f"teacher changed: {was} -> {is_}"]
    if not isinstance(recorded.get("files_sha256"), dict):
        return ["teacher's tokenizer and config hashes not recorded in the manifest (made by an older dqtool)"]
    old, new = _parts(recorded["files_sha256"]), _parts(now["files_sha256"])
    return [f"{what} changed: sha256 {short(digest(old[what]))} -> {short(digest(new[what]))}"
            f"{_names(old[what], new[what])}"
            for what in ("teacher", "tokenizer") if old[what] != new[what]]


def data_changes(recorded: Any, now: dict[str, str], label: str = "data") -> list[str]:
    """Reasons the recorded data files differ from ``now`` (``{relative name: sha256}`` of
    the splits a stage reads). Files of other splits are not compared."""
    files = recorded.get("sha256") if isinstance(recorded, dict) else None
    if not isinstance(files, dict):
        return [f"{label} not recorded in the manifest (made by an older dqtool)"]
    for name, h in now.items():
        if files.get(name) != h:
            return [f"{label} changed: {name} sha256 {short(files.get(name))} -> {short(h)}"]
    return []


def upstream_changes(recorded: Any, folder: Path, stage: str) -> list[str]:
    """Reasons the upstream folder is not the one this stage was made from (its manifest's
    sha256 differs from the one recorded)."""
    was = recorded.get("manifest_sha256") if isinstance(recorded, dict) else None
    if was is None:
        return [f"upstream {stage} manifest not recorded (made by an older dqtool)"]
    now = manifest_sha256(folder)
    return [] if now == was else [f"upstream {stage} changed: manifest sha256 {short(was)} -> {short(now)}"]


class CurrentInputs:
    """The inputs the recipe names now, each hashed at most once per plan."""

    def __init__(self, recipe):
        self.recipe = recipe
        self._teacher: dict | None = None
        self._splits: dict[str, dict[str, str]] = {}

    def teacher(self) -> dict:
        if self._teacher is None:
            from dqtool.formats.hf import describe_source

            self._teacher = describe_source(self.recipe.teacher)
        return self._teacher

    def split(self, split: str) -> dict[str, str]:
        if split not in self._splits:
            from dqtool.formats.hashcache import sha256_files

            self._splits[split] = sha256_files(_split_files(Path(self.recipe.data), split))
        return self._splits[split]

    def changes(self, steps: list, i: int) -> list[str]:
        """Why ``steps[i]`` (complete, same config) must run again; empty when its inputs match."""
        from dqtool.formats.manifest import read_manifest

        s = steps[i]
        rec = (read_manifest(s.out) or {}).get("inputs") or {}
        if s.stage == "distill":
            return teacher_changes(rec.get("teacher"), self.teacher())
        if s.stage == "qat":
            up = upstream_of(steps, i)[0]
            out = upstream_changes(rec.get("student"), up.out, up.stage)
            out += teacher_changes(rec.get("teacher"), self.teacher())
            for split in [s.config.train_split] + ([s.config.eval_split] if s.config.eval_steps else []):
                out += data_changes(rec.get("data"), self.split(split), f"data ({split})")
            return out
        if s.stage in ("convert", "export"):
            up = upstream_of(steps, i)[0]
            return upstream_changes(rec.get("qat" if s.stage == "convert" else "packed"), up.out, up.stage)
        if s.stage == "bench":
            sources = rec.get("sources") if isinstance(rec.get("sources"), dict) else {}
            by_path = {v.get("path"): v for v in sources.values() if isinstance(v, dict)}
            out = []
            for up in upstream_of(steps, i):
                out += upstream_changes(by_path.get(str(up.out.resolve())), up.out, up.stage)
            if self.recipe.bench.teacher:
                out += teacher_changes(sources.get(rec.get("teacher")), self.teacher())
            if self.recipe.bench.data:
                out += data_changes(rec.get("data"), self.split(self.recipe.bench.split),
                                    f"data ({self.recipe.bench.split})")
            return out
        return []


def upstream_of(steps: list, i: int) -> list:
    """The steps whose folders ``steps[i]`` reads, in the order :func:`compress.plan` lists
    them: distill <- qat <- convert <- export (per scheme) <- bench (every export and, for
    its student peers, distill)."""
    s = steps[i]
    if s.stage == "qat":
        return [x for x in steps[:i] if x.stage == "distill"]
    if s.stage in ("convert", "export"):
        return [steps[i - 1]]
    if s.stage == "bench":
        return [x for x in steps[:i] if x.stage == "export"] + [x for x in steps[:i] if x.stage == "distill"]
    return []


def config_change(old: Any, new: Any) -> str:
    """``config changed: a, b.c`` naming the (dotted) keys whose values differ.

    Example:
        >>> config_change({"lr": 1, "scheme": {"w": 2, "a": 8}}, {"lr": 1, "scheme": {"w": 4, "a": 8}})
        'config changed: scheme.w'
    """
    def flat(d, prefix=""):
        if not isinstance(d, dict):
            return {prefix.rstrip("."): json.dumps(d, sort_keys=True)}
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": json.dumps(v)})
        return out

    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    more = f", +{len(keys) - 4} more" if len(keys) > 4 else ""
    return f"config changed: {', '.join(keys[:4])}{more}" if keys else "config changed"

