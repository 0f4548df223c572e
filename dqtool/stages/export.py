"""Stage 4, ``export``: a packed folder becomes ONNX encoder/decoder graphs whose Linears
are ONNX Runtime's quantized ops on the trained integers.

    packed folder --plan, optimum export, rename, share weights, validate--> ONNX folder

``export()`` = load, validate the scheme against what this onnxruntime runs, export,
post-process, check, save:

1. :func:`plan_linears` picks per Linear the ``integer`` path (MatMulInteger on int8
   activation codes, bit-faithful up to float rounding) or ``nbits`` (MatMulNBits);
   a scheme this onnxruntime cannot run (3-bit weights, an odd group size, asymmetric
   per-tensor activations below 8 bits) is an error before anything is exported, naming what to choose.
2. optimum's exporter writes ``encoder_model.onnx`` and a merged ``decoder_model_merged.onnx``
   (one graph with a use-cache branch: one copy of the decoder weights) from the packed
   model in export mode (:mod:`dqtool.qmath.onnx_ops`).
3. Initializers get their packed names back (``model.encoder.layers.0.fc1.qweight``,
   ``model.shared.qweight``) and go to external data files. The folder is laid out for
   both optimum and transformers.js (see :func:`js_config`): graphs under ``onnx/``, each
   graph's weights in ``<graph>.onnx_data`` (``--external-data per-graph``, the default:
   the tied embedding, used by both graphs, is stored twice) or one
   ``weights.onnx_data`` both graphs reference (``--external-data shared``: stored once;
   onnxruntime, optimum, dqtool and transformers.js in Node load it, browsers need
   ``session_options.externalData``).
4. Every export is validated: ``onnx.checker``, no float copy of any quantized weight
   among the initializers, ORT sessions on CPU, and encoder output and decoder logits
   compared with the packed PyTorch runtime; a failure is an error naming the graph and
   how far off it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError
from dqtool.base.progress import stage
from dqtool.formats.manifest import atomic_output, check_output, read_manifest, write_manifest
from dqtool.qmath.pack import unpack_codes
from dqtool.qmath.onnx_ops import (BLOCK_SIZES, INTEGER, KERNEL_BITS_CHOICES, NBITS, NBITS_BITS, LinearPlan,
                                   choose_block, kernel_bits, onnx_linear)
from dqtool.formats.onnx import DATA_FILE, ENCODER_FILE, EXPORT_FILE, GENERATION_FILE, ONNX_SUBDIR  # the file names the runtime loads
from dqtool.formats.onnx import MERGED_FILE as DECODER_FILE
from dqtool.runtimes.ort import session_options
from dqtool.base.fsutil import locked
from dqtool.formats.onnx import graph_folder

EXTERNAL_DATA_CHOICES = ("per-graph", "shared")  # DATA_FILE: the one file of --external-data shared
MATMUL_CHOICES = ("auto", INTEGER, NBITS)
DECODER_STEP_CHOICES = ("lean", "optimum")  # the generation graph's cached decoder step
GENERATION_GRAPH_CHOICES = ("none", "beam")  # beam: also onnx/generation_model.onnx (ORT's BeamSearch op)
ACCURACY_LEVELS = (0, 4)  # MatMulNBits: 0 = float compute (faithful), 4 = int8 compute (fast)
OPSET = 18  # BitwiseAnd (in-graph unpacking of packed codes) needs opset 18


@dataclass(frozen=True)
class ExportConfig:
    """How to export. Validated on construction.

    Example:
        >>> ExportConfig().matmul
        'auto'
        >>> ExportConfig(accuracy_level=3)
        Traceback (most recent call last):
        ...
        dqtool.base.config_error.ConfigError: --accuracy-level 3 is not supported: choose 0 (float compute, faithful) or 4 (int8 compute, fast)
    """

    matmul: str = "auto"          # auto | integer | nbits
    accuracy_level: int = 4       # MatMulNBits: 4 = int8 compute (fast), 0 = float compute
    # Largest max|d| / max|ref| accepted between ORT and the packed runtime. Integer codes
    # and scales are exact; float ops outside the quantized matmuls (LayerNorm, softmax,
    # rescale) round differently, which now and then moves an activation code by one step.
    rtol: float = 2e-2
    nbits_rtol: float = 5e-2      # graphs with MatMulNBits at accuracy level 4 (A re-quantized per block)
    # Teacher-forced argmax tokens that must agree. A one-step code change can flip a
    # near-tie between two tokens, so this is a rate, not all-or-nothing; greedy outputs
    # on real data are compared by 'dqtool eval' / the benchmarks.
    min_argmax_agreement: float = 0.9
    # --matmul auto: per-token Linears take MatMulNBits when together they hold at least
    # this many weights (decoding is then memory-bound: packed 2/4 bits beat int8). Below
    # it the int8 weights stay in cache and MatMulInteger, with fewer ops, is faster.
    # Measured: d=128 demo (1.5M) 0.34 ms/token integer vs 0.56 nbits; BART-base 6-3
    # (66M) 2.86 nbits vs 4.86 integer, and 3.85 when only matrices >= 1M took nbits.
    nbits_min_weights: int = 8 << 20
    # Opt-in: onnxruntime's lookup-table (T-MAC) kernel for eligible 2-bit MatMulNBits (K and
    # block multiples of 32, N of 128), a session setting recorded in export.json. Its activation
    # rounding is its own (not the block quantizer), so the check then tolerates nbits_rtol.
    lut_gemm: bool = False
    # MatMulNBits kernel width per Linear: auto = the measured fastest of this onnxruntime
    # (dqtool.qmath.onnx_ops.kernel_bits: 8 bits over many rows, at least 4 per token), the codes
    # re-packed in the graph at session start (same integers, same result; the file keeps the
    # packed bits, memory at run time holds the wider ones); weight = the weights' own bits
    # (least memory at run time).
    nbits_kernel: str = "auto"
    check_samples: int = 4
    check_length: int = 16
    seed: int = 0
    # per-graph: <graph>.onnx_data, what transformers.js fetches (Node and browsers); the
    # tied embedding is stored in both files. shared: one weights.onnx_data, stored once.
    external_data: str = "shared"
    # beam: also write onnx/generation_model.onnx, the whole generation (greedy = one beam, and beam
    # search with the generation config's lengths, penalties, EOS/pad/start ids) in one graph around
    # the same quantized encoder and decoder (ONNX Runtime's com.microsoft.BeamSearch op, the weights
    # shared with the two graphs); validated to give the ONNX runtime's tokens.
    generation_graph: str = "none"
    # The generation graph's cached decoder step: lean = dqtool.model.decoder_step (one
    # MultiHeadAttention node per attention, no shape ops; architectures with a registry layout and
    # schemes that leave the attention matmuls in float), optimum = the merged decoder's cached branch.
    decoder_step: str = "lean"

    def __post_init__(self):
        if self.decoder_step not in DECODER_STEP_CHOICES:
            raise ConfigError(f"{{decoder_step}} '{self.decoder_step}' is not supported: choose "
                              f"{', '.join(DECODER_STEP_CHOICES)}")
        if self.matmul not in MATMUL_CHOICES:
            raise ConfigError(f"{{matmul}} '{self.matmul}' is not supported: choose {', '.join(MATMUL_CHOICES)}")
        if self.external_data not in EXTERNAL_DATA_CHOICES:
            raise ConfigError(f"{{external_data}} '{self.external_data}' is not supported: choose "
                              f"{', '.join(EXTERNAL_DATA_CHOICES)}")
        if self.generation_graph not in GENERATION_GRAPH_CHOICES:
            raise ConfigError(f"{{generation_graph}} '{self.generation_graph}' is not supported: choose "
                              f"{', '.join(GENERATION_GRAPH_CHOICES)}")
        if self.nbits_kernel not in KERNEL_BITS_CHOICES:
            raise ConfigError(f"{{nbits_kernel}} '{self.nbits_kernel}' is not supported: choose "
                              f"{', '.join(KERNEL_BITS_CHOICES)}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"{{accuracy_level}} {self.accuracy_level} is not supported: choose 0 (float compute, "
                              f"faithful) or 4 (int8 compute, fast)")
        if not self.rtol > 0:
            raise ConfigError("{rtol} must be > 0")
        if not self.nbits_rtol > 0:
            raise ConfigError("{nbits_rtol} must be > 0")
        if not 0 <= self.min_argmax_agreement <= 1:
            raise ConfigError(f"{{min_argmax_agreement}} must be in [0, 1], got {self.min_argmax_agreement}")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    wea: str
    paths: dict = field(default_factory=dict)     # integer/nbits -> number of Linears
    check: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- export modules

class OnnxLinear(torch.nn.Module):
    """A packed Linear in export mode: its forward emits ONNX Runtime's quantized ops
    (:func:`dqtool.qmath.onnx_ops.onnx_linear`) as planned.

    It holds the packed module's own ``qweight`` / ``scale`` / ``bias`` tensors under the same
    names (a tied lm_head refers to the embedding's, not registered twice), so the graphs'
    initializers keep the packed names. Swapped in by :func:`onnx_modules` for the export only.
    """

    def __init__(self, packed, plan: LinearPlan):
        super().__init__()
        self.plan, self.spec, self.act_spec = plan, packed.spec, packed.act_spec
        self.in_features, self.out_features = packed.in_features, packed.out_features
        object.__setattr__(self, "tied_to", packed.tied_to)  # the embedding stays at its own path
        if packed.tied_to is None:
            self.register_buffer("qweight", packed.qweight)
            self.register_buffer("scale", packed.scale)
        if packed.bias is not None:
            self.register_buffer("bias", packed.bias)
        else:
            self.bias = None

        object.__setattr__(self, "packed", packed)  # not a submodule: its buffers are registered above

    def weight(self) -> torch.Tensor:
        """The dequantized weight (a method, as on the packed Linear: models such as T5 look
        for a ``weight`` tensor to pick a dtype and must not find one)."""
        return self.packed.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return onnx_linear(self, x, self.plan)


@contextlib.contextmanager
def onnx_modules(model, plans: dict[str, LinearPlan]):
    """Swap an :class:`OnnxLinear` in for every planned packed Linear of ``model`` (as QAT's
    ``prepare`` swaps its modules in); the packed modules are put back afterwards."""
    from dqtool.model.registry import get_module

    originals = {}
    try:
        for name, plan in plans.items():
            parent_path, _, attr = name.rpartition(".")
            parent = get_module(model, parent_path) if parent_path else model
            originals[name] = (parent, attr, getattr(parent, attr))
            setattr(parent, attr, OnnxLinear(originals[name][2], plan))
        yield model
    finally:
        for parent, attr, mod in originals.values():
            setattr(parent, attr, mod)


# --------------------------------------------------------------------------- plan

def plan_linears(model, cfg: ExportConfig) -> dict[str, LinearPlan]:
    """Per packed Linear, how it is exported; raises DQToolError for what ORT cannot run.

    Example (needs a packed model, so not run as a doctest)::
        plans = plan_linears(load_packed("runs/packed")[0], ExportConfig())
        plans["model.encoder.layers.0.fc1"].path   # 'integer'
    """
    from dqtool.model.packed import PackedEmbedding, PackedLinear, PackedPositionEmbedding
    from dqtool.model.registry import runs_per_token, spec_for
    from dqtool.qmath.pack import ODD_CODE_METHODS

    arch = spec_for(model.config)
    per_token_weights = sum(m.in_features * m.out_features for n, m in model.named_modules()
                            if isinstance(m, PackedLinear) and runs_per_token(n, arch))
    memory_bound = per_token_weights >= cfg.nbits_min_weights
    # Every unsupported bit width at once (a 3-3-8 scheme names its weights and embeddings).
    bad = {}
    for mod in model.modules():
        if isinstance(mod, PackedEmbedding) and mod.spec.bits not in NBITS_BITS:
            bad.setdefault("E", f"{mod.spec.bits}-bit embeddings")
        elif isinstance(mod, PackedLinear) and mod.spec.bits not in NBITS_BITS:
            bad.setdefault("W", f"{mod.spec.bits}-bit weights")
    if bad:
        raise DQToolError(f"{' and '.join(bad[k] for k in sorted(bad, reverse=True))} cannot be exported (the ONNX "
                          f"graphs unpack 2, 4 or 8 bits per code; MatMulNBits runs 2, 4 and 8 bits): choose "
                          f"{' and '.join(sorted(bad, reverse=True))} bits 2, 4 or 8")
    plans = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (PackedEmbedding, PackedPositionEmbedding)) and mod.spec.bits not in NBITS_BITS:
            raise DQToolError(f"{mod.spec.bits}-bit embeddings or positions cannot be exported (the ONNX graphs "
                              f"unpack 2, 4 or 8 bits per code): choose E bits (and --pos-bits) 2, 4 or 8")
        if not isinstance(mod, PackedLinear):
            continue  # float Linears (a W 'none' scheme, or the lm_head tied to a float embedding) stay float
        spec = mod.spec
        aspec = mod.act_spec
        if spec.bits not in NBITS_BITS:
            raise DQToolError(f"{spec.bits}-bit weights cannot run in onnxruntime's CPU kernels (MatMulNBits runs "
                              f"2, 4 and 8 bits): choose W bits 2, 4 or 8")
        if aspec is not None and not aspec.symmetric and aspec.bits != 8 and aspec.granularity == "tensor":
            raise DQToolError(f"asymmetric per-tensor {aspec.bits}-bit activations have no ONNX Runtime kernel "
                              f"(DynamicQuantizeLinear is 8-bit): choose symmetric or per-token activations, "
                              f"or A bits 8")
        clip = float(mod.act.clip.detach()) if getattr(mod.act, "clip", None) is not None else 0.0
        # Per-block activation scales (MatMulNBits' own input quantizer) vary along the
        # reduction axis, which one MatMulInteger cannot rescale: those Linears take MatMulNBits.
        block_act = aspec is not None and aspec.granularity == "block"
        per_token, odd = runs_per_token(name, arch), spec.method in ODD_CODE_METHODS
        integer_ok = aspec is not None and spec.granularity != "group" and not block_act
        if cfg.matmul == "auto":
            # Many rows (encoder, cross-attention keys/values): MatMulInteger is several times
            # faster. One row per step (decoder, lm_head): MatMulNBits reads the packed 2/4-bit
            # weights (int8 MatMulInteger would read 8 bits per weight per token).
            nbits_ok = choose_block(spec, mod.in_features) > 0
            path = NBITS if (per_token and memory_bound and nbits_ok and spec.bits < 8) or not integer_ok \
                else INTEGER
        else:
            path = cfg.matmul
        if path == INTEGER and not integer_ok:
            why = "the scheme leaves activations in float" if aspec is None else \
                "per-block activation scales vary along the reduction axis" if block_act else \
                "group-wise weight scales vary along the reduction axis"
            raise DQToolError(f"--matmul integer cannot export {name}: {why}; choose --matmul nbits or auto")
        block, kbits = 0, 0   # kbits 0: MatMulNBits at the weights' own bits
        if path == NBITS:
            if cfg.nbits_kernel == "auto" and cfg.accuracy_level == 4:
                kbits = kernel_bits(spec.bits, per_token, odd, cfg.lut_gemm)
            block = aspec.group_size if block_act else choose_block(spec, mod.in_features)
            if block_act and spec.granularity == "group" and spec.group_size != block:
                raise DQToolError(f"{name}: activation block {block} differs from the weight group size "
                                  f"{spec.group_size}: choose act_block_size equal to the group size")
            if not block or block not in BLOCK_SIZES or mod.in_features % block:
                raise DQToolError(
                    f"{name}: MatMulNBits needs a block size in {BLOCK_SIZES} dividing the input width "
                    f"{mod.in_features}" + (f" (group size {spec.group_size})" if spec.group_size else "")
                    + ": choose a group size of 16, 32, 64, 128 or 256, or activations A 8 with per-row scales")
        plans[name] = LinearPlan(path=path, bits=spec.bits, in_features=mod.in_features,
                                 out_features=mod.out_features, a_bits=aspec.bits if aspec else None,
                                 a_symmetric=aspec.symmetric if aspec else True, clip=clip,
                                 a_granularity=aspec.granularity if aspec else "token", block_size=block,
                                 accuracy_level=cfg.accuracy_level, odd_codes=odd,
                                 kernel_bits=kbits, per_token=per_token)
    return plans


# --------------------------------------------------------------------------- post-processing

def _all_graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from _all_graphs(attr.g)
            for sub in attr.graphs:
                yield from _all_graphs(sub)


def canonical_names(model) -> dict[str, str]:
    """``{any state-dict name: the first name of the same tensor}`` (aliases -> canonical)."""
    first: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ptr = v.data_ptr()
        first.setdefault(ptr, k)
        out[k] = first[ptr]
    return out


def rename_initializers(onnx_model, names: dict[str, str], root: str = "") -> dict[str, str]:
    """Give initializers their packed-model names; return ``{old: new}``.

    optimum names the encoder's tensors relative to the encoder module (``layers.0...``)
    and suffixes the merged decoder's with ``_merged_0``. A name is mapped to
    ``root.name`` when that is a model name (``root`` = the exported submodule, e.g.
    ``model.encoder``), else to the unique model name it is a dotted suffix of; then to
    that tensor's canonical (first) name.
    """
    suffixes: dict[str, set[str]] = {}
    for full, canon in names.items():
        parts = full.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), set()).add(canon)
    mapping = {}
    for g in _all_graphs(onnx_model.graph):
        for init in g.initializer:
            base = init.name[: -len("_merged_0")] if init.name.endswith("_merged_0") else init.name
            cands = suffixes.get(base, set())
            if root and f"{root}.{base}" in names:
                mapping[init.name] = names[f"{root}.{base}"]
            elif len(cands) == 1:
                mapping[init.name] = next(iter(cands))
    for g in _all_graphs(onnx_model.graph):
        for init in g.initializer:
            if init.name in mapping:
                init.name = mapping[init.name]
        for node in g.node:
            for i, x in enumerate(node.input):
                if x in mapping:
                    node.input[i] = mapping[x]
    return mapping


def compact_names(onnx_model) -> None:
    """Shorten every intermediate value name (``/model/decoder/layers.1/.../Concat_1_output_0``
    -> ``t123``) and drop node names and doc strings, in place.

    The exporter's names cost ~100 bytes per node, more than the packed weights of a
    small model; graph inputs/outputs and initializers keep their names. One map serves
    all (sub)graphs, so If branches still find the outer values they use.
    """
    keep = {v.name for v in (*onnx_model.graph.input, *onnx_model.graph.output)}
    for g in _all_graphs(onnx_model.graph):
        keep.update(i.name for i in g.initializer)
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping)}"
        return mapping[name]

    for g in _all_graphs(onnx_model.graph):
        for node in g.node:
            node.name = ""
            node.doc_string = ""
            for i, x in enumerate(node.input):
                node.input[i] = short(x)
            for i, x in enumerate(node.output):
                node.output[i] = short(x)
        if g is not onnx_model.graph:
            for v in (*g.input, *g.output):
                v.name = short(v.name)
        del g.value_info[:]
        g.doc_string = ""


def store_base3(onnx_model, base3: dict[str, torch.Tensor], layout: dict[str, dict]) -> list[str]:
    """Store the 2-bit code tables named in ``base3`` (``{initializer name: base-3 bytes as the
    packed folder holds them}``) in base 3, in place: the initializer keeps its packed name and
    now holds the base-3 bytes; decode nodes (:func:`dqtool.qmath.onnx_ops.base3_decode_nodes`) in
    the same graph rebuild the 2-bit table that every former consumer now reads. Returns the
    names rewritten. Each table is checked to decode to the bytes the graph held."""
    from onnx import numpy_helper

    from dqtool.qmath.onnx_ops import base3_decode_nodes
    from dqtool.qmath.pack import base3_to_2bit

    done = []
    # Innermost graphs first: rebuilding a graph's node list copies the subgraphs in it.
    for g in reversed(list(_all_graphs(onnx_model.graph))):
        new_nodes = []
        for init in g.initializer:
            if init.name not in base3 or init.name in done:
                continue
            name = init.name
            rows, n = layout[name.rsplit(".", 1)[0]]["shape"]
            old = torch.from_numpy(numpy_helper.to_array(init).copy())
            if not torch.equal(base3_to_2bit(base3[name], n), old):
                raise DQToolError(f"{name}: the packed folder's base-3 codes do not match the graph's; re-run dqtool "
                                  f"convert and export")
            init.CopyFrom(numpy_helper.from_array(base3[name].numpy(), name))
            dst = f"{name}.2bit"
            for sub in _all_graphs(g):
                for node in sub.node:
                    for i, x in enumerate(node.input):
                        if x == name:
                            node.input[i] = dst
            new_nodes += base3_decode_nodes(name, dst, rows, n)
            done.append(name)
        if new_nodes:
            existing = list(g.node)
            del g.node[:]
            g.node.extend(new_nodes + existing)
    return done


def dedupe_constants(onnx_model) -> int:
    """Drop Constant nodes that repeat an earlier Constant of the same graph (same value and
    type), pointing their users, in that graph and the graphs nested in it, at the first one;
    returns how many were dropped. The exporter writes the same small constants (axes,
    shapes, 1.0) hundreds of times; at a 2-bit BART-base 6-1 student the graphs are a few
    percent of the folder. Run after :func:`compact_names` (value names unique model-wide)."""
    dropped = 0
    # Innermost graphs first: rebuilding a graph's node list copies the subgraphs in it.
    for g in reversed(list(_all_graphs(onnx_model.graph))):
        outputs = {v.name for v in g.output}
        first: dict[bytes, str] = {}
        mapping: dict[str, str] = {}
        keep = []
        for node in g.node:
            if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] not in outputs:
                key = b"".join(a.SerializeToString(deterministic=True) for a in node.attribute)
                if key in first:
                    mapping[node.output[0]] = first[key]
                    dropped += 1
                    continue
                first[key] = node.output[0]
            keep.append(node)
        if not mapping:
            continue
        del g.node[:]
        g.node.extend(keep)
        for sub in _all_graphs(g):
            for node in sub.node:
                for i, x in enumerate(node.input):
                    if x in mapping:
                        node.input[i] = mapping[x]
    return dropped


def hoist_constants(onnx_model, min_bytes: int = 1024) -> int:
    """Turn every Constant node holding ``min_bytes`` or more into an initializer of the main
    graph, once per value, so it goes to external data with the weights and is stored once:
    the tracer writes model buffers (BART's ``final_logits_bias``, 50265 floats) as Constant
    nodes, and the merged decoder's If branches each carried a copy (0.4 MB of graph at
    BART-base). Subgraphs read the initializer from the outer scope. The initializer is named
    by its content (``const.<sha256 prefix>``), so the encoder and decoder graphs, whose other
    names are compacted independently, can share one data file without a name clash. Returns
    how many Constant nodes were removed."""
    import hashlib

    from onnx import numpy_helper

    main = onnx_model.graph
    taken = {i.name for i in main.initializer} | {v.name for v in main.input}
    removed = 0
    # Innermost graphs first: rebuilding a graph's node list copies the subgraphs in it.
    for g in reversed(list(_all_graphs(main))):
        outputs = {v.name for v in g.output}
        mapping: dict[str, str] = {}
        keep = []
        for node in g.node:
            attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
            if attr is None or attr.name != "value" or node.output[0] in outputs:
                keep.append(node)
                continue
            arr = numpy_helper.to_array(attr.t)
            if arr.nbytes < min_bytes:
                keep.append(node)
                continue
            key = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
            name = "const." + hashlib.sha256(key).hexdigest()[:16]
            if name not in taken:
                main.initializer.append(numpy_helper.from_array(arr, name))
                taken.add(name)
            mapping[node.output[0]] = name
            removed += 1
        if not mapping:
            continue
        del g.node[:]
        g.node.extend(keep)
        for sub in _all_graphs(main):
            for node in sub.node:
                for i, x in enumerate(node.input):
                    if x in mapping:
                        node.input[i] = mapping[x]
    return removed


def share_external_data(models: dict[str, object], folder: Path, min_bytes: int = 64, shared: bool = True) -> dict:
    """Move every initializer of ``min_bytes`` or more into external data, once per name and file.

    ``models`` maps file names to loaded ONNX models (edited in place, then saved into
    ``folder``). ``shared``: one file ``weights.onnx_data`` for all graphs (a tensor used by
    several graphs stored once); else one file ``<graph>_data`` per graph (``encoder_model.onnx_data``,
    the name transformers.js fetches). Tensors with the same name must be byte-identical (checked).
    """
    import onnx
    from onnx import numpy_helper

    files: dict[str, bytearray] = {}
    seen: dict[str, bytes] = {}
    stored: dict[tuple[str, str], tuple[int, int]] = {}
    for fname, m in models.items():
        data_file = DATA_FILE if shared else f"{fname}_data"
        data = files.setdefault(data_file, bytearray())
        for g in _all_graphs(m.graph):
            for init in g.initializer:
                raw = numpy_helper.to_array(init).tobytes()
                if len(raw) < min_bytes:
                    continue
                if seen.setdefault(init.name, raw) != raw:
                    raise DQToolError(f"initializer {init.name} differs between graphs; re-run dqtool export")
                if (data_file, init.name) not in stored:
                    pad = (-len(data)) % 64  # aligned, as ORT prefers for mmap
                    data.extend(b"\0" * pad)
                    stored[data_file, init.name] = (len(data), len(raw))
                    data.extend(raw)
                off, length = stored[data_file, init.name]
                init.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    init.ClearField(f)
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for key, value in (("location", data_file), ("offset", str(off)), ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value
    for data_file, data in files.items():
        (folder / data_file).write_bytes(bytes(data))
    for fname, m in models.items():
        onnx.save_model(m, str(folder / fname))
    return {"data_bytes": sum(len(d) for d in files.values()), "tensors": len(seen),
            "files": {f: len(d) for f, d in files.items()}}


def js_config(config: dict, graphs: list[str], shared: bool) -> dict:
    """``config`` with the ``transformers.js_config`` entry transformers.js reads: which graphs
    have external data (one chunk, ``<graph>_data``). With one shared data file the entry is
    left out: transformers.js would fetch ``<graph>_data``; in Node onnxruntime reads the file
    each graph names, in browsers pass ``session_options.externalData``.

    Example:
        >>> js_config({"model_type": "bart"}, ["encoder_model.onnx"], shared=False)["transformers.js_config"]
        {'use_external_data_format': {'encoder_model.onnx': 1}}
    """
    out = dict(config)
    js = dict(out.get("transformers.js_config") or {})
    if shared:
        js.pop("use_external_data_format", None)
    else:
        js["use_external_data_format"] = {g: 1 for g in graphs}
    if js:
        out["transformers.js_config"] = js
    else:
        out.pop("transformers.js_config", None)
    return out


def float_copies(models: dict[str, object], folder: Path, packed_model) -> list[str]:
    """Names of float initializers equal to a quantized weight (dequantized) or its transpose."""
    import onnx
    from onnx import numpy_helper

    from dqtool.model.packed import PackedEmbedding, PackedLinear, PackedPositionEmbedding

    weights = []
    for name, mod in packed_model.named_modules():
        if isinstance(mod, PackedLinear) and mod.tied_to is None:
            weights.append((name, mod.weight().detach().numpy()))
        elif isinstance(mod, PackedEmbedding):
            ids = torch.arange(mod.num_embeddings)
            weights.append((name, (mod(ids) / mod.embed_scale).detach().numpy()))
        elif isinstance(mod, PackedPositionEmbedding):
            codes = unpack_codes(mod.qweight, mod.spec.bits, mod.embedding_dim)
            weights.append((name, (codes.to(mod.scale.dtype) * mod.scale.unsqueeze(-1)).detach().numpy()))
    found = []
    for fname, m in models.items():
        for g in _all_graphs(m.graph):
            for init in g.initializer:
                if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                    continue
                arr = numpy_helper.to_array(init, base_dir=str(folder)).astype(np.float32)
                for name, w in weights:
                    for cand in (w, w.T):
                        if arr.shape == cand.shape and np.allclose(arr, cand, atol=1e-6):
                            found.append(f"{fname}:{init.name} == {name}")
    return found


def _base3_tables(packed_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``({NAME.qweight: base-3 bytes}, layout)`` of the tables a packed folder stores in base 3."""
    from safetensors import safe_open

    from dqtool.formats.packed import LAYOUT_FILE, PACKED_FILE

    layout = json.loads((packed_dir / LAYOUT_FILE).read_text())["layout"]
    keys = [f"{n}.qweight" for n, e in layout.items() if e.get("storage") == "base3"]
    out = {}
    if keys:
        with safe_open(str(packed_dir / PACKED_FILE), "pt") as f:
            out = {k: f.get_tensor(k) for k in keys}
    return out, layout


# --------------------------------------------------------------------------- validation

def _session(path: Path, threads: int | None = None, lut_gemm: bool = False):
    import onnxruntime as ort

    # The session options the runtime (dqtool eval / bench) uses: validation sees what users run.
    return ort.InferenceSession(str(path), session_options(threads, lut_gemm), providers=["CPUExecutionProvider"])


def _decoder_feed(sess, past_shape, mask, enc_out, dec_ids):
    # First decoder step of optimum's merged graph: no cache (use_cache_branch False,
    # zero-length dummy past [B, H, 0, Dh]), teacher-forced decoder ids.
    feed = {}
    for inp in sess.get_inputs():
        n = inp.name
        if n == "input_ids":
            feed[n] = dec_ids
        elif n == "encoder_attention_mask":
            feed[n] = mask
        elif n == "encoder_hidden_states":
            feed[n] = enc_out
        elif n == "use_cache_branch":
            feed[n] = np.array([False])
        elif n.startswith("past_key_values"):
            feed[n] = np.zeros(past_shape, dtype=np.float32)
        else:
            raise DQToolError(f"decoder graph input '{n}' is unknown to the validator")
    return feed


@torch.no_grad()
def validate(folder: Path, packed_model, cfg: ExportConfig, nbits: bool) -> dict:
    """Compare ORT (CPU) with the packed PyTorch runtime on random inputs; raise on failure.

    ``folder``: the folder holding the graphs (``OUT/onnx``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = int(packed_model.config.vocab_size)
    ids = torch.randint(min(4, vocab - 1), vocab, (cfg.check_samples, cfg.check_length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, cfg.check_length // 2:] = 0  # one padded row
    gen = packed_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.check_length,
                                do_sample=False, num_beams=1)
    ref = packed_model(input_ids=ids, attention_mask=mask, decoder_input_ids=gen, use_cache=True)
    k0 = ref.past_key_values.to_legacy_cache()[0][0]                # [B, H, T, Dh]
    past_shape = [k0.shape[0], k0.shape[1], 0, k0.shape[3]]
    enc = _session(folder / ENCODER_FILE, lut_gemm=cfg.lut_gemm)
    enc_out = enc.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    ref_enc = ref.encoder_last_hidden_state.numpy()
    keep = mask.numpy().astype(bool)
    enc_diff = float(np.abs(enc_out - ref_enc)[keep].max())
    dec = _session(folder / DECODER_FILE, lut_gemm=cfg.lut_gemm)
    logits = dec.run(["logits"], _decoder_feed(dec, past_shape, mask.numpy(), enc_out, gen.numpy()))[0]
    ref_logits = ref.logits.numpy()
    dec_diff = float(np.abs(logits - ref_logits).max())
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
    tokens_equal = agree == 1.0
    rtol = cfg.nbits_rtol if (nbits and (cfg.accuracy_level == 4 or cfg.lut_gemm)) else cfg.rtol
    scale = float(np.abs(ref_logits).max())
    enc_scale = float(np.abs(ref_enc).max())
    result = {"encoder_max_abs": enc_diff, "encoder_rel": enc_diff / max(enc_scale, 1e-12),
              "decoder_logits_max_abs": dec_diff, "decoder_logits_rel": dec_diff / max(scale, 1e-12),
              "argmax_equal": tokens_equal, "argmax_agreement": agree, "rtol": rtol, "samples": cfg.check_samples, "length": cfg.check_length}
    if result["encoder_rel"] > rtol:
        raise DQToolError(f"{ENCODER_FILE}: output differs from the packed PyTorch model by {enc_diff:.3g} "
                          f"({result['encoder_rel']:.2%} of its range, tolerance {rtol:.0%}); please report it")
    if result["decoder_logits_rel"] > rtol or agree < cfg.min_argmax_agreement:
        raise DQToolError(f"{DECODER_FILE}: logits differ from the packed PyTorch model by {dec_diff:.3g} "
                          f"({result['decoder_logits_rel']:.2%} of their range, tolerance {rtol:.0%}), argmax "
                          f"tokens agree at {agree:.1%} of positions (at least {cfg.min_argmax_agreement:.0%} needed); "
                          + ("try --accuracy-level 0" if nbits else "the export is wrong, please report it"))
    return result


def _post_process(m, names: dict[str, str], root: str, base3, disk_layout) -> list[str]:
    """An exported graph made ready to save, in place: packed initializer names, base-3 tables,
    short value names, constants deduplicated and hoisted. Returns the base-3 tables stored."""
    rename_initializers(m, names, root)
    stored = store_base3(m, base3, disk_layout)
    compact_names(m)
    dedupe_constants(m)
    hoist_constants(m)
    return stored


def export_decoder_step(model, names: dict[str, str], base3, disk_layout, raw: Path):
    """The lean cached decoder step (:mod:`dqtool.model.decoder_step`) of the packed ``model`` as an ONNX
    model whose initializers carry the packed names (as the exported graphs'), or None where the
    registry has no step layout for the architecture or the scheme quantizes the attention matmuls'
    inputs (optimum's step then runs). Call within :func:`onnx_modules`.

    (A lean encoder subgraph -- the encoder on MultiHeadAttention, 413 instead of 733 nodes on a
    2+2 test model -- was measured too and dropped: at BART-base 6-3, ORT profiling on, it ran the
    op's first call in 25-28 ms against 25-28 ms at batch 1 and 161 against 157 ms at batch 8: the
    encoder's time is its integer matmuls and activation codes, not shape ops, and MultiHeadAttention
    over 128 tokens was no faster than the exported MatMul/Softmax.)"""
    import onnx

    from dqtool.model.decoder_step import DecoderStep, fix_attention_inputs, quantizes_attention
    from dqtool.model.registry import spec_for

    layout = spec_for(model.config).decoder_step
    if not layout or quantizes_attention(model):
        return None
    step = DecoderStep(model, layout).eval()
    heads, d, n = step.heads, int(model.config.d_model), step.layers
    b, s, p = 2, 5, 3
    past = [torch.zeros(b, heads, p, d // heads) for _ in range(2 * n)]
    past += [torch.zeros(b, heads, s, d // heads) for _ in range(2 * n)]
    ids = torch.full((b, 1), 4, dtype=torch.int32)
    mask = torch.ones(b, s, dtype=torch.int32)
    dynamic = {"input_ids": {0: "B"}, "encoder_attention_mask": {0: "B", 1: "S"}, "logits": {0: "B"}}
    for name in step.input_names()[2:] + step.output_names()[1:]:
        dynamic[name] = {0: "B", 2: "S" if "cross" in name else "P"}
    path = raw / "decoder_step.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, (ids, mask, *past), str(path), input_names=step.input_names(),
                          output_names=step.output_names(), dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=False)
    m = onnx.load(str(path))
    if fix_attention_inputs(m.graph) != 2 * n:
        raise DQToolError(f"{path.name}: an attention node is missing; please report it")
    _post_process(m, names, "", base3, disk_layout)
    return m


def write_generation_graph(folder: Path, cfg: ExportConfig, step=None) -> dict:
    """Write ``folder/onnx/generation_model.onnx`` (:mod:`dqtool.runtimes.beamgraph`) for the folder's
    generation config and check its tokens against the ONNX runtime's (:class:`~dqtool.runtimes.ort.OnnxSeq2Seq`)
    on the check inputs: greedy and beam search (the config's beams, at least 2) with the config's
    settings and ``cfg.check_length`` new tokens, rows padded. Raises DQToolError (one line) for a
    config the op cannot run or any token that differs."""
    from dqtool.runtimes.beamgraph import GenerationGraph, build_generation_graph, expected_sequences, unsupported
    from dqtool.runtimes.genconfig import resolve_generation_config
    from dqtool.runtimes.ort import OnnxSeq2Seq

    ref = OnnxSeq2Seq.from_folder(folder, threads=1)
    gc = resolve_generation_config(ref, None, {})
    why = unsupported(gc)
    if why:
        raise DQToolError(f"--generation-graph beam: {why}")
    hidden = int(getattr(ref.config, "d_model", 0) or getattr(ref.config, "hidden_size"))
    dec_cfg = getattr(ref.config, "decoder", ref.config)
    heads = getattr(dec_cfg, "decoder_attention_heads", None) or getattr(dec_cfg, "num_heads", None)
    head_dim = getattr(dec_cfg, "d_kv", None) or (hidden // heads if heads else None)
    path = build_generation_graph(graph_folder(folder), gc, hidden, heads=heads, head_dim=head_dim,
                                  vocab=int(ref.config.vocab_size), step=step)
    graph = GenerationGraph.from_folder(folder, threads=1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vocab = int(ref.config.vocab_size)
    ids = torch.randint(min(4, vocab - 1), vocab, (cfg.check_samples, cfg.check_length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, cfg.check_length // 2:] = 0
    ids[0, cfg.check_length // 2:] = gc.pad_token_id if gc.pad_token_id is not None else 0
    result = {"file": path.name, "bytes": path.stat().st_size, "samples": cfg.check_samples,
              "decoder_step": "lean (MultiHeadAttention)" if step is not None else "optimum"}
    beams = max(2, int(gc.num_beams))
    # a greedy config's graph stops at the first finished hypotheses (the op's early_stopping 1)
    stop = True if gc.num_beams == 1 else gc.early_stopping
    for name, kw in (("greedy", {"num_beams": 1}), (f"beam{beams}", {"num_beams": beams, "early_stopping": stop})):
        # keyword arguments, not a GenerationConfig: a passed config's default values (num_beams 1)
        # would give way to the folder's (Hugging Face's rule)
        kw = dict(kw, max_new_tokens=cfg.check_length)
        run_gc = resolve_generation_config(ref, None, dict(kw))
        want = ref.generate(input_ids=ids, attention_mask=mask, **kw).numpy()
        got = graph.run(ids.numpy(), mask.numpy(), run_gc)[:, 0]
        expect = expected_sequences(want, run_gc)
        if got.shape != expect.shape or not (got == expect).all():
            bad = int(np.flatnonzero((got != expect).any(axis=1))[0]) if got.shape == expect.shape else 0
            raise DQToolError(f"{GENERATION_FILE}: {name} tokens differ from the ONNX runtime's on check input {bad} "
                              f"({got[bad].tolist()} vs {expect[bad].tolist()}); please report it")
        result[name] = "tokens equal"
    return result


# --------------------------------------------------------------------------- stage

@locked("out_dir")
def export(packed_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: ExportConfig | None = None,
           force: bool = False) -> ExportResult:
    """Export the packed folder ``packed_dir`` to an ONNX folder ``out_dir``.

    Example (needs real folders, so not run as a doctest)::
        r = export("runs/packed-2-2-8", "runs/onnx-2-2-8")
        r.paths   # {'integer': 36, 'nbits': 0}
    """
    import onnx

    from dqtool.formats.hf import describe_source
    from dqtool.formats.packed import is_packed_folder, load_packed
    from dqtool.model.registry import spec_for

    cfg = cfg or ExportConfig()
    out = check_output(out_dir, force)
    src = Path(packed_dir)
    if not src.is_dir() or not is_packed_folder(src):
        raise DQToolError(f"{src} is not a packed folder: pass the output folder of 'dqtool convert'")
    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError as e:
        raise DQToolError("dqtool export needs optimum's exporter: pip install 'dqtool[export]'") from e
    # every file checked against the packed manifest first; no weight cache: the traced
    # graph must read the packed codes
    model, tok = load_packed(src, cache="none")
    packed_manifest = read_manifest(src)
    plans = plan_linears(model, cfg)
    wea = packed_manifest.get("wea", "?")
    if cfg.generation_graph == "beam":  # a generation config the op cannot run: refused before exporting
        from dqtool.runtimes.beamgraph import unsupported
        from dqtool.runtimes.genconfig import resolve_generation_config

        why = unsupported(resolve_generation_config(model, None, {}))
        if why:
            raise DQToolError(f"--generation-graph beam: {why}")

    with atomic_output(out, force=force) as tmp:
        raw = tmp / "_optimum"
        with onnx_modules(model, plans), stage("export: optimum's ONNX export (encoder + merged decoder)"):
            onnx_export_from_model(model, raw, task="text2text-generation-with-past", opset=OPSET,
                                   do_validation=False, do_constant_folding=False)
        names = canonical_names(model)
        encoder_root = spec_for(model.config).encoder.layers_path.rsplit(".", 1)[0]
        base3, disk_layout = _base3_tables(src)
        step = None
        if cfg.generation_graph == "beam" and cfg.decoder_step == "lean":
            with onnx_modules(model, plans), stage("export: the lean decoder step (generation graph)"):
                step = export_decoder_step(model, names, base3, disk_layout, raw)
        models, stored_base3 = {}, set()
        for fname in (ENCODER_FILE, DECODER_FILE):
            m = onnx.load(str(raw / fname))
            stored_base3.update(_post_process(m, names, encoder_root if fname == ENCODER_FILE else "", base3,
                                              disk_layout))
            models[fname] = m
        gdir = tmp / ONNX_SUBDIR
        gdir.mkdir()
        shared = share_external_data(models, gdir, shared=cfg.external_data == "shared")
        for fname in (ENCODER_FILE, DECODER_FILE):
            try:
                onnx.checker.check_model(str(gdir / fname))
            except onnx.checker.ValidationError as e:
                raise DQToolError(f"{fname} fails onnx.checker ({str(e).splitlines()[0]}); please report it") from e
        copies = float_copies(models, gdir, model)
        if copies:
            raise DQToolError(f"float copies of quantized weights in the graphs: {copies[:3]}; please report it")
        for f in raw.iterdir():
            if f.suffix == ".json" or f.name in ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model",
                                                  "source.spm", "target.spm", "sentencepiece.bpe.model"):
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(raw)
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if tok is not None:
            tok.save_pretrained(tmp)
        if (tmp / "config.json").is_file():
            conf = js_config(json.loads((tmp / "config.json").read_text()), [ENCODER_FILE, DECODER_FILE],
                             shared=cfg.external_data == "shared")
            (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        nbits = any(p.path == NBITS for p in plans.values())
        # A fresh model: optimum's export edits configs in place (T5's encoder use_cache).
        with stage("export: validating against the packed PyTorch runtime"):
            check = validate(gdir, load_packed(src)[0], cfg, nbits)
        graphs = [ENCODER_FILE, DECODER_FILE]
        if cfg.generation_graph == "beam":
            with stage("export: generation graph (BeamSearch) and its token parity with the ONNX runtime"):
                check["generation_graph"] = write_generation_graph(tmp, cfg, step)
            graphs.append(GENERATION_FILE)
        counts = {INTEGER: sum(p.path == INTEGER for p in plans.values()),
                  NBITS: sum(p.path == NBITS for p in plans.values())}
        ops = {f: sorted({n.op_type for g in _all_graphs(m.graph) for n in g.node}) for f, m in models.items()}
        sizes = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        sizes["total"] = sum(sizes.values())
        sizes["weights"] = shared["data_bytes"]
        sizes["graphs"] = sum((gdir / f).stat().st_size for f in graphs)
        sizes["packed_file_bytes"] = (packed_manifest.get("footprint") or {}).get("packed_file_bytes")
        sizes["bound"] = (packed_manifest.get("footprint") or {}).get("bound")
        (tmp / EXPORT_FILE).write_text(json.dumps(
            {"wea": wea, "opset": OPSET, "plans": {k: v.__dict__ for k, v in plans.items()},
             "session_options": {"graph_optimization_level": "ORT_ENABLE_ALL", "use_lut_gemm": cfg.lut_gemm},
             "generation_graph": GENERATION_FILE if cfg.generation_graph == "beam" else None},
            indent=1) + "\n")
        write_manifest(tmp, "export", inputs={"packed": describe_source(src),
                                              "packed_manifest_files": packed_manifest.get("files")},
                       config=cfg, extra={"wea": wea, "paths": counts, "check": check, "ops": ops,
                                          "base3_tables": sorted(stored_base3),
                                          "shared_data": shared, "sizes": sizes,
                                          "faithful": "integer path: integer codes and scales exact, float "
                                                      "rescale rounding only" if not nbits else
                                                      f"MatMulNBits accuracy_level {cfg.accuracy_level}"})
    return ExportResult(out, wea, counts, check, sizes)
