"""Stage 1, ``distill``: initialise a shallower student by copying teacher layers.

    teacher (hub id or folder) --copy embeddings, norms, chosen layers--> student folder

The student config is the teacher's with fewer encoder/decoder layers. Every student
parameter and buffer is copied from the teacher: a student layer ``i`` of a stack
takes the teacher layer ``map[i]`` of that stack, everything outside the layer stacks
(embeddings, positions, final norms, lm_head, biases) is copied as is. Nothing stays
randomly initialised, which the stage checks before saving.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError
from dqtool.model.layermap import SCHEMES, check_map, default_map
from dqtool.formats.hf import describe_source, load_config, load_seq2seq
from dqtool.formats.manifest import atomic_output, check_output, write_manifest
from dqtool.model.registry import ArchSpec, num_layers, spec_for
from dqtool.base.fsutil import locked


@dataclass(frozen=True)
class DistillConfig:
    """How to shrink the teacher. ``None`` depths keep the teacher's depth.

    Example:
        >>> DistillConfig(encoder_layers=6, decoder_layers=3).map_scheme
        'sft'
        >>> DistillConfig(encoder_layers=0)
        Traceback (most recent call last):
        ...
        dqtool.base.config_error.ConfigError: --encoder-layers must be at least 1, got 0
    """

    encoder_layers: int | None = None
    decoder_layers: int | None = None
    encoder_map: tuple[int, ...] | None = None  # explicit teacher layers, overrides the scheme
    decoder_map: tuple[int, ...] | None = None
    map_scheme: str = "sft"

    FLAGS = {"map_scheme": "--layer-map"}  # ClassVar: command-line flags that differ from the field names

    def __post_init__(self):
        for name in ("encoder_layers", "decoder_layers"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{{{name}}} must be at least 1, got {v}")
        if self.map_scheme not in SCHEMES:
            raise ConfigError(f"{{map_scheme}} '{self.map_scheme}' is unknown: choose one of {', '.join(SCHEMES)}",
                              self.FLAGS)
        for stack in ("encoder", "decoder"):
            m, n = getattr(self, f"{stack}_map"), getattr(self, f"{stack}_layers")
            if m is not None and n is not None and len(m) != n:
                raise DQToolError(
                    f"--{stack}-map has {len(m)} indices but --{stack}-layers is {n}: give one index per student layer")


@dataclass(frozen=True)
class DistillResult:
    out_dir: Path
    encoder_map: list[int]
    decoder_map: list[int]
    teacher_params: int
    student_params: int


def resolve_maps(teacher_config, spec: ArchSpec, cfg: DistillConfig) -> dict[str, list[int]]:
    """``{"encoder": [...], "decoder": [...]}``: teacher layers each student layer copies."""
    maps = {}
    for stack_name, stack in spec.stacks().items():
        n_teacher = num_layers(teacher_config, stack)
        explicit = getattr(cfg, f"{stack_name}_map")
        n_student = getattr(cfg, f"{stack_name}_layers")
        if explicit is not None:
            if len(explicit) > n_teacher:
                raise DQToolError(
                    f"--{stack_name}-map asks for {len(explicit)} layers but the teacher {stack_name} has only "
                    f"{n_teacher}; choose at most {n_teacher}")
            maps[stack_name] = check_map(list(explicit), n_teacher, stack_name)
        else:
            n = n_teacher if n_student is None else n_student
            if n > n_teacher:
                raise DQToolError(
                    f"--{stack_name}-layers {n} is more than the teacher's {n_teacher} {stack_name} layers; "
                    f"choose at most {n_teacher}")
            maps[stack_name] = default_map(n_teacher, n, cfg.map_scheme, stack_name)
    return maps


def student_config(teacher_config, spec: ArchSpec, maps: dict[str, list[int]]):
    """The teacher's config with the student's depths (every other field unchanged)."""
    cfg = copy.deepcopy(teacher_config)
    for stack_name, stack in spec.stacks().items():
        setattr(cfg, stack.num_layers_attr, len(maps[stack_name]))
    return cfg


def teacher_key(student_key: str, spec: ArchSpec, maps: dict[str, list[int]]) -> str:
    """The teacher state-dict key a student key is copied from.

    Example:
        >>> from transformers import BartConfig
        >>> teacher_key("model.decoder.layers.1.fc1.weight", spec_for(BartConfig()), {"encoder": [0], "decoder": [0, 5]})
        'model.decoder.layers.5.fc1.weight'
    """
    for stack_name, stack in spec.stacks().items():
        prefix = stack.layers_path + "."
        if student_key.startswith(prefix):
            idx_str, rest = student_key[len(prefix):].split(".", 1)
            i = int(idx_str)
            # Parameters held only by the first layer follow layer 0, not the map.
            src = 0 if (i == 0 and rest in stack.first_layer_only) else maps[stack_name][i]
            return f"{prefix}{src}.{rest}"
    return student_key


def copy_weights(teacher, student, spec: ArchSpec, maps: dict[str, list[int]]) -> None:
    """Copy every student parameter and buffer from its teacher counterpart, in place."""
    import torch

    t_state = teacher.state_dict()
    with torch.no_grad():
        for key, dst in student.state_dict().items():
            src_key = teacher_key(key, spec, maps)
            if src_key not in t_state:
                raise DQToolError(f"student weight {key} has no teacher counterpart {src_key}; the checkpoint does not "
                                  f"match its {spec.name} config")
            src = t_state[src_key]
            if src.shape != dst.shape:
                raise DQToolError(f"shape mismatch copying {src_key} {tuple(src.shape)} to {key} {tuple(dst.shape)}")
            dst.copy_(src)


def _count(model) -> int:
    # Parameters counted once even when tied (state_dict would count the shared embedding 3x).
    return sum(p.numel() for p in model.parameters())


@locked("out_dir")
def distill(teacher: str | os.PathLike, out_dir: str | os.PathLike, cfg: DistillConfig,
            force: bool = False) -> DistillResult:
    """Build a layer-copied student of ``teacher`` in ``out_dir``.

    Load and validate first (nothing is written on error), then build the student,
    copy the weights, and save it with its tokenizer, generation config and a manifest.

    Example (needs real folders, so not run as a doctest)::
        distill("runs/teacher", "runs/student", DistillConfig(encoder_layers=6, decoder_layers=3))
    """
    from transformers import AutoModelForSeq2SeqLM

    out = check_output(out_dir, force)
    t_config = load_config(teacher)
    spec = spec_for(t_config)
    maps = resolve_maps(t_config, spec, cfg)
    model, tokenizer = load_seq2seq(teacher)
    s_config = student_config(model.config, spec, maps)
    # A teacher's auto_map points at modelling code files the student folder does not get
    # (dqtool never runs remote code): a student keeping it would name files it lacks.
    s_config.__dict__.pop("auto_map", None)
    student = AutoModelForSeq2SeqLM.from_config(s_config, torch_dtype=model.dtype)
    copy_weights(model, student, spec, maps)
    student.generation_config = copy.deepcopy(model.generation_config)
    student.eval()

    with atomic_output(out, force=force) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        result = DistillResult(out, maps["encoder"], maps["decoder"], _count(model), _count(student))
        write_manifest(
            tmp, "distill",
            inputs={"teacher": describe_source(teacher)},
            config=cfg,
            extra={
                "architecture": spec.name,
                "layer_map": maps,
                "teacher_layers": {k: num_layers(t_config, s) for k, s in spec.stacks().items()},
                "teacher_params": result.teacher_params,
                "student_params": result.student_params,
            },
        )
    return result
