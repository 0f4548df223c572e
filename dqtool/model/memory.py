"""Peak memory of a QAT run, estimated before training from the shapes alone.

    total = student weights + fake-quant copies + gradients + optimizer state
            + teacher + activations (batch x lengths) + logits and loss + runtime

* **student weights**: every parameter at 4 bytes (the Trainer keeps float32 master
  weights, also under bf16/fp16 autocast);
* **fake-quant copies**: the forward fake-quantizes each quantized weight, and the
  matmul keeps that copy for the backward (4 bytes per quantized weight; under autocast
  another 2-byte cast);
* **gradients** and **optimizer state**: only for parameters that train (AdamW: two
  float32 moments, 8 bytes per trained parameter);
* **teacher**: frozen, no gradients, at its storage dtype (bf16 on a bf16 GPU by
  default, float32 otherwise); 0 when it is not loaded (targets precomputed and no
  loss needs its outputs);
* **activations**: what autograd keeps per layer, per token of the batch (about 16
  d-wide and 3 FFN-wide tensors per token, and 4 attention maps per head: scores,
  probabilities and their fake-quantized inputs); with gradient checkpointing only
  each layer's input is kept, plus one layer's activations while it is recomputed;
* **logits and loss**: ``batch x target x vocab`` floats a few times over (student and
  teacher logits, log-softmaxes of the cross-entropy and the KL);
* **runtime**: the process itself (Python, torch, transformers; CPU) or the CUDA
  context and allocator slack (GPU).

The per-token coefficients were checked against the peak RSS of real runs at
BART-base shape on CPU (README, "Memory"); treat the total as +-25%.

Example:
    >>> from transformers import BartConfig
    >>> cfg = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=3,
    ...                  encoder_attention_heads=12, decoder_attention_heads=12,
    ...                  encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    >>> e = estimate(cfg, student_params=124_000_000, quantized_params=124_000_000, trainable_params=124_000_000,
    ...              teacher_params=140_000_000, batch=4, source_len=256, target_len=64)
    >>> round(e.total / 2**30, 1), e.parts["teacher"] == 140_000_000 * 4
    (4.7, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Floats autograd keeps per token and layer (see the module docstring); measured
# against CPU runs at BART-base shape (benchmarks/qat_memory.py).
ENC_D, DEC_D, FFN, ATTN, CROSS_SRC_D = 16, 26, 3, 4, 4
LOGITS_COPIES_CE, LOGITS_COPIES_KL = 3, 5
RUNTIME_CPU, RUNTIME_GPU = 700 * 2**20, 600 * 2**20
ADAM_BYTES = 8


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict = field(default_factory=dict)   # name -> bytes
    notes: tuple = ()

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """One line per part and the total, in GiB."""
        gib = 2 ** 30
        lines = [f"  {k.replace('_', ' '):<22} {v / gib:7.2f} GiB" for k, v in self.parts.items()]
        lines.append(f"  {'total (peak, +-25%)':<22} {self.total / gib:7.2f} GiB")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _dims(config) -> dict:
    g = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    d = g("d_model", "hidden_size")
    heads = g("encoder_attention_heads", "num_heads")
    inner = (config.d_kv * heads) if getattr(config, "d_kv", None) else d
    gated = getattr(config, "is_gated_act", False)
    return {"d": d, "inner": inner, "ffn": g("encoder_ffn_dim", "d_ff"), "heads": heads,
            "enc": g("encoder_layers", "num_layers"), "dec": g("decoder_layers", "num_decoder_layers") or
            g("num_layers"), "vocab": config.vocab_size, "ffn_copies": FFN + (1 if gated else 0)}


def activation_floats(config, batch: int, source_len: int, target_len: int, checkpointing: bool = False,
                      hidden_loss: bool = False, attention_loss: bool = False) -> int:
    """Floats of activations kept for the backward (plus distillation outputs held)."""
    m = _dims(config)
    d, inner, ffn, h = m["d"], m["inner"], m["ffn"], m["heads"]
    s, t = source_len, target_len
    enc_layer = batch * s * (ENC_D * d + m["ffn_copies"] * ffn) + batch * h * s * s * ATTN
    dec_layer = batch * t * (DEC_D * d + m["ffn_copies"] * ffn) + batch * h * t * (t + s) * ATTN \
        + batch * s * CROSS_SRC_D * inner
    if checkpointing:
        act = batch * (s * m["enc"] + t * m["dec"]) * d + max(enc_layer, dec_layer)
    else:
        act = m["enc"] * enc_layer + m["dec"] * dec_layer
    if hidden_loss:  # hidden states of student and teacher held for the loss
        act += 2 * batch * ((m["enc"] + 1) * s + (m["dec"] + 1) * t) * d
    if attention_loss:  # the teacher's attention maps held (the student's are counted above)
        act += batch * h * (m["enc"] * s * s + m["dec"] * t * (t + s))
    return int(act)


def estimate(config, *, student_params: int, quantized_params: int, trainable_params: int, teacher_params: int,
             batch: int, source_len: int, target_len: int, device: str = "cpu", mixed_precision: str | None = None,
             teacher_bytes: int = 4, checkpointing: bool = False, kl: bool = True, hidden_loss: bool = False,
             attention_loss: bool = False) -> MemoryEstimate:
    """Peak memory of QAT training (bytes, by part) on ``device`` ("cpu" RSS or "cuda" memory).

    ``mixed_precision``: None (float32), "bf16" or "fp16" autocast; ``teacher_bytes``: 2
    for a bf16/fp16 teacher, 4 for float32 (``teacher_params`` 0: not loaded).
    """
    act_bytes = 2 if mixed_precision else 4
    vocab = _dims(config)["vocab"]
    logits_copies = LOGITS_COPIES_KL if kl and teacher_params else LOGITS_COPIES_CE
    parts = {
        "student_weights": student_params * 4,
        "fake_quant_copies": quantized_params * (4 + (2 if mixed_precision else 0)),
        "gradients": trainable_params * 4,
        "optimizer_state": trainable_params * ADAM_BYTES,
        "teacher": teacher_params * teacher_bytes,
        "activations": activation_floats(config, batch, source_len, target_len, checkpointing, hidden_loss,
                                         attention_loss) * act_bytes,
        "logits_and_loss": batch * target_len * vocab * logits_copies * 4,
        "runtime": RUNTIME_GPU if device.startswith("cuda") else RUNTIME_CPU,
    }
    notes = [f"batch {batch} x source {source_len} x target {target_len} tokens, "
             f"{'gradient checkpointing' if checkpointing else 'no gradient checkpointing'}, "
             f"{mixed_precision or 'float32'} compute on {device}"]
    return MemoryEstimate(parts, tuple(notes))
