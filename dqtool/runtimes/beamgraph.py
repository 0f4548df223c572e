"""The whole generation as one ONNX graph: ONNX Runtime's ``com.microsoft.BeamSearch`` op
around an exported encoder and merged decoder (``dqtool export --generation-graph beam``).

    onnx/generation_model.onnx   main graph: the weights (external data, the folder's own
                                 weights file: stored once), the weight-unpacking nodes, and
                                 one BeamSearch node (model_type 1, encoder-decoder) with
      encoder subgraph           encoder + the decoder's first step (no cache):
                                 encoder_input_ids, encoder_attention_mask, decoder_input_ids
                                 -> logits, encoder_hidden_states, present_key_self_i,
                                 present_value_self_i, ..., present_key_cross_i, ...
      decoder subgraph           one decoder step with the cache: input_ids [B, 1],
                                 encoder_attention_mask, past_key_self_i, ..., past_key_cross_i
                                 -> logits, present_key_self_i, present_value_self_i, ...

Both subgraphs are built from the very graphs ``dqtool export`` wrote (the same quantized ops),
the decoder's two branches of its ``If`` node becoming the two subgraphs. Every initializer and
every node that only reads initializers (the in-graph unpacking of packed codes) moves to the
main graph, so each weight is in the file and in memory once, shared by both subgraphs.

Greedy search is BeamSearch with one beam (ONNX Runtime's GreedySearch op runs decoder-only
models only). The graph's inputs (``input_ids``, ``attention_mask`` int32 [B, S] and the scalars
``max_length``, ``min_length``, ``num_beams``, ``num_return_sequences``, ``length_penalty``,
``repetition_penalty``) default to the folder's generation config (initializers of the same
name); ``sequences`` int32 [B, num_return_sequences, max_length] is the output.

What the op does not do, and :func:`unsupported` refuses rather than ignore:

* ``forced_bos_token_id``; ``forced_eos_token_id`` other than the one ``eos_token_id`` (equal to
  it, it is run as ``max_length - 1``: a hypothesis that reaches it ends with EOS, as Hugging
  Face's forced EOS does); several EOS ids; ``early_stopping="never"``;
* ``repetition_penalty`` (the op penalizes log-probabilities where Hugging Face's greedy search
  penalizes logits, and its beam search gave other tokens on a test input); ``bad_words_ids``;
  ``no_repeat_ngram_size`` and ``early_stopping`` other than the graph's (op attributes, fixed at
  export from the generation config); sampling and the settings
  :mod:`dqtool.runtimes.genconfig` refuses for every runtime.

The op leaves the final EOS out of a finished sequence and pads after it; :class:`GenerationGraph`
puts the EOS back (``generate`` returns Hugging Face's tokens), :func:`expected_sequences` maps
Hugging Face-style tokens to the op's layout for an exact comparison.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dqtool.base.errors import DQToolError
from dqtool.formats.onnx import ENCODER_FILE, GENERATION_FILE, MERGED_FILE, graph_folder
from dqtool.runtimes.genconfig import as_list, resolve_generation_config

MS_DOMAIN = "com.microsoft"
SCALAR_INPUTS = ("max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty",
                 "repetition_penalty")


# ---------------------------------------------------------------------- generation config

MIN_OP_LENGTH = 3   # the shortest max_length onnxruntime's BeamSearch op runs for encoder-decoder models


def unsupported(gc) -> str | None:
    """Why the BeamSearch op cannot run the resolved generation config ``gc`` exactly (one line), or None.

    Example:
        >>> from transformers import GenerationConfig
        >>> gc = GenerationConfig(decoder_start_token_id=2, eos_token_id=2, pad_token_id=1, forced_bos_token_id=0)
        >>> unsupported(gc)
        'forced_bos_token_id 0 is not supported by the BeamSearch generation graph: unset it (generation_config.json)'
        >>> unsupported(GenerationConfig(decoder_start_token_id=2, eos_token_id=2, forced_eos_token_id=2, max_length=3))
        "max_length 3 (the decoder start token and 2 new tokens) is too short for the BeamSearch generation graph (ONNX Runtime's op needs 1 more): ask for at least 3 new tokens or use the ONNX decoder runtime"
    """
    eos = as_list(gc.eos_token_id)
    where = "(generation_config.json)"
    if gc.forced_bos_token_id is not None:
        return f"forced_bos_token_id {gc.forced_bos_token_id} is not supported by the BeamSearch generation graph: " \
               f"unset it {where}"
    if len(eos) > 1:
        return f"several eos_token_id {eos} are not supported by the BeamSearch generation graph (one id): keep one {where}"
    if gc.forced_eos_token_id is not None and as_list(gc.forced_eos_token_id) != eos:
        return f"forced_eos_token_id {gc.forced_eos_token_id} other than eos_token_id {eos} is not supported by the " \
               f"BeamSearch generation graph: unset it {where}"
    if gc.early_stopping == "never":
        return f"early_stopping 'never' is not supported by the BeamSearch generation graph: choose true or false {where}"
    if gc.repetition_penalty not in (None, 1.0):
        return f"repetition_penalty {gc.repetition_penalty} is not supported by the BeamSearch generation graph (the " \
               f"op's tokens differ from Hugging Face's with it): unset it {where}"
    if gc.bad_words_ids:
        return f"bad_words_ids are not supported by the BeamSearch generation graph: unset them {where}"
    if gc.max_length > np.iinfo(np.int32).max:
        return f"max_length {gc.max_length} is too large"
    op_length = int(scalar_feeds(gc)["max_length"][0])
    if op_length < MIN_OP_LENGTH:
        # onnxruntime 1.32's BeamSearch fails below (max_length 1: a length error; 2: the
        # encoder-decoder init step reads out of bounds) instead of returning the short sequence.
        more = MIN_OP_LENGTH - op_length
        return f"max_length {gc.max_length} (the decoder start token and {gc.max_length - 1} new tokens) is too short " \
               f"for the BeamSearch generation graph (ONNX Runtime's op needs {more} more): ask for at least " \
               f"{gc.max_length - 1 + more} new tokens or use the ONNX decoder runtime"
    return None


def op_early_stopping(gc) -> int:
    """The op's ``early_stopping`` for ``gc``: 1 for greedy search (one beam: the op then stops a
    row at its first EOS, as Hugging Face's greedy search does) or ``early_stopping=True``."""
    return 1 if gc.num_beams == 1 or gc.early_stopping is True else 0


def fixed_attributes(gc) -> dict[str, int]:
    """The op attributes the graph fixes at export for the resolved config ``gc``."""
    eos = as_list(gc.eos_token_id)
    return {"eos_token_id": eos[0] if eos else -1,
            "pad_token_id": int(gc.pad_token_id if gc.pad_token_id is not None else -1),
            "decoder_start_token_id": int(gc.decoder_start_token_id),
            "no_repeat_ngram_size": int(gc.no_repeat_ngram_size or 0)}


def scalar_feeds(gc) -> dict[str, np.ndarray]:
    """The op's scalar inputs for the resolved generation config ``gc`` (see :func:`unsupported`)."""
    forced_eos = gc.forced_eos_token_id is not None and as_list(gc.eos_token_id)
    return {
        "max_length": np.array([int(gc.max_length) - (1 if forced_eos else 0)], dtype=np.int32),
        "min_length": np.array([int(gc.min_length or 0)], dtype=np.int32),
        "num_beams": np.array([int(gc.num_beams)], dtype=np.int32),
        "num_return_sequences": np.array([int(gc.num_return_sequences or 1)], dtype=np.int32),
        "length_penalty": np.array([float(gc.length_penalty if gc.length_penalty is not None else 1.0)],
                                   dtype=np.float32),
        "repetition_penalty": np.array([float(gc.repetition_penalty or 1.0)], dtype=np.float32),
    }


def expected_sequences(tokens: np.ndarray, gc) -> np.ndarray:
    """Hugging Face-style sequences ``tokens`` [N, T] (start token first, EOS, padded) in the op's
    layout: EOS and what follows replaced by padding, width the op's ``max_length``."""
    eos = as_list(gc.eos_token_id)
    width = int(scalar_feeds(gc)["max_length"][0])
    out = np.full((tokens.shape[0], width), gc.pad_token_id, dtype=np.int64)
    for r, row in enumerate(tokens.tolist()):
        end = len(row)
        for i in range(1, len(row)):
            if eos and row[i] == eos[0]:
                end = i
                break
        out[r, :min(end, width)] = row[:min(end, width)]
    return out


# ---------------------------------------------------------------------- building the graph

def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def build_generation_graph(gdir: Path, generation_config, hidden: int, out_file: str = GENERATION_FILE,
                           heads: int | None = None, head_dim: int | None = None, vocab: int | None = None,
                           step=None) -> Path:
    """Write ``gdir/out_file``: the BeamSearch graph around ``gdir``'s encoder and merged decoder.

    ``generation_config``: the resolved config (its token ids become the op's attributes; the
    lengths and penalties are inputs, see :func:`scalar_feeds`);
    ``hidden``: the encoder's output width. The weights stay in the external data files the two
    graphs reference (nothing is copied). ``step``: an ONNX model of the cached decoder step with
    the decoder subgraph's inputs and outputs (:mod:`dqtool.model.decoder_step`, initializers named
    as the two graphs') that replaces the merged decoder's cached branch; nodes that compute the
    same value from the weights (both graphs' weight unpacking) are merged, so each weight is still
    held once. Returns the path written.
    """
    import onnx
    from onnx import TensorProto, helper

    enc = onnx.load(str(gdir / ENCODER_FILE), load_external_data=False)
    dec = onnx.load(str(gdir / MERGED_FILE), load_external_data=False)
    why = unsupported(generation_config)
    if why:
        raise DQToolError(why)
    ifs = [n for n in dec.graph.node if n.op_type == "If"]
    if len(ifs) != 1 or ifs[0] is not dec.graph.node[-1]:
        raise DQToolError(f"{MERGED_FILE} is not a merged decoder with one final If node; re-export the folder")
    branches = {a.name: a.g for a in ifs[0].attribute}
    first_g, past_g = branches["else_branch"], branches["then_branch"]  # use_cache_branch False / True
    if_out = list(ifs[0].output)

    inits = {}
    for m in (enc, dec):
        for init in m.graph.initializer:
            inits.setdefault(init.name, init)
    keep = set(inits)

    # Values that depend on initializers only (weight unpacking, constants): hoisted to the main graph.
    hoisted = []

    def split_constant(nodes, prefix, const: set):
        rest = []
        for n in nodes:
            has_sub = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
            if not has_sub and all((not x) or x in const for x in n.input):
                hoisted.append(n)
                const.update(n.output)
            else:
                rest.append(n)
        return rest

    def rename_all(nodes, mapping, prefix):
        def name(x):
            if not x or x in keep:
                return x
            return mapping.get(x, prefix + x)
        for n in nodes:
            n.name = ""  # node names repeat between the graphs (optimum's "/Add")
            for i, x in enumerate(n.input):
                n.input[i] = name(x)
            for i, x in enumerate(n.output):
                n.output[i] = name(x)
            for a in n.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sg in subs:
                    rename_all(sg.node, mapping, prefix)
                    for v in (*sg.input, *sg.output):
                        v.name = name(v.name)
        return name

    # -- encoder: its graph inputs fed from the subgraph's int32 inputs (Cast to int64)
    e_in = {i.name: i for i in enc.graph.input}
    e_map = {"input_ids": "ids64", "attention_mask": "mask64"}
    e_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in enc.graph.node]
    e_name = rename_all(e_nodes, e_map, "e.")
    e_out = e_name(enc.graph.output[0].name)
    const = set(keep)
    e_nodes = split_constant(e_nodes, "e.", const)

    # -- decoder: the pre-If nodes (weight unpacking) hoisted, the two branches the two steps
    d_pre = [onnx.NodeProto.FromString(n.SerializeToString()) for n in dec.graph.node[:-1]]
    d_first = [onnx.NodeProto.FromString(n.SerializeToString()) for n in first_g.node]
    d_past = [onnx.NodeProto.FromString(n.SerializeToString()) for n in past_g.node]
    layers = sorted({int(x.split(".")[1]) for x in if_out if x.startswith("present.")})
    past_map = {}
    for i in layers:
        for kind, tag in (("decoder", "self"), ("encoder", "cross")):
            for kv in ("key", "value"):
                past_map[f"past_key_values.{i}.{kind}.{kv}"] = f"past_{kv}_{tag}_{i}"
    d_map_first = {"input_ids": "dec_ids64", "encoder_attention_mask": "mask64", "encoder_hidden_states": e_out}
    d_map_past = {"input_ids": "ids64", "encoder_attention_mask": "mask64", **past_map}
    # The pre-If nodes read initializers only (no graph inputs): their values keep one name ("d.")
    # both steps read; each branch's own values get the branch's prefix (the two branches of
    # optimum's merged decoder reuse value names).
    pre_map = {o: "d." + o for n in d_pre for o in n.output if o}
    rename_all(d_pre, {}, "d.")
    for n in d_pre:
        if any(x and x not in keep and not x.startswith("d.") for x in n.input):
            raise DQToolError(f"{MERGED_FILE}: a node before the If reads a graph input; re-export the folder")
    const_d = set(keep) | {o for n in d_pre for o in n.output}
    d_pre_rest = split_constant(d_pre, "d.", const_d)
    if d_pre_rest:
        raise DQToolError(f"{MERGED_FILE}: nodes before the If depend on the inputs; re-export the folder")
    d_map_first.update(pre_map)
    d_map_past.update(pre_map)
    first_name = rename_all(d_first, d_map_first, "d0.")
    first_outs = [first_name(v.name) for v in first_g.output]
    d_first = split_constant(d_first, "d0.", const_d | const)
    if step is None:   # the merged decoder's cached branch
        past_name = rename_all(d_past, d_map_past, "d1.")
        past_outs = [past_name(v.name) for v in past_g.output]
        d_past = split_constant(d_past, "d1.", const_d | const)
    else:
        for init in step.graph.initializer:
            inits.setdefault(init.name, init)
        keep.update(init.name for init in step.graph.initializer)
        io = {v.name: v.name for v in (*step.graph.input, *step.graph.output)}
        d_past = [onnx.NodeProto.FromString(n.SerializeToString()) for n in step.graph.node]
        rename_all(d_past, io, "s.")
        d_past = split_constant(d_past, "s.", const_d | const | set(keep))
    merged = _merge_same(hoisted)
    for n in (*e_nodes, *d_first, *d_past):
        for i, x in enumerate(n.input):
            if x in merged:
                n.input[i] = merged[x]
    for n in d_past:
        if "encoder_hidden_states" in n.input or e_out in n.input:
            raise DQToolError(f"{MERGED_FILE}: the cached decoder step reads encoder_hidden_states; not supported")

    # -- shapes ORT reads from the subgraph outputs: heads and head size (numeric), vocabulary
    dec_out = {v.name: v for v in dec.graph.output}
    # from the graph where its shapes are fixed, else the model config's (passed in)
    logits_dims = _dims(dec_out["logits"])
    kdims = _dims(dec_out[f"present.{layers[0]}.decoder.key"])
    vocab = logits_dims[-1] if isinstance(logits_dims[-1], int) and logits_dims[-1] > 0 else vocab
    heads = kdims[1] if isinstance(kdims[1], int) and kdims[1] > 0 else heads
    head_dim = kdims[3] if isinstance(kdims[3], int) and kdims[3] > 0 else head_dim
    if not all(isinstance(x, int) and x > 0 for x in (vocab, heads, head_dim)):
        raise DQToolError(f"{MERGED_FILE}: vocabulary, heads or head size not fixed in the graph; re-export the folder")
    F, I32 = TensorProto.FLOAT, TensorProto.INT32

    def vi(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    # encoder subgraph
    idx = {name: k for k, name in enumerate(if_out)}
    enc_nodes = [helper.make_node("Cast", ["encoder_input_ids"], ["ids64"], to=TensorProto.INT64),
                 helper.make_node("Cast", ["encoder_attention_mask"], ["mask64"], to=TensorProto.INT64),
                 helper.make_node("Cast", ["decoder_input_ids"], ["dec_ids64"], to=TensorProto.INT64)]
    enc_nodes += e_nodes + d_first
    outs = [vi("logits", F, ["B", "T", vocab]), vi("encoder_hidden_states", F, ["B", "S", hidden])]
    enc_nodes += [helper.make_node("Identity", [first_outs[idx["logits"]]], ["logits"]),
                  helper.make_node("Identity", [e_out], ["encoder_hidden_states"])]
    for tag, kind, length in (("self", "decoder", "T"), ("cross", "encoder", "S")):
        for i in layers:
            for kv in ("key", "value"):
                name = f"present_{kv}_{tag}_{i}"
                enc_nodes.append(helper.make_node("Identity", [first_outs[idx[f"present.{i}.{kind}.{kv}"]]], [name]))
                outs.append(vi(name, F, ["B", heads, length, head_dim]))
    enc_graph = helper.make_graph(
        enc_nodes, "encoder and decoder init",
        [vi("encoder_input_ids", I32, ["B", "S"]), vi("encoder_attention_mask", I32, ["B", "S"]),
         vi("decoder_input_ids", I32, ["B", 1])], outs)

    # decoder subgraph
    if step is None:
        dec_nodes = [helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64),
                     helper.make_node("Cast", ["encoder_attention_mask"], ["mask64"], to=TensorProto.INT64)] + d_past
    else:
        dec_nodes = d_past   # its inputs and outputs are the subgraph's
    ins = [vi("input_ids", I32, ["B", 1]), vi("encoder_attention_mask", I32, ["B", "S"])]
    for tag, length in (("self", "P"), ("cross", "S")):
        for i in layers:
            for kv in ("key", "value"):
                ins.append(vi(f"past_{kv}_{tag}_{i}", F, ["B", heads, length, head_dim]))
    outs = [vi("logits", F, ["B", 1, vocab])]
    if step is None:
        dec_nodes.append(helper.make_node("Identity", [past_outs[idx["logits"]]], ["logits"]))
    for i in layers:
        for kv in ("key", "value"):
            name = f"present_{kv}_self_{i}"
            if step is None:
                dec_nodes.append(helper.make_node("Identity", [past_outs[idx[f"present.{i}.decoder.{kv}"]]], [name]))
            outs.append(vi(name, F, ["B", heads, "P1", head_dim]))
    if step is not None:
        want = [v.name for v in (*ins, *outs)]
        have = [v.name for v in (*step.graph.input, *step.graph.output)]
        if have != want:
            raise DQToolError(f"the decoder step graph's inputs/outputs {have} are not the BeamSearch decoder's {want}")
    dec_graph = helper.make_graph(dec_nodes, "decoder with past", ins, outs)

    gc = generation_config
    feeds = scalar_feeds(gc)
    enc_graph, dec_graph = _prune(enc_graph), _prune(dec_graph)
    used = _outer_refs(enc_graph) | _outer_refs(dec_graph)
    hoisted = _prune_nodes(hoisted, used)
    used |= {x for n in hoisted for x in n.input}
    node = helper.make_node(
        "BeamSearch", ["input_ids", *SCALAR_INPUTS, "", "", "attention_mask"], ["sequences"], domain=MS_DOMAIN,
        **fixed_attributes(gc), early_stopping=op_early_stopping(gc), model_type=1, vocab_size=int(vocab),
        encoder=enc_graph, decoder=dec_graph)
    graph = helper.make_graph(
        hoisted + [node], "dqtool generation (BeamSearch)",
        [vi("input_ids", I32, ["batch_size", "sequence_length"]),
         *[vi(k, F if v.dtype == np.float32 else I32, [1]) for k, v in feeds.items()],
         vi("attention_mask", I32, ["batch_size", "sequence_length"])],
        [vi("sequences", I32, ["batch_size", "num_return_sequences", "max_length"])],
        [i for name, i in inits.items() if name in used])
    opsets = {o.domain: o.version for m in (enc, dec) for o in m.opset_import}
    opsets.setdefault(MS_DOMAIN, 1)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="dqtool")
    model.ir_version = max(enc.ir_version, dec.ir_version)
    path = gdir / out_file
    onnx.save_model(model, str(path))
    return path


def _merge_same(nodes) -> dict[str, str]:
    """Drop from ``nodes`` (in place; topological order) each node that repeats an earlier one (same
    op, same inputs after merging, same attributes; tensor names ignored) and return ``{dropped
    output: the kept node's output}``, also applied to the kept nodes' inputs."""
    import onnx

    def attr_key(a):
        if a.type == onnx.AttributeProto.TENSOR and a.t.name:
            a = onnx.AttributeProto.FromString(a.SerializeToString())
            a.t.name = ""
        return a.SerializeToString(deterministic=True)

    seen, mapping, kept = {}, {}, []
    for n in nodes:
        for i, x in enumerate(n.input):
            if x in mapping:
                n.input[i] = mapping[x]
        key = (n.domain, n.op_type, tuple(n.input), len(n.output), tuple(attr_key(a) for a in n.attribute))
        first = seen.get(key)
        if first is None:
            seen[key] = n
            kept.append(n)
        else:
            mapping.update({o: f for o, f in zip(n.output, first.output) if o})
    nodes[:] = kept
    return mapping


def _prune_nodes(nodes, needed: set) -> list:
    """``nodes`` without those whose outputs nothing in ``needed`` (transitively) reads, in order."""
    needed = set(needed)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(x for x in n.input if x)
            needed.update(_outer_refs_of_node(n))
    return keep[::-1]


def _outer_refs_of_node(node) -> set:
    import onnx

    refs = set()
    for a in node.attribute:
        for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            refs |= _outer_refs(sg)
    return refs


def _outer_refs(graph) -> set:
    """Names ``graph`` (and its subgraphs) read but does not define: values of the outer scope."""
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    refs = set()
    for n in graph.node:
        refs.update(x for x in n.input if x and x not in defined)
        refs.update(r for r in _outer_refs_of_node(n) if r not in defined)
        defined.update(n.output)
    return refs - defined


def _prune(graph):
    """``graph`` with the nodes its outputs do not need dropped."""
    from onnx import helper

    nodes = _prune_nodes(list(graph.node), {v.name for v in graph.output})
    return helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output), list(graph.initializer))


# ---------------------------------------------------------------------- running it

KIND = "onnx-beam"  # the kind name eval/bench give a generation graph


def is_generation_graph(source: str | os.PathLike) -> bool:
    """True when ``source`` is a generation graph file (``.../onnx/generation_model.onnx``).

    Example:
        >>> is_generation_graph("runs/onnx-2-2-8")
        False
    """
    p = Path(source)
    return p.name == GENERATION_FILE and p.is_file()


def model_root(source: str | os.PathLike) -> Path:
    """The model folder (config, tokenizer, manifest) of a generation graph file."""
    p = Path(source).parent
    return p.parent if p.name == "onnx" and (p.parent / "config.json").is_file() else p


def load_generation_graph(source: str | os.PathLike, threads: int | None = None):
    """``(GenerationGraph, tokenizer_or_None)`` of a generation graph file, its folder checked
    against its manifest first (as every loader does)."""
    from dqtool.formats import onnx as onnx_format

    root = model_root(source)
    onnx_format.verify(root)
    model = GenerationGraph.from_folder(root, threads=threads)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError, TypeError):
        tok = None
    return model, tok

class GenerationGraph:
    """A folder's ``generation_model.onnx`` run with ONNX Runtime, used like a Hugging Face model:
    ``generate`` returns Hugging Face's tokens (start token first, EOS, padding), one ORT call.

    Example (needs an exported folder, so not run as a doctest)::
        model = GenerationGraph.from_folder("runs/onnx-2-2-8", threads=2)
        model.generate(input_ids=ids, attention_mask=mask, num_beams=4)
    """

    main_input_name = "input_ids"

    def __init__(self, folder: Path, session, config, generation_config, attributes: dict):
        import torch

        self.folder, self.session = folder, session
        self.config, self.generation_config = config, generation_config
        self.attributes = attributes  # the BeamSearch node's token ids, n-gram size, early_stopping
        self.device = torch.device("cpu")
        self.threads: int | None = None
        self.last_steps: int | None = None   # cached decoder steps of the last run (bench's per-token time)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, threads: int | None = None) -> "GenerationGraph":
        import onnxruntime as ort
        from transformers import AutoConfig, GenerationConfig

        from dqtool.runtimes.ort import lut_gemm_of, session_options

        root = Path(path)
        p = graph_folder(root)
        f = p / GENERATION_FILE
        if not f.is_file():
            raise DQToolError(f"{root} has no {GENERATION_FILE}: export it with --generation-graph beam")
        try:
            so = session_options(threads, lut_gemm=lut_gemm_of(root))
            # ORT warns, for every value the subgraphs read from the main graph, that its
            # optimizer leaves that name alone: noise, not a fault.
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise DQToolError(f"ONNX Runtime cannot load {f} ({' '.join(lines)[:300]}): re-export the folder") from e
        attributes = read_attributes(f)
        config = AutoConfig.from_pretrained(str(root))
        gen = GenerationConfig.from_pretrained(str(root)) if (root / "generation_config.json").is_file() \
            else GenerationConfig.from_model_config(config)
        model = cls(root, sess, config, gen, attributes)
        model.threads = threads
        return model

    # The op's first call (the encoder and the first decoder step) cannot be run alone in the graph's
    # own session, and a second ONNX Runtime session in the same process is no stand-in: on 2 vCPUs
    # two sessions' thread pools slow each other down for as long as both live (BART-base 6-3: the
    # encoder subgraph 24 ms alone, 43-50 ms and the generation 103-131 ms instead of 62-66 beside a
    # spinning second session; with a non-spinning one 37 ms). So bench times the graph's encoder as a
    # generation of :data:`MIN_OP_LENGTH` - 1 tokens in the graph's own session (the first call and
    # ``encode_steps`` cached steps) and divides the rest of a generation by the cached steps it ran
    # beyond those (``last_steps - encode_steps``): the marginal cost of a generated token.
    encode_steps = MIN_OP_LENGTH - 2

    def encode(self, input_ids, attention_mask=None) -> None:
        """Run the first call and :attr:`encode_steps` cached decoder steps (greedy, exactly that many
        tokens) in the graph's own session: what bench times as a generation graph's encoder."""
        ids = np.asarray(input_ids.detach().cpu().numpy() if hasattr(input_ids, "detach") else input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(
            attention_mask.detach().cpu().numpy() if hasattr(attention_mask, "detach") else attention_mask, np.int32)
        feed = {"input_ids": ids, "attention_mask": mask, **scalar_feeds(self.generation_config)}
        n = np.array([MIN_OP_LENGTH], dtype=np.int32)
        feed.update(max_length=n, min_length=n, num_beams=np.array([1], dtype=np.int32),
                    num_return_sequences=np.array([1], dtype=np.int32))
        self._run_feed(feed)   # batched or row by row as generate runs

    def to(self, device="cpu"):
        import torch

        if not isinstance(device, torch.dtype) and torch.device(device).type != "cpu":
            raise DQToolError(f"the ONNX runtime runs on the CPU, not on {device}: pass --device cpu")
        return self

    def eval(self):
        return self

    def __repr__(self) -> str:
        return f"GenerationGraph({str(self.folder)!r})"

    def check(self, gc) -> None:
        """Raise ``ValueError`` (one line) when the graph cannot run the resolved config ``gc`` exactly."""
        why = unsupported(gc)
        if why:
            raise ValueError(why)
        fixed = fixed_attributes(gc)
        diff = {k: v for k, v in fixed.items() if self.attributes.get(k) != v}
        if diff:
            k = sorted(diff)[0]
            raise ValueError(f"{k} {diff[k]} differs from the generation graph's ({self.attributes.get(k)}), fixed at "
                             f"export: re-export with it in generation_config.json or use the ONNX decoder runtime")
        if gc.num_beams > 1 and op_early_stopping(gc) != self.attributes.get("early_stopping"):
            raise ValueError(f"early_stopping {gc.early_stopping} differs from the generation graph's (fixed at "
                             f"export): re-export with it in generation_config.json")

    def run(self, ids: np.ndarray, mask: np.ndarray, gc) -> np.ndarray:
        """The op's raw ``sequences`` [B, num_return_sequences, L] for int arrays ``ids`` / ``mask`` [B, S].

        When the op's ``early_stopping`` is 0 its done-test reads another row's scores at batch > 1
        (onnxruntime 1.32's BeamSearchScorer indexes the candidates by ``batch * num_beams``), so rows
        then run one at a time: exact, slower."""
        self.check(gc)
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int32),
                "attention_mask": np.ascontiguousarray(mask, dtype=np.int32), **scalar_feeds(gc)}
        # cached decoder steps the op runs at most (the encoder subgraph gives the first token)
        self.last_steps = int(feed["max_length"][0]) - 2
        return self._run_feed(feed)

    def _run_feed(self, feed: dict) -> np.ndarray:
        ids = feed["input_ids"]
        if ids.shape[0] == 1 or self.attributes.get("early_stopping") == 1:
            return self.session.run(["sequences"], feed)[0]
        outs = []
        for r in range(ids.shape[0]):
            one = dict(feed, input_ids=feed["input_ids"][r:r + 1], attention_mask=feed["attention_mask"][r:r + 1])
            outs.append(self.session.run(["sequences"], one)[0])
        width = max(o.shape[-1] for o in outs)
        pad = self.attributes.get("pad_token_id", 0)
        return np.concatenate([np.pad(o, ((0, 0), (0, 0), (0, width - o.shape[-1])), constant_values=pad)
                               for o in outs])

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """``torch.LongTensor [B * num_return_sequences, T]`` as Hugging Face's ``generate`` returns
        (the EOS the op leaves out put back, trailing padding columns dropped)."""
        import torch

        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids [batch, source_length]")
        gc = resolve_generation_config(self, generation_config, kwargs)
        ids = np.asarray(input_ids.detach().cpu().numpy() if hasattr(input_ids, "detach") else input_ids)
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = np.asarray(attention_mask.detach().cpu().numpy() if hasattr(attention_mask, "detach")
                              else attention_mask)
        seqs = self.run(ids, mask, gc).astype(np.int64)
        return torch.from_numpy(restore_eos(seqs.reshape(-1, seqs.shape[-1]), gc))


def read_attributes(path: Path) -> dict:
    """The int attributes of the BeamSearch node of the generation graph at ``path``."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "BeamSearch":
            return {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
    raise DQToolError(f"{path} has no BeamSearch node: re-export the folder with --generation-graph beam")


def restore_eos(seqs: np.ndarray, gc) -> np.ndarray:
    """The op's sequences [N, L] (EOS left out, padded) back to Hugging Face's layout: EOS after the
    last non-pad token of a row shorter than ``gc.max_length``, padding after it, width trimmed to
    the longest row. (A row whose last real tokens are the pad id itself reads as shorter; with
    ``skip_special_tokens`` decoding that changes no text.)"""
    eos = as_list(gc.eos_token_id)
    pad = gc.pad_token_id
    n, width = seqs.shape
    out = np.full((n, int(gc.max_length)), pad if pad is not None else 0, dtype=np.int64)
    longest = 1
    for r in range(n):
        row = seqs[r]
        end = width
        if pad is not None:
            while end > 1 and row[end - 1] == pad:
                end -= 1
        out[r, :end] = row[:end]
        if eos and end < gc.max_length:
            out[r, end] = eos[0]
            end += 1
        longest = max(longest, end)
    return out[:, :longest]
