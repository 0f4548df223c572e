"""The QAT folder (written by ``dqtool qat``): a plain Hugging Face checkpoint plus its scheme.

    config.json, model.safetensors   the float weights (a plain HF checkpoint)
    quantization.json                the W-E-A scheme (fake quantization is applied on load)
    quantizers.safetensors           learned quantizer tensors (PACT clips), if any
    tokenizer files, generation_config.json, training_log.json, dqtool-manifest.json

:func:`load_qat` checks every file against the manifest first (:func:`verify`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dqtool.base.errors import DQToolError
from dqtool.formats.manifest import verify_folder
from dqtool.model.qmodules import prepare, quantizer_state, strip_quantizer_state
from dqtool.qmath.scheme import QuantScheme

NAME = "qat"
STAGE = "qat"  # the manifest's stage
ACCEPTS = "a 'dqtool qat' output (quantization.json)"
SCHEME_FILE = "quantization.json"
QSTATE_FILE = "quantizers.safetensors"


def detect(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by the QAT stage (holds quantization.json).

    Example:
        >>> detect(tmp)  # tmp: an empty folder (conftest.py)
        False
    """
    return (Path(folder) / SCHEME_FILE).is_file()


is_qat_folder = detect


def verify(folder: str | os.PathLike) -> dict:
    """The manifest of a QAT folder after every file matched its hash (else a one-line DQToolError)."""
    return verify_folder(folder, STAGE)


def read_scheme(folder: str | os.PathLike) -> QuantScheme:
    """The :class:`QuantScheme` a QAT folder was trained with."""
    scheme_path = Path(folder) / SCHEME_FILE
    if not scheme_path.is_file():
        raise DQToolError(f"{folder} has no {SCHEME_FILE}: it is not a QAT output folder")
    try:
        return QuantScheme.from_dict(json.loads(scheme_path.read_text()))
    except ValueError as e:
        raise DQToolError(f"{scheme_path} is not valid JSON ({e}); re-run dqtool qat") from e


def load_qat(folder: str | os.PathLike, device: str | None = None):
    """``(model, tokenizer)`` of a QAT folder with its fake quantization applied.

    Every file is checked against the manifest's hash first.

    Example (needs real folders, so not run as a doctest)::
        model, tok = load_qat("runs/qat-2-2-8")
    """
    from safetensors.torch import load_file

    from dqtool.formats.hf import load_verified

    folder = Path(folder)
    scheme = read_scheme(folder)
    verify(folder)
    model, tok = load_verified(folder)
    prepare(model, scheme)
    qpath = folder / QSTATE_FILE
    if qpath.is_file():
        missing, unexpected = model.load_state_dict(load_file(qpath), strict=False)
        if unexpected:
            raise DQToolError(f"{qpath} holds unknown quantizer tensors {unexpected[:3]}: re-run dqtool qat")
    if device:
        model.to(device)
    return model.eval(), tok


load = load_qat


def save_qat(model, tok, folder: Path, scheme: QuantScheme) -> None:
    """Write the plain HF checkpoint, the scheme and the quantizer state into ``folder``
    (the caller writes the manifest last)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # not saved; keeps the HF folder loadable anywhere
    model.save_pretrained(folder, state_dict=strip_quantizer_state(model, state))
    model.config._attn_implementation = attn
    tok.save_pretrained(folder)
    (folder / SCHEME_FILE).write_text(scheme.dumps() + "\n")
    qstate = quantizer_state(model)
    if qstate:
        save_file({k: v.contiguous() for k, v in qstate.items()}, str(folder / QSTATE_FILE))
