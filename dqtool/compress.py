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
verify) and was made with the same config; an interrupted QAT run continues from its
last checkpoint; a stage that runs again re-runs everything after it. ``--dry-run``
prints this plan and exits. Gates (``gates:`` or the CLI) turn the bench report into an
exit code: 0 all hold, 1 a gate failed, 2 bad input.

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

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dqtool.errors import DQToolError

TOP_KEYS = ("teacher", "data", "work", "schemes", "distill", "qat", "convert", "export", "bench", "gates")
SCHEME_KEYS = ("weight_granularity", "group_size", "act_clip", "act_asymmetric", "act_granularity",
               "quantize_attention", "pos_bits")
LOSS_KEYS = ("loss_task", "loss_logits", "loss_hidden", "loss_attention", "loss_enc_last", "logits_loss",
             "temperature")
DISTILL_KEYS = ("encoder_layers", "decoder_layers", "layer_map", "encoder_map", "decoder_map")
GATE_KEYS = ("min_ratio", "max_quality_drop", "max_latency_ms")


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


def load_recipe(path: str | os.PathLike) -> Recipe:
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
    return recipe_from_dict(raw, base=p.parent)


def recipe_from_dict(raw: Any, base: Path = Path(".")) -> Recipe:
    """Validate a recipe given as a dict; relative paths are taken as they are (from the cwd).

    Example:
        >>> recipe_from_dict({"teacher": "t", "data": "d", "work": "w", "qat": {"max_step": 5}})
        Traceback (most recent call last):
        ...
        dqtool.errors.DQToolError: recipe key 'qat.max_step' is unknown: allowed keys in 'qat' are ...
    """
    from dqtool.bench import BenchConfig, Gates
    from dqtool.convert import ConvertConfig
    from dqtool.distill import DistillConfig
    from dqtool.export import ExportConfig
    from dqtool.losses import LossConfig
    from dqtool.qat import QATConfig
    from dqtool.quant import parse_wea
    from dqtool.scheme import QuantScheme

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
    maps = {k: tuple(int(x) for x in d[k]) if d.get(k) is not None else None for k in ("encoder_map", "decoder_map")}
    distill = DistillConfig(encoder_layers=d.get("encoder_layers"), decoder_layers=d.get("decoder_layers"),
                            map_scheme=d.get("layer_map", "sft"), **maps)

    q = _check_keys("qat", top.get("qat"), _allowed(QATConfig, ("data", "scheme", "losses")) + SCHEME_KEYS
                    + LOSS_KEYS)
    skw = {k: q.pop(k) for k in SCHEME_KEYS if k in q}
    lkw = {k: q.pop(k) for k in LOSS_KEYS if k in q}
    losses = LossConfig(**{("logits_kind" if k == "logits_loss" else k.replace("loss_", "")): v
                           for k, v in lkw.items()})
    scheme_kw = dict(weight_granularity=skw.get("weight_granularity", "row"), weight_group_size=skw.get("group_size"),
                     act_clip=skw.get("act_clip", "dynamic"), act_symmetric=not skw.get("act_asymmetric", False),
                     act_granularity=skw.get("act_granularity", "token"),
                     quantize_attention=skw.get("quantize_attention", True))
    qats = {}
    for wea in schemes:
        parse_wea(str(wea), option="schemes")  # the error then names the recipe key
        scheme = QuantScheme.from_wea_pos(str(wea), skw.get("pos_bits"), **scheme_kw)
        qats[scheme.wea] = QATConfig(data=top["data"], scheme=scheme, losses=losses, **q)

    convert = ConvertConfig(**_check_keys("convert", top.get("convert"), _allowed(ConvertConfig, ("teacher",))),
                            teacher=top["teacher"])
    export = ExportConfig(**_check_keys("export", top.get("export"), _allowed(ExportConfig)))
    b = _check_keys("bench", top.get("bench"), _allowed(BenchConfig, ("data", "teacher", "student")))
    bench = BenchConfig(data=top["data"], teacher=top["teacher"], student=str(Path(top["work"]) / "student"), **b)
    gates = Gates(**_check_keys("gates", top.get("gates"), GATE_KEYS))
    return Recipe(teacher=top["teacher"], data=top["data"], work=Path(top["work"]), distill=distill, qats=qats,
                  convert=convert, export=export, bench=bench, gates=gates, source=top)


# --------------------------------------------------------------------------- plan

@dataclass
class Step:
    stage: str
    out: Path
    config: Any
    status: str = ""      # done | run | resume


def _config_json(cfg) -> str:
    from dqtool.manifest import _jsonable

    return json.dumps(_jsonable(cfg), sort_keys=True)


def _status(step: Step, upstream_ran: bool) -> str:
    from dqtool.manifest import verify_folder

    if step.stage == "qat" and step.out.with_name(step.out.name + ".partial").is_dir() and not step.out.exists():
        return "resume"
    if not step.out.exists() or upstream_ran:
        return "run"
    try:
        m = verify_folder(step.out, step.stage)
    except DQToolError:
        return "run"  # incomplete or edited: made again
    return "done" if json.dumps(m.get("config"), sort_keys=True) == _config_json(step.config) else "run"


def plan(recipe: Recipe) -> list[Step]:
    """The stages in order with their status (done / run / resume)."""
    w = recipe.work
    steps = [Step("distill", w / "student", recipe.distill)]
    for wea, qcfg in recipe.qats.items():
        steps += [Step("qat", w / f"qat-{wea}", qcfg), Step("convert", w / f"packed-{wea}", recipe.convert),
                  Step("export", w / f"onnx-{wea}", recipe.export)]
    steps.append(Step("bench", w / "bench", recipe.bench))
    ran_distill = False
    ran_branch = False
    for s in steps:
        upstream = ran_distill if s.stage == "qat" else (ran_branch if s.stage in ("convert", "export") else False)
        if s.stage == "bench":
            upstream = any(x.status != "done" for x in steps if x.stage != "bench")
        s.status = _status(s, upstream)
        if s.stage == "distill":
            ran_distill = s.status != "done"
        elif s.stage == "qat":
            ran_branch = s.status != "done"
        elif s.stage in ("convert", "export"):
            ran_branch = ran_branch or s.status != "done"
    return steps


def describe(steps: list[Step]) -> str:
    """The plan as text, one line per stage."""
    return "\n".join(f"  {s.status:<6} {s.stage:<8} -> {s.out}" for s in steps)


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
    from dqtool.bench import bench, check_gates
    from dqtool.convert import convert
    from dqtool.distill import distill
    from dqtool.export import export
    from dqtool.qat import qat

    steps = plan(recipe)
    if force:
        for s in steps:
            s.status = "run"
    log("plan:\n" + describe(steps))
    if dry_run:
        return CompressResult(steps, None, [])
    student = recipe.work / "student"
    for s in steps:
        if s.status == "done":
            continue
        log(f"== {s.stage} -> {s.out}")
        if s.stage == "distill":
            distill(recipe.teacher, s.out, s.config, force=True)
        elif s.stage == "qat":
            qat(student, s.out, s.config, teacher=recipe.teacher, force=s.status == "run",
                resume=s.status == "resume", cache_dir=recipe.work / "cache")
        elif s.stage == "convert":
            convert(s.out.with_name(s.out.name.replace("packed-", "qat-", 1)), s.out, s.config, force=True)
        elif s.stage == "export":
            export(s.out.with_name(s.out.name.replace("onnx-", "packed-", 1)), s.out, s.config, force=True)
        elif s.stage == "bench":
            onnx_dirs = [str(x.out) for x in steps if x.stage == "export"]
            bench(onnx_dirs, s.out, s.config, force=True, log=log)
    report = json.loads((recipe.work / "bench" / "bench.json").read_text())
    results = check_gates(report, gates if gates is not None else recipe.gates)
    return CompressResult(steps, report, results)
