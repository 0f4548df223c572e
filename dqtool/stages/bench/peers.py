"""The peers dqtool is compared against: the usual ways to make the fp32 teacher (or the
layer-copied fp32 student) smaller or faster, built in the bench run from the same model.

    teacher / student folder --export, quantize, convert--> work_dir/<peer>/ --> bench.Target

===========================  ===========================================================
peer                         how it is made (details: each ``*_peer`` function)
===========================  ===========================================================
pytorch-int8-dynamic         ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear``
ort-fp32                     optimum's ONNX export, run by :class:`dqtool.runtimes.ort.OnnxSeq2Seq`
ort-int8-dynamic             ONNX Runtime ``quantize_dynamic`` (int8 weights) of ort-fp32
ort-int4-rtn                 ONNX Runtime ``MatMulNBitsQuantizer`` RTN, 4-bit, block 32
student-ort-int8-dynamic     ort-int8-dynamic of the layer-copied student
student-ort-int4-rtn         ort-int4-rtn of the layer-copied student
ctranslate2-int8             CTranslate2's converter at int8, run by ``Translator.translate_batch``
===========================  ===========================================================

Every ONNX peer is one folder in optimum's layout holding ``encoder_model.onnx`` and one
merged decoder ``decoder_model_merged.onnx`` (one copy of the decoder weights), like
dqtool's own export, so footprints compare like with like. The exporter also writes the
decoder as two graphs (``decoder_model.onnx`` + ``decoder_with_past_model.onnx``); they
are kept in the ``pair/`` subfolder of ``ort-fp32`` (not loaded, not counted), as the
RTN quantizer's input.

Each peer folder gets a ``peer.json`` stamp (recipe, tool version, source files' sizes
and times); a folder whose stamp matches is reused, so a re-run of bench (or two peers
sharing ``ort-fp32``) builds nothing twice. Folders are built under a temporary name and
renamed when complete: no half-built peer is ever reused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dqtool.base.errors import DQToolError
from dqtool.formats.onnx import DECODER_FILE, ENCODER_FILE, MERGED_FILE, WITH_PAST_FILE
from dqtool.runtimes.ctranslate2 import HF_DIR, load_ct2
from dqtool.stages.bench.target import Target, encoder_of, model_files

PEERS = ("pytorch-int8-dynamic", "ort-fp32", "ort-int8-dynamic", "ort-int4-rtn", "student-ort-int8-dynamic",
         "student-ort-int4-rtn", "ctranslate2-int8")
STAMP_FILE = "peer.json"
PAIR_DIR = "pair"                   # ort-fp32's decoder_model + decoder_with_past_model (RTN input)
TORCH_FILE = "model_int8.pt"
ORT_GRAPHS = (ENCODER_FILE, MERGED_FILE)  # what every ONNX peer loads
INT4_BLOCK, INT4_ACCURACY_LEVEL = 32, 4

_NEEDS_STUDENT = ("student-ort-int8-dynamic", "student-ort-int4-rtn")
_NEEDS_OPTIMUM = ("ort-fp32", "ort-int8-dynamic", "ort-int4-rtn") + _NEEDS_STUDENT


@dataclass(frozen=True)
class _Sources:
    teacher: Path
    student: Path | None
    work: Path
    threads: int
    log: Callable


def build_peers(names, teacher_dir, student_dir, work_dir, threads: int, log=print) -> list[Target]:
    """One :class:`dqtool.stages.bench.target.Target` (role ``peer``) per name in ``names``, in that order.

    Peers are built from the fp32 ``teacher_dir`` (``student-*`` peers from ``student_dir``,
    the layer-copied fp32 student) into ``work_dir``, or reused from there. Every name and
    requirement is checked before anything is built.

    Example (needs real folders, so not run as a doctest)::
        peers = build_peers(["ort-int8-dynamic", "ctranslate2-int8"], "runs/teacher", None,
                            "runs/bench/peers", threads=2)
        model, tok = peers[0].load()
        model.generate(**tok(["some text"], return_tensors="pt"), num_beams=4, max_length=62)
    """
    from dqtool.formats.hf import load_config

    names = tuple(names)
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise DQToolError(f"peer '{bad[0]}' is unknown: choose from {', '.join(PEERS)}")
    if teacher_dir is None:
        raise DQToolError("peers are built from the fp32 teacher: pass --teacher")
    load_config(teacher_dir)  # a missing or broken teacher fails here, before any build
    student_peers = [n for n in names if n in _NEEDS_STUDENT]
    if student_peers:
        if student_dir is None:
            raise DQToolError(f"peer '{student_peers[0]}' is built from the layer-copied fp32 student: pass "
                              f"--student (the student folder before QAT) or leave the student peers out")
        load_config(student_dir)
    for n in names:
        _check_requirements(n)
    src = _Sources(Path(teacher_dir), Path(student_dir) if student_dir is not None else None, Path(work_dir),
                   int(threads), log)
    src.work.mkdir(parents=True, exist_ok=True)
    targets = []
    for n in names:
        log(f"peers: {n}")
        targets.append(_BUILDERS[n](src))
    return targets


def _check_requirements(name: str) -> None:
    if name in _NEEDS_OPTIMUM:
        try:
            import optimum.exporters.onnx  # noqa: F401
        except ImportError as e:
            raise DQToolError(f"peer '{name}' needs optimum's ONNX exporter: pip install 'dqtool[export]'") from e
    if name == "ctranslate2-int8":
        try:
            import ctranslate2  # noqa: F401
        except ImportError as e:
            raise DQToolError(f"peer '{name}' needs CTranslate2: pip install ctranslate2") from e


# --------------------------------------------------------------------------- building blocks

def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return f"{package} ?"


def _source_id(folder: Path) -> dict:
    # Sizes and modification times of the source's files: a changed teacher means a rebuild.
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()}
    return {"path": str(folder.resolve()), "files": files}


@contextlib.contextmanager
def _quiet():
    """Silence third-party chatter while a peer is built: Python warnings, log records up to
    WARNING (errors still show) and stdout (the RTN quantizer prints a progress bar)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _build(name: str, folder: Path, stamp: dict, make: Callable[[Path], None], log) -> Path:
    """``folder``, made by ``make(tmp)`` in a temporary folder then renamed, or reused as it is
    when its ``peer.json`` equals ``stamp``.

    Example:
        >>> root = tmp  # an empty folder (conftest.py)
        >>> make = lambda out: (out / "w.bin").write_bytes(b"1")
        >>> _build("demo", root / "demo", {"recipe": "r"}, make, log=print).name
        'demo'
        >>> _ = _build("demo", root / "demo", {"recipe": "r"}, make, log=print)
        peers: demo: reusing .../demo
    """
    stamp = json.loads(json.dumps(stamp))  # tuples -> lists, as read back
    stamp_file = folder / STAMP_FILE
    if stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                log(f"peers: {name}: reusing {folder}")
                return folder
        except ValueError:
            pass  # unreadable stamp: rebuild
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _quiet():
            make(tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except DQToolError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # exporters and quantizers raise many types
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DQToolError(f"building peer {name} failed ({type(e).__name__}: {first}); leave it out of --peers "
                          f"or report it") from e
    return folder


def _copy_hf_files(src: Path, dst: Path) -> None:
    """config.json, generation_config.json and the tokenizer of HF folder ``src`` into ``dst``."""
    from transformers import AutoTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    try:
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    except Exception:
        pass  # no tokenizer: latency still runs; quality says what it needs


def _copy_side_files(src: Path, dst: Path) -> None:
    """Everything but graphs and the stamp (configs, tokenizer) from one ONNX folder to another."""
    graphs = set(model_files(src))
    for f in src.iterdir():
        if f.is_file() and f not in graphs and f.name != STAMP_FILE:
            shutil.copy2(f, dst / f.name)


def _external_data(path: Path) -> bool:
    """Whether an exported graph keeps its tensors in a separate file (graphs over 2 GB):
    optimum writes them next to it as ``<graph>_data`` (read without parsing the graph)."""
    return any(f != path and f.name.startswith(path.name) for f in path.parent.iterdir())


def _onnx_target(name: str, folder: Path, threads: int, notes: str) -> Target:
    def load():
        from dqtool.runtimes.ort import load_onnx

        return load_onnx(folder, threads=threads)

    return Target(name=name, role="peer", kind="onnx", files=model_files(folder), load=load, encode=encoder_of("onnx"),
                  path=str(folder), notes=notes)


# --------------------------------------------------------------------------- pytorch-int8-dynamic

def pytorch_int8_dynamic_peer(model_dir: Path, work: Path, threads: int, log=print) -> Target:
    """PyTorch dynamic quantization: ``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``.

    Every ``nn.Linear`` (attention, FFN, ``lm_head``) gets int8 weights (one scale per
    tensor, torch's default) and quantizes its input per batch at run time; embeddings,
    LayerNorms and biases stay fp32. The footprint is ``torch.save`` of the quantized
    state dict; ``load`` rebuilds the model from its config, quantizes it the same way and
    loads that file (strict), so every weight comes from it. Runs on ``torch.get_num_threads()``.

    Example (needs a real folder, so not run as a doctest)::
        target = pytorch_int8_dynamic_peer(Path("runs/teacher"), Path("runs/peers"), threads=2)
        model, tok = target.load()
    """
    name = "pytorch-int8-dynamic"
    notes = (f"torch.ao.quantization.quantize_dynamic(teacher, {{nn.Linear}}, dtype=torch.qint8) "
             f"({_version('torch')}): int8 per-tensor weights for every Linear incl. lm_head, activations "
             f"quantized per batch at run time; embeddings, LayerNorms, biases fp32; file = torch.save of "
             f"the quantized state dict")

    def make(tmp: Path):
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
        _quantize_linears(model)
        torch.save(model.state_dict(), tmp / TORCH_FILE)
        _copy_hf_files(model_dir, tmp)

    folder = _build(name, work / name, {"recipe": notes, "source": _source_id(model_dir)}, make, log)

    def load():
        return load_pytorch_int8(folder)

    return Target(name=name, role="peer", kind="pytorch-dynamic", files=[folder / TORCH_FILE], load=load,
                  encode=encoder_of("pytorch-dynamic"), path=str(folder), notes=notes)


def _quantize_linears(model) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (moving to torchao)
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def load_pytorch_int8(folder: str | os.PathLike):
    """``(model, tokenizer_or_None)`` of a ``pytorch-int8-dynamic`` folder.

    Example (needs a real folder, so not run as a doctest)::
        model, tok = load_pytorch_int8("runs/bench/peers/pytorch-int8-dynamic")
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    with torch.no_grad():
        model = AutoModelForSeq2SeqLM.from_config(config).eval()  # random weights, all replaced below
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    _quantize_linears(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's TypedStorage deprecation for quantized tensors
        state = torch.load(folder / TORCH_FILE, weights_only=True)
    model.load_state_dict(state, strict=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        tok = None
    return model, tok


# --------------------------------------------------------------------------- ort-fp32

def _ort_fp32_notes() -> str:
    return (f"optimum main_export(teacher, task='text2text-generation-with-past') ({_version('optimum-onnx')}, "
            f"{_version('optimum')}): fp32 encoder_model.onnx + decoder_model_merged.onnx, run by dqtool's "
            f"OnnxSeq2Seq on {_version('onnxruntime')} (all graph optimizations)")


def _ort_fp32_folder(model_dir: Path, work: Path, prefix: str, log) -> Path:
    """``work/<prefix>ort-fp32``: optimum's export of ``model_dir``, the decoder pair moved to ``pair/``."""
    name = f"{prefix}ort-fp32"

    def make(tmp: Path):
        from optimum.exporters.onnx import main_export

        main_export(str(model_dir), output=str(tmp), task="text2text-generation-with-past", device="cpu")
        if not (tmp / MERGED_FILE).is_file():
            raise DQToolError(f"optimum did not write {MERGED_FILE} for {model_dir}: peers need its merged decoder")
        (tmp / PAIR_DIR).mkdir()
        for graph in (DECODER_FILE, WITH_PAST_FILE):
            for f in tmp.glob(graph + "*"):  # the graph and its external data file, if any
                os.replace(f, tmp / PAIR_DIR / f.name)

    return _build(name, work / name, {"recipe": _ort_fp32_notes(), "source": _source_id(model_dir)}, make, log)


def ort_fp32_peer(model_dir: Path, work: Path, threads: int, prefix: str = "", log=print) -> Target:
    """optimum's export (``main_export(model_dir, output, task="text2text-generation-with-past")``)
    run by dqtool's :class:`~dqtool.runtimes.ort.OnnxSeq2Seq`.

    Example (needs a real folder, so not run as a doctest)::
        target = ort_fp32_peer(Path("runs/teacher"), Path("runs/peers"), threads=2)
    """
    folder = _ort_fp32_folder(model_dir, work, prefix, log)
    return _onnx_target(f"{prefix}ort-fp32", folder, threads, _ort_fp32_notes())


# --------------------------------------------------------------------------- ort-int8-dynamic

INT8_OPTIONS = dict(per_channel=True, reduce_range=False, extra_options={"EnableSubgraph": True})


def ort_int8_dynamic_peer(model_dir: Path, work: Path, threads: int, prefix: str = "", log=print) -> Target:
    """ONNX Runtime dynamic quantization of the ``ort-fp32`` graphs.

    ``quantize_dynamic(graph, out, weight_type=QuantType.QInt8, per_channel=True,
    reduce_range=False, extra_options={"EnableSubgraph": True})`` on the encoder and on the
    merged decoder (EnableSubgraph quantizes inside its If branches; the int8 weights are
    stored once, at the top level, and give the same tokens as quantizing the decoder pair).
    MatMul weights become int8, symmetric, one scale per output channel (per-channel:
    ONNX Runtime's recommended setting for transformers, closer to fp32 than one scale per
    tensor), run as MatMulInteger on activations quantized to uint8 per tensor at run time
    (fused to DynamicQuantizeMatMul when the session loads); Gather tables (the
    embeddings) become 8-bit too (ONNX Runtime's default op set). ``reduce_range=False``:
    full 8-bit weights (7-bit only helps CPUs without VNNI).

    Example (needs a real folder, so not run as a doctest)::
        target = ort_int8_dynamic_peer(Path("runs/teacher"), Path("runs/peers"), threads=2)
    """
    name = f"{prefix}ort-int8-dynamic"
    notes = (f"onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, per_channel=True, reduce_range=False, "
             f"EnableSubgraph=True) ({_version('onnxruntime')}) of {prefix}ort-fp32's encoder and merged decoder: "
             f"MatMul weights int8 symmetric per output channel (MatMulInteger / DynamicQuantizeMatMul, "
             f"activations uint8 per tensor at run time), embedding Gathers 8-bit; LayerNorm/softmax fp32")
    fp32 = _ort_fp32_folder(model_dir, work, prefix, log)

    def make(tmp: Path):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for graph in ORT_GRAPHS:
            quantize_dynamic(str(fp32 / graph), str(tmp / graph), weight_type=QuantType.QInt8,
                             use_external_data_format=_external_data(fp32 / graph), **INT8_OPTIONS)
        _copy_side_files(fp32, tmp)

    stamp = {"recipe": notes, "from": _ort_fp32_notes(), "source": _source_id(model_dir)}
    folder = _build(name, work / name, stamp, make, log)
    return _onnx_target(name, folder, threads, notes)


# --------------------------------------------------------------------------- ort-int4-rtn

def ort_int4_rtn_peer(model_dir: Path, work: Path, threads: int, prefix: str = "", log=print) -> Target:
    """ONNX Runtime's 4-bit weight-only round-to-nearest quantizer on the ``ort-fp32`` graphs.

    ``MatMulNBitsQuantizer(graph, block_size=32, is_symmetric=True, accuracy_level=4,
    algo_config=RTNWeightOnlyQuantConfig())``: every MatMul with a constant weight becomes
    MatMulNBits, 4-bit symmetric codes with one fp32 scale per block of 32 input rows,
    computed in int8 (accuracy level 4); embeddings, LayerNorms and the attention products
    stay fp32. The RTN path only sees a graph's top level (it fails on the merged decoder's
    If branches), so it quantizes the encoder and the decoder pair, and optimum's
    ``merge_decoders`` merges the two quantized decoders back into one graph (shared
    weights stored once), as optimum merges the fp32 pair.

    Example (needs a real folder, so not run as a doctest)::
        target = ort_int4_rtn_peer(Path("runs/teacher"), Path("runs/peers"), threads=2)
    """
    name = f"{prefix}ort-int4-rtn"
    notes = (f"onnxruntime MatMulNBitsQuantizer(block_size={INT4_BLOCK}, is_symmetric=True, "
             f"accuracy_level={INT4_ACCURACY_LEVEL}, algo_config=RTNWeightOnlyQuantConfig()) "
             f"({_version('onnxruntime')}) of {prefix}ort-fp32's encoder and decoder pair, the quantized pair "
             f"merged with optimum merge_decoders: MatMul weights 4-bit symmetric per block of {INT4_BLOCK} "
             f"(MatMulNBits, int8 compute); embeddings, LayerNorms fp32")
    fp32 = _ort_fp32_folder(model_dir, work, prefix, log)

    def make(tmp: Path):
        from optimum.onnx import merge_decoders

        rtn_int4(fp32 / ENCODER_FILE, tmp / ENCODER_FILE)
        pair = tmp / PAIR_DIR
        pair.mkdir()
        for graph in (DECODER_FILE, WITH_PAST_FILE):
            rtn_int4(fp32 / PAIR_DIR / graph, pair / graph)
        # strict=False: the first-step decoder also outputs the cross-attention cache.
        merge_decoders(pair / DECODER_FILE, pair / WITH_PAST_FILE, save_path=tmp / MERGED_FILE, strict=False)
        shutil.rmtree(pair)
        _copy_side_files(fp32, tmp)

    stamp = {"recipe": notes, "from": _ort_fp32_notes(), "source": _source_id(model_dir)}
    folder = _build(name, work / name, stamp, make, log)
    return _onnx_target(name, folder, threads, notes)


def _import_rtn():
    # Importing ORT's matmul_nbits_quantizer calls logging.basicConfig(level=INFO), which would
    # print every library's INFO records from then on: put the root logger back as it was.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

    root.setLevel(level)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    return MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig


def rtn_int4(src: Path, dst: Path) -> None:
    """4-bit RTN (block 32, symmetric, accuracy level 4) of the top-level MatMuls of one graph.

    Example (needs a real graph, so not run as a doctest)::
        rtn_int4(Path("ort-fp32/encoder_model.onnx"), Path("int4/encoder_model.onnx"))
    """
    import onnx

    quantizer_cls, rtn_config = _import_rtn()
    quantizer = quantizer_cls(str(src), block_size=INT4_BLOCK, is_symmetric=True,
                              accuracy_level=INT4_ACCURACY_LEVEL, algo_config=rtn_config())
    quantizer.process()
    model = quantizer.model.model
    # MatMulNBits is a com.microsoft op; the RTN path does not declare that domain, which
    # onnx.checker (run by merge_decoders) requires.
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(dst), save_as_external_data=_external_data(src))


# --------------------------------------------------------------------------- ctranslate2-int8

def ctranslate2_int8_peer(model_dir: Path, work: Path, threads: int, log=print, quantization: str = "int8",
                          name: str = "ctranslate2-int8") -> Target:
    """CTranslate2: ``TransformersConverter(model_dir).convert(folder, quantization="int8")``,
    run by :class:`~dqtool.runtimes.ctranslate2.CT2Seq2Seq` (``Translator.translate_batch``; ``intra_threads=threads``,
    ``inter_threads=1``, ``compute_type="default"``: the saved int8 weights).

    The folder holds CTranslate2's ``model.bin`` (the footprint), ``config.json`` and
    vocabulary, and the HF config, generation config and tokenizer in ``hf/``. There is no
    encoder-only entry point, so ``encode`` is None (bench counts the encoder in decoding).
    ``quantization`` / ``name`` exist for tests (``"float32"`` checks the wrapper exactly).

    Example (needs a real folder, so not run as a doctest)::
        target = ctranslate2_int8_peer(Path("runs/teacher"), Path("runs/peers"), threads=2)
    """
    notes = (f"ctranslate2.converters.TransformersConverter(teacher).convert(quantization='{quantization}') "
             f"({_version('ctranslate2')}), run with Translator(compute_type='default', intra_threads={threads}, "
             f"inter_threads=1).translate_batch: HF generate kwargs mapped to beam_size, max/min_decoding_length, "
             f"length_penalty, no_repeat_ngram_size; forced BOS as target prefix; CTranslate2's own beam search")

    def make(tmp: Path):
        ct2_convert(model_dir, tmp, quantization)
        _copy_hf_files(model_dir, tmp / HF_DIR)

    # The runtime settings (threads) are not part of the folder: stamp the conversion only.
    recipe = f"TransformersConverter.convert(quantization='{quantization}') ({_version('ctranslate2')})"
    folder = _build(name, work / name, {"recipe": recipe, "source": _source_id(model_dir)}, make, log)

    def load():
        return load_ct2(folder, threads)

    return Target(name=name, role="peer", kind="ctranslate2", files=[folder / "model.bin"], load=load, encode=None,
                  path=str(folder), notes=notes)


def ct2_convert(model_dir: Path, out: Path, quantization: str = "int8") -> None:
    """CTranslate2's Hugging Face converter, with two fixes for checkpoints saved by recent
    transformers (see ``_Converter``).

    Example (needs a real folder, so not run as a doctest)::
        ct2_convert(Path("runs/teacher"), Path("runs/ct2-int8"))
    """
    import ctranslate2

    class _Converter(ctranslate2.converters.TransformersConverter):
        _vocab_size = None

        def load_model(self, model_class, model_name_or_path, **kwargs):
            config = kwargs.get("config")
            # transformers' BartConfig no longer has normalize_before (BART is post-norm);
            # CTranslate2's BART loader reads it (hub checkpoints still carry it in config.json).
            if config is not None and config.model_type == "bart" and not hasattr(config, "normalize_before"):
                config.normalize_before = False
            self._vocab_size = getattr(config, "vocab_size", None)
            return super().load_model(model_class, model_name_or_path, **kwargs)

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            tok = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
            vocab = tok.get_vocab()
            if self._vocab_size and len(vocab) < self._vocab_size:
                # An embedding padded past the tokenizer (vocab_size > tokens): CTranslate2 needs
                # one token per row, so the unused rows get placeholder names.
                used = set(vocab.values())
                vocab = {**vocab, **{f"<dqtool_unused_{i}>": i for i in range(self._vocab_size) if i not in used}}
                tok.get_vocab = lambda: vocab
            return tok

    _Converter(str(model_dir)).convert(str(out), quantization=quantization, force=True)


# --------------------------------------------------------------------------- registry

_BUILDERS: dict[str, Callable[[_Sources], Target]] = {
    "pytorch-int8-dynamic": lambda s: pytorch_int8_dynamic_peer(s.teacher, s.work, s.threads, s.log),
    "ort-fp32": lambda s: ort_fp32_peer(s.teacher, s.work, s.threads, "", s.log),
    "ort-int8-dynamic": lambda s: ort_int8_dynamic_peer(s.teacher, s.work, s.threads, "", s.log),
    "ort-int4-rtn": lambda s: ort_int4_rtn_peer(s.teacher, s.work, s.threads, "", s.log),
    "student-ort-int8-dynamic": lambda s: ort_int8_dynamic_peer(s.student, s.work, s.threads, "student-", s.log),
    "student-ort-int4-rtn": lambda s: ort_int4_rtn_peer(s.student, s.work, s.threads, "student-", s.log),
    "ctranslate2-int8": lambda s: ctranslate2_int8_peer(s.teacher, s.work, s.threads, s.log),
}
