"""``dqtool compress RECIPE.yaml``: distill -> qat -> convert -> export -> bench from one recipe.

The recipe is validated completely before anything runs: an unknown key is an error
naming the key and the allowed ones; every value goes through the stage's own config
dataclass, so a bad value fails with that stage's one-line error. Each stage writes its
own folder under ``work``::

    work/student            distill
    work/qat-2-2-8          qat       (one per scheme in ``schemes``)
    work/packed-2-2-8       convert
    work/onnx-2-2-8         export
    work/bench              bench     (every scheme's ONNX folder, the teacher and the peers)

Re-running the recipe skips every stage whose folder is complete (its manifest's hashes
verify), was made with the same config and from the same inputs (teacher and tokenizer
files, data split files, the upstream stage's manifest: :mod:`dqtool.formats.inputs`); an
interrupted QAT run continues from its last checkpoint; a stage that runs again re-runs
everything after it. ``--dry-run`` checks that the teacher and data exist, prints this
plan with the reason each stage runs, and exits. Gates (``gates:`` or the CLI) turn the
bench report into an exit code: 0 all hold, 1 a gate failed, 2 bad input.

Example recipe::

    teacher: runs/demo/teacher
    data: dqtool/assets/data/debian_synopsis
    work: runs/demo/compress
    schemes: [2-2-8, 8-8-8]
    distill: {encoder_layers: 2, decoder_layers: 1}
    qat: {max_steps: 300, learning_rate: 5.0e-4, logits_loss: kl, temperature: 2.0}
    bench: {max_samples: 200, peers: [pytorch-int8-dynamic, ort-int8-dynamic]}
    gates: {min_ratio: 8, max_quality_drop: 0.6}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError

TOP_KEYS = ("teacher", "data", "work", "schemes", "distill", "qat", "convert", "export", "bench", "gates")
SCHEME_KEYS = ("weight_granularity", "group_size", "weight_method", "act_clip", "act_asymmetric", "act_granularity",
               "act_block_size", "encoder_act_granularity", "quantize_attention", "pos_bits")
# Recipe keys of the qat section that are not QATConfig fields: QuantScheme fields and LossConfig
# fields under the names the CLI flags use (so a recipe reads like the command line).
SCHEME_FIELDS = {"weight_granularity": "weight_granularity", "group_size": "weight_group_size",
                 "act_clip": "act_clip", "act_granularity": "act_granularity", "act_block_size": "act_block_size",
                 "encoder_act_granularity": "encoder_act_granularity", "quantize_attention": "quantize_attention"}  # act_asymmetric: the negation of act_symmetric
LOSS_FIELDS = {"loss_task": "task", "loss_logits": "logits", "loss_hidden": "hidden", "loss_attention": "attention",
               "loss_enc_last": "enc_last", "logits_loss": "logits_kind", "temperature": "temperature"}
LOSS_KEYS = tuple(LOSS_FIELDS)
# Config fields whose recipe key differs: field -> key, per section.
RECIPE_KEYS = {"qat": {**{f: k for k, f in SCHEME_FIELDS.items()}, **{f: k for k, f in LOSS_FIELDS.items()},
                       "act_symmetric": "act_asymmetric"},
               "distill": {"map_scheme": "layer_map"}}
DISTILL_KEYS = ("encoder_layers", "decoder_layers", "layer_map", "encoder_map", "decoder_map")
GATE_KEYS = ("min_ratio", "max_quality_drop", "max_latency_ms")


SCHEME_TYPES = {"weight_granularity": str, "group_size": "int?", "act_clip": str, "act_asymmetric": bool,
                "act_granularity": str, "encoder_act_granularity": "str?", "quantize_attention": bool}
LOSS_TYPES = {"loss_task": float, "loss_logits": float, "loss_hidden": float, "loss_attention": float,
              "loss_enc_last": float, "logits_loss": str, "temperature": float}
DISTILL_TYPES = {"encoder_layers": "int?", "decoder_layers": "int?", "layer_map": str, "encoder_map": "ints?",
                 "decoder_map": "ints?"}
GATE_TYPES = {k: "float?" for k in GATE_KEYS}
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _field_types(cls) -> dict:
    """``{field: type spec}`` of a config dataclass, from its annotations."""
    import typing

    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        union = typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union))
        args = [a for a in typing.get_args(tp) if a is not type(None)] if union else []
        optional = union and type(None) in typing.get_args(tp)
        base = args[0] if args else tp
        if typing.get_origin(base) in (tuple, list):
            inner = typing.get_args(base)[0] if typing.get_args(base) else str
            out[name] = ("ints" if inner is int else "strs") + ("?" if optional else "")
        elif base in (int, float, str, bool):
            out[name] = base if not optional else f"{base.__name__}?"
    return out


def _check_type(key: str, value: Any, spec) -> None:
    """Raise a one-line error naming the recipe ``key`` when ``value`` is not of ``spec``
    (``int``, ``float``, ``str``, ``bool``, ``"int?"`` = int or null, ``"ints?"`` = list of ints or null).
    ``true`` is not an integer, and an integer is a number."""
    optional = isinstance(spec, str) and spec.endswith("?")
    if optional and value is None:
        return
    base = spec.rstrip("?") if isinstance(spec, str) else spec
    base = {"int": int, "float": float, "str": str, "bool": bool}.get(base, base)
    if base in ("ints", "strs"):
        inner = int if base == "ints" else str
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, inner) and not isinstance(v, bool) for v in value)
        want = f"a list of {'integers' if inner is int else 'strings'}"
    elif base is bool:
        ok, want = isinstance(value, bool), _NAMES[bool]
    elif base is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), _NAMES[float]
    else:
        ok, want = isinstance(value, base) and not isinstance(value, bool), _NAMES[base]
    if not ok:
        raise DQToolError(f"recipe key '{key}' must be {want}{' or null' if optional else ''}, got {value!r}")


def _check_types(section: str, d: dict, types: dict) -> None:
    for k, v in d.items():
        if k in types:
            _check_type(f"{section}.{k}", v, types[k])


def _section(section: str, build):
    """``build()``, its config errors naming the recipe key (``bench.runs``), not the CLI flag."""
    try:
        return build()
    except ConfigError as e:
        keys = RECIPE_KEYS.get(section, {})
        raise e.named(lambda f: f"{section}.{keys.get(f, f)}") from None


def _allowed(cls, exclude=()) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in exclude)


def _check_keys(section: str, d: Any, allowed: tuple[str, ...]) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise DQToolError(f"recipe section '{section}' must be a mapping of keys to values, got {type(d).__name__}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise DQToolError(f"recipe key '{section}.{unknown[0]}' is unknown: allowed keys in '{section}' are "
                          f"{', '.join(allowed)}")
    return dict(d)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the stage configs, built (and so checked) from the YAML."""

    teacher: str
    data: str
    work: Path
    distill: Any
    qats: dict            # W-E-A -> QATConfig
    convert: Any
    export: Any
    bench: Any
    gates: Any
    source: dict = field(default_factory=dict)


def load_recipe(path: str | os.PathLike, check_paths: bool = True) -> Recipe:
    """Parse and validate a recipe file (YAML or JSON).

    Example (needs a file, so not run as a doctest)::
        r = load_recipe("recipes/demo.yaml"); r.qats.keys()   # dict_keys(['2-2-8'])
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DQToolError(f"recipe {p} not found: pass a YAML file (see recipes/ for examples)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DQToolError(f"recipe {p} is not valid YAML ({str(e).splitlines()[0]})") from e
    return recipe_from_dict(raw, base=p.parent, check_paths=check_paths)


def recipe_from_dict(raw: Any, base: Path = Path("."), check_paths: bool = True) -> Recipe:
    """Validate a recipe given as a dict; relative paths are taken as they are (from the cwd).

    Every key, type and range is checked; with ``check_paths`` (what ``dqtool compress``
    does) also that the data exists with the splits the stages read, and that ``work`` and
    the teacher can be what they must be.

    Example:
        >>> recipe_from_dict({"teacher": "t", "data": "d", "work": "w", "qat": {"max_step": 5}})
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: recipe key 'qat.max_step' is unknown: allowed keys in 'qat' are ...
    """
    from dqtool.stages.bench.stage import BenchConfig, Gates
    from dqtool.stages.convert import ConvertConfig
    from dqtool.stages.distill import DistillConfig
    from dqtool.stages.export import ExportConfig
    from dqtool.model.losses import LossConfig
    from dqtool.stages.qat import QATConfig
    from dqtool.qmath.quant import parse_wea
    from dqtool.qmath.scheme import QuantScheme

    top = _check_keys("recipe", raw, TOP_KEYS)
    for key in ("teacher", "data", "work"):
        if not isinstance(top.get(key), str) or not top[key]:
            raise DQToolError(f"recipe key '{key}' is required (a path{' or hub id' if key == 'teacher' else ''})")
    schemes = top.get("schemes", ["2-2-8"])
    if isinstance(schemes, str):
        schemes = [schemes]
    if not isinstance(schemes, list) or not schemes:
        raise DQToolError("recipe key 'schemes' must be a list of W-E-A strings, e.g. [2-2-8, 8-8-8]")

    d = _check_keys("distill", top.get("distill"), DISTILL_KEYS)
    _check_types("distill", d, DISTILL_TYPES)
    maps = {k: tuple(int(x) for x in d[k]) if d.get(k) is not None else None for k in ("encoder_map", "decoder_map")}
    dkw = {"map_scheme": d["layer_map"]} if "layer_map" in d else {}
    distill = _section("distill", lambda: DistillConfig(encoder_layers=d.get("encoder_layers"),
                                                        decoder_layers=d.get("decoder_layers"), **dkw, **maps))

    q = _check_keys("qat", top.get("qat"), _allowed(QATConfig, ("data", "scheme", "losses")) + SCHEME_KEYS
                    + LOSS_KEYS)
    _check_types("qat", q, {**_field_types(QATConfig), **SCHEME_TYPES, **LOSS_TYPES})
    skw = {k: q.pop(k) for k in SCHEME_KEYS if k in q}
    lkw = {k: q.pop(k) for k in LOSS_KEYS if k in q}
    losses = _section("qat", lambda: LossConfig(**{LOSS_FIELDS[k]: v for k, v in lkw.items()}))
    # Only what the recipe sets: every other field keeps QuantScheme's default.
    scheme_kw = {SCHEME_FIELDS[k]: v for k, v in skw.items() if k in SCHEME_FIELDS}
    if "act_asymmetric" in skw:
        scheme_kw["act_symmetric"] = not skw["act_asymmetric"]
    methods = _weight_methods(skw.get("weight_method"))
    qats = {}
    for wea in schemes:
        w_bits = parse_wea(str(wea), option="schemes")[0]  # the error then names the recipe key
        method = methods.get(w_bits, methods.get(None))
        # pos_bits: "e" (the scheme's E bits), "none" or a bit width.
        scheme = _section("qat", lambda: QuantScheme.from_wea_pos(str(wea), skw.get("pos_bits"), weight_method=method,
                                                                  **scheme_kw))
        qats[scheme.wea] = _section("qat", lambda: QATConfig(data=top["data"], scheme=scheme, losses=losses, **q))

    c = _check_keys("convert", top.get("convert"), _allowed(ConvertConfig, ("teacher",)))
    _check_types("convert", c, _field_types(ConvertConfig))
    convert = _section("convert", lambda: ConvertConfig(**c, teacher=top["teacher"]))
    e = _check_keys("export", top.get("export"), _allowed(ExportConfig))
    _check_types("export", e, _field_types(ExportConfig))
    export = _section("export", lambda: ExportConfig(**e))
    b = _check_keys("bench", top.get("bench"), _allowed(BenchConfig, ("data", "teacher", "student")))
    _check_types("bench", b, _field_types(BenchConfig))
    bench = _section("bench", lambda: BenchConfig(data=top["data"], teacher=top["teacher"],
                                                  student=str(Path(top["work"]) / "student"), **b))
    g = _check_keys("gates", top.get("gates"), GATE_KEYS)
    _check_types("gates", g, GATE_TYPES)
    gates = Gates(**g)
    if check_paths:  # after the keys and values, so a typo is reported first
        _check_paths(top)
        _check_splits(top["data"], qats, bench)
    return Recipe(teacher=top["teacher"], data=top["data"], work=Path(top["work"]), distill=distill, qats=qats,
                  convert=convert, export=export, bench=bench, gates=gates, source=top)


def _check_paths(top: dict) -> None:
    """Paths fail before anything runs: data must exist, work must be (or become) a folder,
    a local teacher must be a model folder."""
    from dqtool.base.fsutil import check_output_path

    data = Path(top["data"])
    if not data.exists():
        raise DQToolError(f"recipe key 'data': {data} not found (pass a folder of split files, one file, or a "
                          f"datasets folder)")
    work = Path(top["work"])
    if work.exists() and not work.is_dir():
        raise DQToolError(f"recipe key 'work': {work} is a file, not a folder; choose another path")
    try:
        check_output_path(work, "work folder")
    except DQToolError as e:
        raise DQToolError(f"recipe key 'work': {e}") from None
    teacher = Path(top["teacher"])
    if teacher.exists() and not (teacher / "config.json").is_file():
        raise DQToolError(f"recipe key 'teacher': {teacher} is not a model folder (no config.json)")


def _check_splits(data: str, qats: dict, bench) -> None:
    """Every split a stage will read exists in the data (checked now, not after distill ran)."""
    from dqtool.data.pairs import available_splits, is_datasets_folder

    p = Path(data)
    if not p.is_dir() or is_datasets_folder(p):
        return  # one file (or a one-split datasets folder) serves every split
    try:
        have = set(available_splits(p))
    except DQToolError as e:
        raise DQToolError(f"recipe key 'data': {e}") from None
    need = {}
    for q in qats.values():
        need.setdefault(q.train_split, "qat.train_split")
        if q.eval_steps:
            need.setdefault(q.eval_split, "qat.eval_split")
    if bench.data:
        need.setdefault(bench.split, "bench.split")
    for split, key in need.items():
        if split not in have:
            raise DQToolError(f"recipe key '{key}': split '{split}' is not in {p} (it has "
                              f"{', '.join(sorted(have)) or 'no split files'})")

def _weight_methods(value: Any) -> dict:
    """Recipe ``qat.weight_method``: one method for every scheme, or per weight bit width
    (``{2: seq}``: 2-bit schemes use seq, others their default). Returns ``{bits or None: method}``.

    Example:
        >>> _weight_methods("lsq"), _weight_methods({2: "seq", 4: "lsq"})
        ({None: 'lsq'}, {2: 'seq', 4: 'lsq'})
    """
    if value is None:
        return {}
    if isinstance(value, str):
        return {None: value}
    if isinstance(value, dict) and all(isinstance(m, str) for m in value.values()):
        out = {}
        for k, m in value.items():
            try:
                out[int(k)] = m
            except (TypeError, ValueError):
                raise DQToolError(f"recipe key 'qat.weight_method' maps weight bits to methods, e.g. {{2: seq}}; "
                                  f"got the key {k!r}") from None
        return out
    raise DQToolError("recipe key 'qat.weight_method' must be a method name (e.g. seq) or a mapping of weight bits "
                      "to methods (e.g. {2: seq})")


# --------------------------------------------------------------------------- plan

@dataclass
class Step:
    stage: str
    out: Path
    config: Any
    status: str = ""      # done | run | resume
    source: Path | None = None  # the folder this stage reads (the previous stage's output)
    reason: str = ""      # why it runs (or resumes)


def _config_json(cfg) -> str:
    from dqtool.formats.manifest import jsonable

    return json.dumps(jsonable(cfg), sort_keys=True)


def _status(step: Step, upstream: str, recipe: Recipe) -> tuple[str, str]:
    """``(status, reason)`` from the folder, its config and ``upstream`` (why an earlier
    stage runs, or ""); the recorded inputs are compared by :mod:`dqtool.formats.inputs`."""
    from dqtool.formats.manifest import verify_folder
    from dqtool.formats.inputs import config_change

    if upstream:
        return "run", upstream  # an interrupted run of the old upstream is started over too
    partial = step.out.with_name(step.out.name + ".partial")
    if step.stage == "qat" and partial.is_dir() and not step.out.exists():
        # Continue an interrupted QAT only when it was started with this very setup (config,
        # student, teacher, data); a changed recipe trains from scratch, as any changed stage.
        from dqtool.stages.qat import _last_checkpoint, resume_mismatch, run_record

        if _last_checkpoint(partial) is None:
            return "run", "the interrupted QAT run has no complete checkpoint: it starts over"
        try:
            diff = resume_mismatch(partial, run_record(recipe.work / "student", recipe.teacher, step.config))
        except DQToolError as e:
            diff = f"its inputs cannot be read ({e})"
        if diff:
            return "run", f"the recipe changed since the interrupted QAT run ({diff}): it starts over"
        return "resume", "interrupted: continues from its last checkpoint"
    if not step.out.exists():
        return "run", "not made yet"
    try:
        m = verify_folder(step.out, step.stage)
    except DQToolError:
        return "run", "incomplete or edited: made again"
    now = _config_json(step.config)
    if json.dumps(m.get("config"), sort_keys=True) != now:
        return "run", config_change(m.get("config"), json.loads(now))
    return "done", ""


def plan(recipe: Recipe) -> list[Step]:
    """The stages in order with their status (done / run / resume) and why.

    The teacher and data must exist (one-line error otherwise). A stage is done when its
    folder verifies, its config is the recipe's and its recorded inputs are the ones the
    recipe names now (see :mod:`dqtool.formats.inputs`); a stage that runs re-runs
    everything after it.
    """
    from dqtool.formats.inputs import CurrentInputs, check_sources, upstream_of

    check_sources(recipe)
    w = recipe.work
    steps = [Step("distill", w / "student", recipe.distill, source=recipe.teacher)]
    for wea, qcfg in recipe.qats.items():
        qat_dir, packed_dir = w / f"qat-{wea}", w / f"packed-{wea}"
        steps += [Step("qat", qat_dir, qcfg, source=steps[0].out),
                  Step("convert", packed_dir, recipe.convert, source=qat_dir),
                  Step("export", w / f"onnx-{wea}", recipe.export, source=packed_dir)]
    steps.append(Step("bench", w / "bench", recipe.bench))
    now = CurrentInputs(recipe)
    for i, s in enumerate(steps):
        ran = [u for u in upstream_of(steps, i) if u.status != "done"]
        s.status, s.reason = _status(s, f"after {ran[0].stage} ({ran[0].out.name})" if ran else "", recipe)
        if s.status == "done" and (changed := now.changes(steps, i)):
            s.status, s.reason = "run", "; ".join(changed)
    return steps


def describe(steps: list[Step]) -> str:
    """The plan as text, one line per stage, with the reason a stage runs."""
    return "\n".join(f"  {s.status:<6} {s.stage:<8} -> {s.out}" + (f"  ({s.reason})" if s.reason else "")
                     for s in steps)


# --------------------------------------------------------------------------- run

@dataclass
class CompressResult:
    steps: list[Step]
    report: dict | None
    gates: list[dict]

    @property
    def ok(self) -> bool:
        return all(g["ok"] for g in self.gates)


def compress(recipe: Recipe, gates=None, dry_run: bool = False, force: bool = False, log=print) -> CompressResult:
    """Run the recipe's stages that are not done (all of them with ``force``); return the
    bench report and the gate results.

    Example (needs real folders, so not run as a doctest)::
        r = compress(load_recipe("recipes/demo.yaml")); r.ok
    """
    from dqtool.base.fsutil import output_lock

    if dry_run:
        steps = plan(recipe)
        log("plan:\n" + describe(steps))
        return CompressResult(steps, None, [])
    with output_lock(recipe.work):   # one compress per work folder; the second one says who holds it
        return _compress(recipe, gates, force, log)


def bench_models(steps) -> list[str]:
    """What the bench step measures of each export: its generation graph where the recipe asks for one
    (``export: generation_graph: beam``: the whole generation in one ONNX Runtime call, the same tokens
    as the folder's step-by-step runtime), else the folder.

    Example:
        >>> from dqtool.stages.export import ExportConfig
        >>> steps = [Step("export", Path("w/onnx-2-2-8"), ExportConfig(generation_graph="beam")),
        ...          Step("export", Path("w/onnx-8-8-8"), ExportConfig())]
        >>> bench_models(steps)
        ['w/onnx-2-2-8/onnx/generation_model.onnx', 'w/onnx-8-8-8']
    """
    from dqtool.formats.onnx import GENERATION_FILE, ONNX_SUBDIR

    return [str(x.out / ONNX_SUBDIR / GENERATION_FILE) if x.config.generation_graph == "beam" else str(x.out)
            for x in steps if x.stage == "export"]


def _compress(recipe: Recipe, gates, force: bool, log) -> CompressResult:
    from dqtool.stages.bench.stage import bench, check_gates
    from dqtool.stages.convert import convert
    from dqtool.stages.distill import distill
    from dqtool.stages.export import export
    from dqtool.stages.qat import qat

    steps = plan(recipe)
    if force:
        for s in steps:
            s.status, s.reason = "run", "--force"
    log("plan:\n" + describe(steps))
    for s in steps:
        if s.status == "done":
            continue
        log(f"== {s.stage} -> {s.out}")
        if s.stage == "distill":
            distill(s.source, s.out, s.config, force=True)
        elif s.stage == "qat":
            qat(s.source, s.out, s.config, teacher=recipe.teacher, force=s.status == "run",
                resume=s.status == "resume", cache_dir=recipe.work / "cache")
        elif s.stage == "convert":
            convert(s.source, s.out, s.config, force=True)
        elif s.stage == "export":
            export(s.source, s.out, s.config, force=True)
        elif s.stage == "bench":
            bench(bench_models(steps), s.out, s.config, force=True, log=log)
    report = json.loads((recipe.work / "bench" / "bench.json").read_text())
    results = check_gates(report, gates if gates is not None else recipe.gates)
    return CompressResult(steps, report, results)
