"""Stage 3, ``convert``: a QAT folder's fake-quant weights become true packed integers.

    QAT folder --quantize_weight + pack (same math as training)--> packed folder

``convert()`` = load, validate, pack, check, save (CTranslate2-style):

1. load the QAT student with its fake quantization (:func:`dqtool.formats.qat.load_qat`);
2. pack every quantized Linear and the token embedding (:func:`dqtool.model.packed.pack_model`);
3. choose the dtype of the tensors that stay in floating point, per group (biases, norms,
   float learned positions, other): ``auto`` takes float16 for every group when the packed
   model's logits stay within ``tolerance`` of the QAT model's and greedy tokens are
   identical on check inputs; otherwise it starts from float32 (bit-exact by construction,
   and checked) and moves one group at a time to float16, keeping each move that passes;
   per tensor, whatever float16 cannot hold (overflow, underflow) stays float32 in every
   trial, so one such tensor does not keep its whole group in float32;
4. store 2-bit code tables in base 3 (five codes per byte, ``ternary_storage="base3"``)
   or in the 2-bit layout, checked to decode back exactly;
5. write the folder atomically with a manifest holding every file's hash, the
   per-tensor scheme and the footprint with its bit-count bound per tensor group.

The packed folder's files, detection, loading (:func:`~dqtool.formats.packed.load_packed`) and integrity check are
:mod:`dqtool.formats.packed`'s. Learned weight ranges (lsq / seq) are not stored there: the
packed scales hold them.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError
from dqtool.formats.manifest import atomic_output, check_output, read_manifest, write_manifest
from dqtool.formats.packed import FLOAT_DTYPES, PACKED_FILE
from dqtool.model.packed import STORAGES
from dqtool.formats.packed import save as save_packed
from dqtool.base.fsutil import locked
from dqtool.model.weight_cache import WeightCache, set_weight_cache

FLOAT_GROUPS = ("positions", "other", "biases", "norms")   # greedy float16 order: largest first
_COPIED = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class ConvertConfig:
    """How to convert. Validated on construction.

    Example:
        >>> ConvertConfig().float_dtype
        'auto'
        >>> ConvertConfig(float_dtype="int8")
        Traceback (most recent call last):
        ...
        dqtool.base.config_error.ConfigError: --float-dtype 'int8' is not supported: choose auto, float32, float16 or bfloat16
    """

    float_dtype: str = "auto"       # auto | float32 | float16 | bfloat16
    tolerance: float = 1e-3         # auto: largest max|dlogit| / max|logit| accepted for float16
    check_samples: int = 8          # random check inputs (token ids) for the float-dtype check
    check_length: int = 24          # source tokens per check input; greedy decodes as many
    weight_cache: str = "model"     # how the check's models keep their (de/fake-)quantized weights
    teacher: str | None = None      # fp32 teacher for the ratio (default: the one the QAT manifest names)
    seed: int = 0
    # 2-bit code tables on disk: base3 = five codes per byte (1.6 bits per code), decoded to
    # the 2-bit layout at load; 2bit = the kernels' layout as stored before.
    ternary_storage: str = "base3"

    def __post_init__(self):
        if self.float_dtype != "auto" and self.float_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"{{float_dtype}} '{self.float_dtype}' is not supported: choose auto, "
                              + ", ".join(list(FLOAT_DTYPES)[:-1]) + f" or {list(FLOAT_DTYPES)[-1]}")
        if not self.tolerance > 0:
            raise ConfigError(f"{{tolerance}} must be > 0, got {self.tolerance}")
        if self.check_samples < 1 or self.check_length < 2:
            raise ConfigError("{check_samples} must be >= 1 and {check_length} >= 2")
        if self.ternary_storage not in STORAGES:
            raise ConfigError(f"{{ternary_storage}} '{self.ternary_storage}' is not supported: choose "
                              + " or ".join(STORAGES))
        WeightCache(self.weight_cache)  # validates the mode


@dataclass(frozen=True)
class ConvertResult:
    out_dir: Path
    wea: str
    float_dtype: str
    footprint: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    float_dtypes: dict = field(default_factory=dict)   # per float group (biases, norms, positions, other)


# --------------------------------------------------------------------------- footprint

def code_bits(entry: dict) -> float:
    """Bits one code of a layout entry needs at least in its storage: ``log2(3)`` for a
    base-3 table (3 levels; stored at 1.6), else its bit width."""
    return math.log2(3) if entry.get("storage") == "base3" else float(entry["bits"])


def bit_bound(layout: dict, packed: dict, floats: dict, positions: tuple[str, ...] = ()) -> dict:
    """The bytes this scheme needs at least, per tensor group: every code at its bit width
    (:func:`code_bits`, no padding), scales and floats at their stored dtype. ``positions``
    (the learned position tables' module paths) is its own group, quantized or float.

    Example:
        >>> lay = {"l": {"kind": "linear", "bits": 2, "shape": [4, 10]}}
        >>> t = {"l.qweight": torch.zeros(4, 3, dtype=torch.uint8), "l.scale": torch.zeros(4)}
        >>> bit_bound(lay, t, {"b": torch.zeros(4, dtype=torch.float16)})
        {'codes': 10, 'scales': 16, 'floats': 8, 'positions': 0, 'total': 34}
        >>> bit_bound({**lay, "l": {**lay["l"], "storage": "base3"}}, t, {})["codes"]   # 40 trits: 63.4 bits
        8
    """
    def is_pos(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in positions)

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    codes = sum(e["shape"][0] * e["shape"][1] * code_bits(e) for n, e in layout.items()
                if e["kind"] != "tied" and not is_pos(n))
    pos_codes = sum(e["shape"][0] * e["shape"][1] * code_bits(e) for n, e in layout.items()
                    if e["kind"] != "tied" and is_pos(n))
    out = {"codes": math.ceil(codes / 8),
           "scales": sum(nbytes(t) for k, t in packed.items() if k.endswith(".scale") and not is_pos(k)),
           "floats": sum(nbytes(t) for k, t in floats.items() if not is_pos(k)),
           "positions": math.ceil(pos_codes / 8) + sum(nbytes(t) for k, t in {**packed, **floats}.items()
                                                       if is_pos(k) and t.is_floating_point())}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- check

def _check_inputs(config, cfg: ConvertConfig) -> torch.Tensor:
    # Random ids above the special tokens (ids < 4 in BART/T5/Marian vocabularies).
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = int(config.vocab_size)
    return torch.randint(min(4, vocab - 1), vocab, (cfg.check_samples, cfg.check_length), generator=g)


def _greedy(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)


@torch.no_grad()
def reference_outputs(ref, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(greedy tokens, teacher-forced logits on them)`` of ``ref``: what :func:`compare`
    compares against, computed once for several candidates (the reference is deterministic)."""
    a = ref.generate(input_ids=ids, **_greedy(new_tokens))
    return a, ref(input_ids=ids, decoder_input_ids=a).logits


@torch.no_grad()
def compare(ref, model, ids: torch.Tensor, new_tokens: int, ref_out: tuple | None = None) -> dict:
    """Logits and greedy tokens of ``model`` against ``ref`` on ``ids``.

    Returns ``max_abs`` and ``rel`` (max|dlogit| / max|logit|) of teacher-forced logits
    and ``tokens_equal`` for greedy generation of ``new_tokens`` tokens. ``ref_out``: the
    reference's :func:`reference_outputs`, when already computed.
    """
    a, la = ref_out if ref_out is not None else reference_outputs(ref, ids, new_tokens)
    b = model.generate(input_ids=ids, **_greedy(new_tokens))
    lb = model(input_ids=ids, decoder_input_ids=a).logits
    diff = (la.float() - lb.float()).abs().max().item()
    return {"max_abs": diff, "rel": diff / max(la.abs().max().item(), 1e-12), "bit_exact": torch.equal(la, lb),
            "tokens_equal": bool(a.shape == b.shape and torch.equal(a, b)), "samples": int(ids.shape[0]),
            "new_tokens": new_tokens}


def float_groups(model, floats: dict) -> dict[str, list[str]]:
    """Float tensor names by group: ``positions`` (learned position tables kept in float),
    ``norms`` (layer/RMS norm weights and biases), ``biases`` (Linear biases,
    final_logits_bias) and ``other`` (anything else, e.g. a float lm_head)."""
    from dqtool.model.registry import get_module, spec_for

    spec = spec_for(model.config)
    groups: dict[str, list[str]] = {g: [] for g in FLOAT_GROUPS}
    for k in floats:
        path = k.rsplit(".", 1)[0]
        try:
            mod = get_module(model, path)
        except AttributeError:
            mod = None
        if any(k.startswith(p + ".") for p in spec.position_embeddings):
            groups["positions"].append(k)
        elif mod is not None and "norm" in type(mod).__name__.lower():
            groups["norms"].append(k)
        elif k.endswith("bias"):
            groups["biases"].append(k)
        else:
            groups["other"].append(k)
    return {g: v for g, v in groups.items() if v}


def fp16_unsafe(t: torch.Tensor) -> bool:
    """True when float16 cannot hold ``t``: a value overflows (|x| > 65504), or the whole
    tensor sits so low that rounding errs by more than 2^-10 of its largest magnitude.
    Such a tensor stays float32 whatever the check says; a tensor float16 holds to its
    normal precision is left to the model-level check.

        >>> fp16_unsafe(torch.tensor([1.0, -3.5])), fp16_unsafe(torch.tensor([7e4])), fp16_unsafe(torch.tensor([1e-7, 3e-7]))
        (False, True, True)
    """
    t = t.detach().float()
    h = t.half().float()
    if not torch.isfinite(h).all():
        return True
    # float16's subnormals lose relative precision, but only values far below the tensor's
    # scale land there: measure the error against the largest magnitude.
    return bool(((h - t).abs() > t.abs().max() * 2.0 ** -10).any())


def _choose_float_dtype(qat_model, packed, layout, floats, qstate, cfg: ConvertConfig):
    """``(dtype word, stored floats, check of the choice, checks tried, dtype per group)``."""
    from dqtool.model.packed import build_packed_model

    ids = _check_inputs(qat_model.config, cfg)
    groups = float_groups(qat_model, floats)
    # Both sides keep their quantized weights between forwards (cfg.weight_cache "model"):
    # the same tensors the forward would compute, so the check's verdict is unchanged, and
    # at BART-base shape it takes seconds instead of minutes.
    set_weight_cache(qat_model, cfg.weight_cache)
    tried = {}
    # The reference's tokens and logits are the same for every candidate: computed once,
    # then the QAT side's kept weights are freed.
    ref_out = reference_outputs(qat_model, ids, cfg.check_length)
    set_weight_cache(qat_model, "none")
    built = []

    group_of = {k: g for g, keys in groups.items() for k in keys}
    # Per tensor: what float16 cannot hold (overflow, underflow) stays float32 in every trial.
    keep32 = {k for k, v in floats.items() if fp16_unsafe(v)}

    def attempt(label: str, dtypes: dict[str, str]):
        stored = {k: v.to(FLOAT_DTYPES["float32" if k in keep32 and dtypes[group_of[k]] == "float16"
                                       else dtypes[group_of[k]]]) for k, v in floats.items()}
        if built:
            # One packed model for every candidate: only its floats change, loaded as
            # build_packed_model loads them (rounded to the candidate dtype, computed in
            # float32); the packed tensors and their kept weights stay.
            model = built[0]
            state = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in stored.items():
                    state[k].copy_(v.to(state[k].dtype))
        else:
            model = build_packed_model(qat_model.config, qat_model.dqtool_scheme, packed, layout, stored, qstate)
            set_weight_cache(model, cfg.weight_cache)
            model.generation_config = copy.deepcopy(qat_model.generation_config)
            built.append(model)
        check = compare(qat_model, model, ids, cfg.check_length, ref_out)
        tried[label] = check
        ok = check["bit_exact"] or (check["tokens_equal"] and check["rel"] <= cfg.tolerance)
        return ok, stored, check

    def described(dtypes: dict[str, str]) -> dict[str, str]:
        out = dict(dtypes)
        for g, keys in groups.items():
            n32 = sum(k in keep32 for k in keys)
            if n32 and dtypes[g] == "float16":
                out[g] = f"mixed ({len(keys) - n32} of {len(keys)} float16)"
        return out

    def word(dtypes: dict[str, str]) -> str:
        used = set(dtypes.values())
        return used.pop() if len(used) == 1 and not next(iter(used)).startswith("mixed") else "mixed"

    try:
        if cfg.float_dtype != "auto":
            dtypes = {g: cfg.float_dtype for g in groups}
            _, stored, check = attempt(cfg.float_dtype, dtypes)
            if cfg.float_dtype == "float32" and not check["bit_exact"]:
                raise DQToolError(f"the packed model's logits differ from the QAT model's by {check['max_abs']:.3g} "
                                  f"with float32 floats; this is a dqtool bug: please report it")
            return word(described(dtypes)), stored, check, tried, described(dtypes)
        all16 = {g: "float16" for g in groups}
        ok, stored, check = attempt("float16", all16)
        if ok:
            return word(described(all16)), stored, check, tried, described(all16)
        # Greedy per group: from float32 (exact), move each group to float16 while the check holds.
        dtypes = {g: "float32" for g in groups}
        ok, stored, check = attempt("float32", dtypes)
        if not check["bit_exact"]:
            raise DQToolError(f"the packed model's logits differ from the QAT model's by {check['max_abs']:.3g} "
                              f"with float32 floats; this is a dqtool bug: please report it")
        for g in FLOAT_GROUPS:
            if g not in groups:
                continue
            trial = {**dtypes, g: "float16"}
            ok, t_stored, t_check = attempt(f"float16:{g}", trial)
            if ok:
                dtypes, stored, check = trial, t_stored, t_check
        per_group = described(dtypes)
        return word(per_group), stored, check, tried, per_group
    finally:
        set_weight_cache(qat_model, "none")  # frees the QAT side's kept weights


# --------------------------------------------------------------------------- stage

@locked("out_dir")
def convert(qat_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: ConvertConfig | None = None,
            force: bool = False) -> ConvertResult:
    """Pack the QAT student in ``qat_dir`` into ``out_dir``.

    Example (needs real folders, so not run as a doctest)::
        r = convert("runs/qat-2-2-8", "runs/packed-2-2-8")
        r.footprint["ratio_to_teacher"]   # e.g. 16.3
    """
    from safetensors.torch import load_file, save_file

    from dqtool.formats.hf import describe_source, fp32_bytes
    from dqtool.formats.qat import QSTATE_FILE, SCHEME_FILE, is_qat_folder, load_qat
    from dqtool.model.packed import decode_storage, encode_storage, pack_model, skipped_float_keys
    from dqtool.model.qmodules import activation_quantizer_state
    from dqtool.model.registry import spec_for

    cfg = cfg or ConvertConfig()
    out = check_output(out_dir, force)
    src = Path(qat_dir)
    if not src.is_dir():
        raise DQToolError(f"QAT folder {src} not found: pass the output folder of 'dqtool qat'")
    if not is_qat_folder(src):
        raise DQToolError(f"{src} has no {SCHEME_FILE}: pass the output folder of 'dqtool qat' (convert needs the "
                          f"quantization scheme the student was trained with)")
    model, tok = load_qat(src)  # every file checked against the QAT manifest first (one integrity policy)
    qat_manifest = read_manifest(src)
    scheme = model.dqtool_scheme
    qpath = src / QSTATE_FILE
    # Learned weight ranges (lsq / seq) are baked into the packed scales; the packed folder
    # keeps only the activation quantizers' state.
    qstate = activation_quantizer_state(load_file(str(qpath))) if qpath.is_file() else {}
    packed, layout, floats = pack_model(model)
    fdtype, stored, check, tried, group_dtypes = _choose_float_dtype(model, packed, layout, floats, qstate, cfg)
    disk, disk_layout = encode_storage(packed, layout, cfg.ternary_storage)
    back, _ = decode_storage(disk, disk_layout)
    if any(not torch.equal(back[k], packed[k]) for k in packed):
        raise DQToolError("base-3 storage did not decode to the packed codes; this is a dqtool bug: please report it")

    teacher = cfg.teacher or ((qat_manifest or {}).get("inputs", {}).get("teacher", {}) or {}).get("path")
    teacher_fp32 = fp32_bytes(teacher) if teacher else None
    spec = spec_for(model.config)

    with atomic_output(out, force=force) as tmp:
        doc = {"architecture": spec.name,
               "scheme": scheme.to_dict(), "wea": scheme.wea, "float_dtype": fdtype,
               **({"float_dtypes": group_dtypes} if fdtype == "mixed" else {}),
               "scale_dtype": str(next((t.dtype for k, t in packed.items() if k.endswith(".scale")), "none")),
               "layout": disk_layout, "floats": sorted(stored),
               "rebuilt_from_config": list(skipped_float_keys(spec)),
               "quantizers": QSTATE_FILE if qstate else None}
        # Format 2 only when the folder needs it (base-3 tables, quantized positions): others
        # stay readable by dqtool versions that know format 1.
        version = 2 if any(e.get("storage") == "base3" or e["kind"] == "position" for e in disk_layout.values()) else 1
        save_packed(tmp, {**disk, **{k: v.contiguous() for k, v in stored.items()}}, doc, version)
        for name in _COPIED:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if qstate:
            save_file({k: v.contiguous() for k, v in qstate.items()}, str(tmp / QSTATE_FILE))
        if tok is not None:
            tok.save_pretrained(tmp)
        weights = (tmp / PACKED_FILE).stat().st_size
        bound = bit_bound(disk_layout, disk, stored, spec.position_embeddings)
        total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        footprint = {"packed_file_bytes": weights, "bound": bound,
                     "over_bound": round(weights / bound["total"] - 1, 4),
                     "folder_bytes_before_manifest": total,
                     "teacher": teacher, "teacher_fp32_bytes": teacher_fp32,
                     "ratio_to_teacher": round(teacher_fp32 / weights, 2) if teacher_fp32 else None}
        write_manifest(tmp, "convert",
                       inputs={"qat": describe_source(src),
                               "qat_manifest_files": (qat_manifest or {}).get("files")},
                       config=cfg,
                       extra={"wea": scheme.wea, "float_dtype": fdtype, "float_dtypes": group_dtypes,
                              "ternary_storage": cfg.ternary_storage, "check": check, "checks_tried": tried,
                              "footprint": footprint,
                              "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                                          for k, v in {**disk, **stored}.items()}})
    return ConvertResult(out, scheme.wea, fdtype, footprint, check, group_dtypes)
