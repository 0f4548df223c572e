"""The stage configs are the single source of every field's default and allowed values: each
CLI option that sets a config field has that field's default and exactly its allowed values.

(The CLI restates them because importing the configs pulls in torch, which ``dqtool --help``
must not load; this test is what keeps the two from drifting apart.)
"""

import dataclasses

import click
import pytest

from dqtool.cli import main
from dqtool.data.metrics import METRICS
from dqtool.data.pairs import TOO_LONG, DataConfig
from dqtool.formats.packed import FLOAT_DTYPES
from dqtool.model.layermap import SCHEMES
from dqtool.model.losses import LOGIT_LOSSES, LossConfig
from dqtool.model.packed import MATMULS as PACKED_MATMULS, STORAGES
from dqtool.qmath.quant import ACT_GRANULARITIES, GRANULARITIES, METHODS
from dqtool.qmath.onnx_ops import KERNEL_BITS_CHOICES
from dqtool.qmath.scheme import ACT_CLIPS, ENCODER_ACT_GRANULARITIES, QuantScheme
from dqtool.stages.bench.stage import BenchConfig
from dqtool.stages.convert import ConvertConfig
from dqtool.stages.distill import DistillConfig
from dqtool.stages.evaluate import PRESETS, EvalConfig
from dqtool.stages.export import (ACCURACY_LEVELS, DECODER_STEP_CHOICES, EXTERNAL_DATA_CHOICES,
                                  GENERATION_GRAPH_CHOICES, MATMUL_CHOICES, ExportConfig)
from dqtool.model.weight_cache import MODES as WEIGHT_CACHE_MODES
from dqtool.stages.qat import PRECISIONS, TARGETS, TEACHER_DTYPES, QATConfig

# command -> (the configs its options fill, in lookup order; option name -> field where they differ)
COMMANDS = {
    "distill": ((DistillConfig,), {}),
    "eval": ((EvalConfig, DataConfig), {}),
    "qat": ((QATConfig, QuantScheme, LossConfig),
            {"group_size": "weight_group_size", **{f"loss_{t}": t for t in LossConfig.TERMS}}),
    "convert": ((ConvertConfig,), {}),
    "export": ((ExportConfig,), {}),
    "bench": ((BenchConfig,), {}),
}
# Options that are not one config field with the same default, and why.
NOT_A_FIELD = {
    ("distill", "map_scheme"): None,  # checked below under its field name
    ("eval", "preset"): "chooses a PRESETS entry, which then sets several EvalConfig fields",
    ("eval", "num_beams"): "default None = the preset's", ("eval", "max_length"): "default None = the preset's",
    ("eval", "min_length"): "default None = the preset's", ("eval", "length_penalty"): "default None = the preset's",
    ("eval", "no_repeat_ngram_size"): "default None = the preset's",
    ("eval", "metrics"): "comma-separated text for the metrics tuple",
    ("eval", "out_path"): "an output path, not config", ("eval", "data"): "required",
    ("qat", "wea"): "parsed into w_bits/e_bits/a_bits", ("qat", "data"): "required",
    ("qat", "act_asymmetric"): "a flag for act_symmetric=False",
    ("qat", "no_attention_quant"): "a flag for quantize_attention=False",
    ("qat", "pos_bits"): "text e / none / bits, parsed into pos_bits (none = the field's None)",
    ("qat", "teacher"): "a stage argument, not config", ("qat", "resume"): "a stage argument",
    ("convert", "teacher"): "default None = the teacher the QAT manifest records (as the field)",
    ("export", "accuracy_level"): None,  # a Choice of strings for the int field: checked below
    ("bench", "batch_sizes"): "comma-separated text for the batch_sizes tuple",
    ("bench", "peers"): "comma-separated text for the peers tuple", ("bench", "no_plots"): "a flag for plots=False",
    ("bench", "out_dir"): "an output folder, not config",
    ("bench", "min_ratio"): "a gate", ("bench", "max_quality_drop"): "a gate", ("bench", "max_latency"): "a gate",
}
CHOICES = {
    ("distill", "map_scheme"): SCHEMES,
    ("eval", "preset"): tuple(PRESETS),
    ("eval", "matmul"): PACKED_MATMULS,
    ("qat", "weight_granularity"): GRANULARITIES,
    ("qat", "weight_method"): METHODS,
    ("qat", "act_clip"): ACT_CLIPS,
    ("qat", "act_granularity"): ACT_GRANULARITIES,
    ("qat", "encoder_act_granularity"): tuple(g for g in ENCODER_ACT_GRANULARITIES if g is not None),
    ("qat", "logits_kind"): LOGIT_LOSSES,
    ("qat", "precision"): PRECISIONS,
    ("qat", "targets"): TARGETS,
    ("qat", "teacher_dtype"): TEACHER_DTYPES,
    ("qat", "on_too_long"): TOO_LONG,
    ("convert", "float_dtype"): ("auto", *FLOAT_DTYPES),
    ("convert", "ternary_storage"): STORAGES,
    ("convert", "weight_cache"): WEIGHT_CACHE_MODES,
    ("export", "matmul"): MATMUL_CHOICES,
    ("export", "nbits_kernel"): KERNEL_BITS_CHOICES,
    ("export", "accuracy_level"): tuple(str(a) for a in ACCURACY_LEVELS),
    ("export", "external_data"): EXTERNAL_DATA_CHOICES,
    ("export", "generation_graph"): GENERATION_GRAPH_CHOICES,
    ("export", "decoder_step"): DECODER_STEP_CHOICES,
}


def _options(command: str):
    return [p for p in main.commands[command].params if isinstance(p, click.Option) and p.name not in ("force",)]


def _default(classes, field: str):
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name == field:
                if f.default is not dataclasses.MISSING:
                    return f.default
                return f.default_factory()
    raise AssertionError(f"no config field {field} in {[c.__name__ for c in classes]}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_defaults_are_the_config_defaults(command):
    classes, renames = COMMANDS[command]
    checked = 0
    for opt in _options(command):
        if (command, opt.name) in NOT_A_FIELD:
            continue
        want = _default(classes, renames.get(opt.name, opt.name))
        assert opt.default == want, f"dqtool {command} {opt.opts[0]} defaults to {opt.default!r}, the config to {want!r}"
        checked += 1
    assert checked >= 2


def test_cli_choices_are_the_domain_constants():
    found = {}
    for command in COMMANDS:
        for opt in _options(command):
            if isinstance(opt.type, click.Choice):
                found[(command, opt.name)] = tuple(opt.type.choices)
    assert set(found) == set(CHOICES), set(found) ^ set(CHOICES)
    for key, choices in CHOICES.items():
        assert tuple(found[key]) == tuple(choices), key
    # Choices that stand for a field check against the field's default too.
    assert main.commands["distill"].params and _default((DistillConfig,), "map_scheme") in CHOICES[("distill", "map_scheme")]
    assert str(_default((ExportConfig,), "accuracy_level")) == next(
        o.default for o in _options("export") if o.name == "accuracy_level")


def test_eval_metrics_option_names_real_metrics():
    opt = next(o for o in _options("eval") if o.name == "metrics")
    assert all(m in METRICS for m in opt.default.split(",")) and tuple(opt.default.split(",")) == \
        _default((EvalConfig,), "metrics")


def test_recipe_qat_keys_read_like_the_cli_flags():
    from dqtool.compress import LOSS_FIELDS, SCHEME_FIELDS

    # A recipe's loss / scheme keys are the qat command's flags in snake case, mapped to the same fields.
    for field, flag in LossConfig.FLAGS.items():
        assert LOSS_FIELDS[flag[2:].replace("-", "_")] == field
    qat_options = {o.name for o in _options("qat")}
    for key, field in SCHEME_FIELDS.items():
        # quantize_attention is the field itself; the CLI's flag is its negation --no-attention-quant.
        assert key in qat_options or (key == field == "quantize_attention" and "no_attention_quant" in qat_options)
        assert field in {f.name for f in dataclasses.fields(QuantScheme)}
