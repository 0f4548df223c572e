"""Text-pair data for training and evaluation: JSONL, CSV/TSV and ``datasets`` folders.

A data path is one of:

* a folder holding one file per split (``train.jsonl``, ``validation.csv``, ``test.tsv``...);
* a single ``.jsonl`` / ``.csv`` / ``.tsv`` file (used whatever split is asked for);
* a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` or one ``Dataset``).

Every problem with the input is a one-line :class:`DQToolError` naming the file, the
place (``line N``: the 1-based line an editor shows, for text files; ``row N``, 1-based,
for datasets folders) and what to change. A .csv/.tsv row is named by the line it ends
on (a quoted value may span lines).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dqtool.base.errors import DQToolError

TOO_LONG = ("truncate", "skip", "error")
SPLIT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")  # .json is read as JSON Lines too
_BOM = b"\xef\xbb\xbf"
_DELIM_NAMES = {",": ",", "\t": "tab"}


@dataclass(frozen=True)
class DataConfig:
    """How to read text pairs and how long they may be.

    ``on_too_long``: ``truncate`` (default) cuts sources/targets to the max lengths, as
    Hugging Face's summarization scripts and the DQ-BART code do, so long news articles
    still train and evaluate; ``skip`` drops such rows and counts them in
    ``Pairs.skipped``; ``error`` stops at the first one, naming file and line. Lengths
    are in tokens (special tokens and the prefix included), so ``skip``/``error`` take
    effect only when :func:`load_pairs` is given a tokenizer.

    Example:
        >>> DataConfig(on_too_long="drop")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: --on-too-long 'drop' is not supported: choose truncate, skip or error
    """

    source_field: str = "source"
    target_field: str = "target"
    source_max_length: int = 512
    target_max_length: int = 128
    prefix: str = ""
    on_too_long: str = "truncate"
    max_rows: int | None = None

    def __post_init__(self):
        if self.on_too_long not in TOO_LONG:
            raise DQToolError(f"--on-too-long '{self.on_too_long}' is not supported: choose truncate, skip or error")
        for name in ("source_max_length", "target_max_length"):
            if getattr(self, name) < 1:
                raise DQToolError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise DQToolError(f"--max-rows must be at least 1, got {self.max_rows}")
        if not self.source_field or not self.target_field:
            raise DQToolError("--source-field and --target-field must not be empty")
        if not isinstance(self.prefix, str):
            raise DQToolError(f"--prefix must be text, got {type(self.prefix).__name__}")


@dataclass
class Pairs:
    """Rows of one split: parallel lists of ids, sources (prefix not applied) and targets.

    ``path`` is the file (or datasets folder) read; ``ids`` come from an ``id`` field
    when rows have one, else the line/row number; ``skipped`` counts rows dropped by
    ``on_too_long="skip"``.
    """

    path: str
    split: str
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.sources)


def is_datasets_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def available_splits(path: str | os.PathLike) -> list[str]:
    """Split names a data path offers.

    Example:
        >>> d = tmp; _ = (d / "test.jsonl").write_text("")  # tmp: an empty folder (conftest.py)
        >>> available_splits(d)
        ['test']
    """
    p = Path(path)
    if p.is_file():
        return [p.stem]
    if is_datasets_folder(p):
        if (p / "dataset_dict.json").is_file():
            return list(json.loads((p / "dataset_dict.json").read_text())["splits"])
        return ["train"]
    return sorted({f.stem for f in p.iterdir() if f.suffix in SPLIT_SUFFIXES}) if p.is_dir() else []


def _split_file(p: Path, split: str) -> Path:
    found = [p / f"{split}{suffix}" for suffix in SPLIT_SUFFIXES if (p / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        # Picking one silently could evaluate on a stale copy; make the user choose.
        raise DQToolError(f"data folder {p} has several files for split '{split}' "
                          f"({', '.join(f.name for f in found)}): keep one, or pass the file itself as the data path")
    if found:
        return found[0]
    have = available_splits(p)
    if not have:
        raise DQToolError(f"data folder {p} has no split files (train.jsonl, validation.csv, test.tsv, ...) "
                          f"and is not a datasets folder")
    raise DQToolError(f"split '{split}' not found in {p}: available splits are {', '.join(have)}")


def split_files(path: str | os.PathLike, split: str) -> dict[str, Path]:
    """``{name relative to the data path: file}`` of the files :func:`load_pairs` reads for
    ``split`` (what manifests hash as a stage's data input). Errors as in :func:`load_pairs`.

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / "test.jsonl").write_text("")
        >>> list(split_files(d, "test"))
        ['test.jsonl']
    """
    p = Path(path)
    if not p.exists():
        raise DQToolError(f"data path {p} does not exist: pass a folder of split files, a .jsonl/.csv/.tsv file "
                          f"or a datasets folder")
    if p.is_file():
        return {p.name: p}
    if (p / "dataset_dict.json").is_file():
        have = available_splits(p)
        if split not in have:
            raise DQToolError(f"split '{split}' not found in {p}: available splits are {', '.join(have)}")
        files = {f.relative_to(p).as_posix(): f for f in sorted((p / split).rglob("*")) if f.is_file()}
        return {"dataset_dict.json": p / "dataset_dict.json", **files}
    if is_datasets_folder(p):  # one Dataset: every split is all of it
        return {f.relative_to(p).as_posix(): f for f in sorted(p.rglob("*")) if f.is_file()}
    f = _split_file(p, split)
    return {f.name: f}


def _text(value, field_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DQToolError(f"{where}: field '{field_name}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise DQToolError(f"{where}: field '{field_name}' is empty; remove the row or fill it")
    return value


def _rows_jsonl(f: Path):
    raw = f.read_bytes()
    if raw.startswith(_BOM):  # editors on Windows add one; json.loads rejects it
        raw = raw[len(_BOM):]
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DQToolError(f"{f}, line {lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from e
        try:
            row = json.loads(text)
        except ValueError as e:
            hint = ("; the file looks like one JSON array: write one JSON object per line (JSON Lines)"
                    if lineno == 1 and text.lstrip().startswith("[") else "; one JSON object per line is expected")
            raise DQToolError(f"{f}, line {lineno}: not valid JSON ({e.msg}){hint}") from e
        if not isinstance(row, dict):
            raise DQToolError(f"{f}, line {lineno}: expected a JSON object, got {type(row).__name__}; "
                              f"write one JSON object per line")
        yield lineno, row


def _rows_csv(f: Path, delimiter: str):
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: Excel writes a BOM that would become part of the first column name
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise DQToolError(f"{f}, line {lineno}: not valid UTF-8; re-encode the file as UTF-8") from e
    # The default limit (128 KiB per field) is below a long document; rows are in memory anyway.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
        for row in reader:
            # line_num is the line the row ends on (a quoted field may span lines), 1-based.
            # DictReader files extra values under the key None and fills missing ones with None.
            extra = row.get(None)
            if extra or None in row.values():
                n = len(header) + len(extra) if extra else sum(v is not None for v in row.values())
                raise DQToolError(f"{f}, line {reader.line_num}: {n} columns but the header has {len(header)}; "
                                  f"quote values holding '{_DELIM_NAMES[delimiter]}' or fix the row")
            yield reader.line_num, row
    except csv.Error as e:
        raise DQToolError(f"{f}, line {reader.line_num}: unreadable {f.suffix[1:].upper()} ({e}); fix the quoting "
                          f"or re-export the file") from e


def _rows_datasets(p: Path, split: str):
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise DQToolError(f"could not read datasets folder {p} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if hasattr(ds, "keys"):  # DatasetDict
        if split not in ds:
            raise DQToolError(f"split '{split}' not found in {p}: available splits are {', '.join(ds.keys())}")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield i, row


def load_pairs(path: str | os.PathLike, split: str, cfg: DataConfig, tokenizer=None) -> Pairs:
    """Read the ``split`` of a data path into :class:`Pairs`, validating every row.

    With a ``tokenizer``, rows longer than the max lengths are truncated later, skipped
    (counted in ``Pairs.skipped``) or an error, per ``cfg.on_too_long``.

    Example:
        >>> d = tmp  # an empty folder (conftest.py)
        >>> _ = (d / "train.jsonl").write_text('{"source": "a b c", "target": "a"}\\n')
        >>> load_pairs(d, "train", DataConfig()).targets
        ['a']
    """
    p = Path(path)
    if not p.exists():
        raise DQToolError(f"data path {p} does not exist: pass a folder of split files, a .jsonl/.csv/.tsv file "
                          f"or a datasets folder")
    if p.is_dir() and is_datasets_folder(p):
        rows, src_path, where_file, unit = _rows_datasets(p, split), p, f"{p} [{split}]", "row"
    else:
        f = p if p.is_file() else _split_file(p, split)
        if f.suffix not in SPLIT_SUFFIXES:
            raise DQToolError(f"{f}: unsupported file type '{f.suffix}': use .jsonl, .csv or .tsv")
        if f.stat().st_size == 0:
            raise DQToolError(f"{f} is empty: add rows (a header line first for .csv/.tsv)")
        rows = _rows_jsonl(f) if f.suffix in (".jsonl", ".json") else _rows_csv(f, "\t" if f.suffix == ".tsv" else ",")
        src_path, where_file, unit = f, f, "line"  # text files: the 1-based line number an editor shows
    out = Pairs(path=str(src_path), split=split)
    for lineno, row in rows:
        where = f"{where_file}, {unit} {lineno}"
        for name in (cfg.source_field, cfg.target_field):
            if name not in row:
                raise DQToolError(f"{where}: missing field '{name}' (fields present: {', '.join(map(str, row))}); "
                                  f"set --source-field/--target-field")
        src = _text(row[cfg.source_field], cfg.source_field, where)
        tgt = _text(row[cfg.target_field], cfg.target_field, where)
        if tokenizer is not None and cfg.on_too_long != "truncate":
            n_src = len(tokenizer(cfg.prefix + src)["input_ids"])
            n_tgt = len(tokenizer(text_target=tgt)["input_ids"])
            if n_src > cfg.source_max_length or n_tgt > cfg.target_max_length:
                if cfg.on_too_long == "error":
                    raise DQToolError(
                        f"{where}: {n_src} source / {n_tgt} target tokens exceed --source-max-length "
                        f"{cfg.source_max_length} / --target-max-length {cfg.target_max_length}; raise them or "
                        f"use --on-too-long truncate or skip")
                out.skipped += 1
                continue
        out.ids.append(str(row.get("id", lineno)))
        out.sources.append(src)
        out.targets.append(tgt)
        if cfg.max_rows is not None and len(out) >= cfg.max_rows:
            break
    if not len(out):
        if out.skipped:
            raise DQToolError(f"{where_file}: all {out.skipped} rows are too long: raise --source-max-length/"
                              f"--target-max-length or use --on-too-long truncate")
        raise DQToolError(f"{where_file} has no rows (only blank lines or a header): add rows")
    return out


def tokenize_pairs(pairs: Pairs, tokenizer, cfg: DataConfig) -> list[dict]:
    """Token ids per row: ``input_ids``, ``attention_mask`` and ``labels`` (unpadded lists).

    Sources get ``cfg.prefix`` and are cut to ``source_max_length`` tokens, targets to
    ``target_max_length`` (special tokens included). Pad a batch of them with
    ``transformers.DataCollatorForSeq2Seq`` (labels padded with -100, ignored by the loss).

    Example (needs a tokenizer, so not run as a doctest)::
        rows = tokenize_pairs(load_pairs("data", "train", cfg), tok, cfg)
        batch = DataCollatorForSeq2Seq(tok)(rows[:8])  # input_ids [8, S], labels [8, T]
    """
    enc = tokenizer([cfg.prefix + s for s in pairs.sources], max_length=cfg.source_max_length, truncation=True)
    lab = tokenizer(text_target=list(pairs.targets), max_length=cfg.target_max_length, truncation=True)
    return [{"input_ids": i, "attention_mask": a, "labels": l}
            for i, a, l in zip(enc["input_ids"], enc["attention_mask"], lab["input_ids"])]
