"""Keep dequantized (packed) or fake-quantized (QAT) weights between forwards.

A packed Linear unpacks its codes and dequantizes them, and a QAT Linear fake-quantizes
its float weight, on every forward: at BART-base shape that is seconds per generated
token on a CPU, far more than the matmuls. Both are pure functions of tensors that do
not change during inference, so the result can be kept. Where it is kept is a
memory / speed trade-off, chosen per model with :func:`set_weight_cache`:

``"model"``
    Computed on first use, kept as long as the model lives: generation runs as fast as
    the float model, but the model holds a float copy of every quantized weight (at
    the compute dtype: 4 bytes per weight in float32, about the float model's size, on
    top of the packed codes). The default of :func:`dqtool.load_packed`.
``"generate"``
    Kept only for the duration of one ``model.generate(...)`` call (or a
    :func:`cache_scope` block) and freed when it returns: the float copy exists only
    while generating, and each call pays one dequantization of every weight (about
    one uncached forward). Plain forwards outside a call compute as ``"none"`` does.
``"none"``
    Recomputed on every forward: the least memory (only the weights of the Linear being
    computed are ever float), the slowest. The behaviour before the cache existed.

The kept tensor is exactly what the forward would compute (the same function on the
same tensors), so outputs are bit for bit those of ``"none"``. An entry is keyed on
the identity and the in-place version counter of the tensors it was computed from
(``qweight``/``scale``, or the float weight), so ``load_state_dict``, ``copy_``, an
optimizer step, a reassigned buffer or ``.to(device)`` makes it stale and it is
recomputed (packed modules drop theirs as soon as they are moved). Nothing is cached
while a weight needs a gradient (QAT training), during ONNX export or tracing (the
graph must read the packed codes, never a float copy), or for modules of a model
:func:`set_weight_cache` was never called on.

Example:
    >>> from dqtool.model.packed import PackedLinear
    >>> from dqtool.qmath.pack import pack_codes
    >>> from dqtool.qmath.quant import QuantSpec, quantize_weight
    >>> lin = torch.nn.Linear(8, 3)
    >>> spec = QuantSpec.weight(4, "row")
    >>> codes, scale = quantize_weight(lin.weight, spec)
    >>> p = PackedLinear(8, 3, spec, pack_codes(codes, 4), scale.squeeze(-1), lin.bias.detach())
    >>> cache = set_weight_cache(p, "model")
    >>> p.weight() is p.weight(), cache.entries()
    (True, 1)
    >>> _ = set_weight_cache(p, "none"); p.weight() is p.weight()
    False
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable

import torch
import torch.nn as nn

from dqtool.base.errors import DQToolError

MODES = ("model", "generate", "none")
_CTL = "_dqtool_weight_cache"      # module attribute: the WeightCache of its model


class WeightCache:
    """The cache policy of one model and its kept tensors.

    Attached by :func:`set_weight_cache`; :attr:`active` says whether an entry may be
    used or made right now. Entries are keyed by a *slot* (the module, or a key that
    modules sharing one weight share, e.g. a tied embedding and lm_head).
    """

    def __init__(self, mode: str):
        if mode not in MODES:
            raise DQToolError(f"weight cache '{mode}' is not supported: choose {', '.join(MODES)}")
        self.mode = mode
        self._depth = 0
        self._entries: dict = {}   # slot -> (source key, tensor)

    @property
    def active(self) -> bool:
        return self.mode == "model" or (self.mode == "generate" and self._depth > 0)

    @contextlib.contextmanager
    def scope(self):
        """Entries live until the outermost scope exits (mode ``"generate"``)."""
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self.mode != "model":
                self.clear()

    def clear(self) -> None:
        """Drop every entry (their memory is freed once nothing else holds them)."""
        self._entries = {}

    def drop(self, slot) -> None:
        self._entries.pop(slot, None)

    def entries(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes the kept tensors take."""
        return sum(t.numel() * t.element_size() for _, t in self._entries.values())

    def __reduce__(self):
        # A copied or pickled model gets a fresh, empty policy object of the same mode.
        return WeightCache, (self.mode,)


def exporting() -> bool:
    """Whether a trace, script, ONNX export or compile is running (graphs must read the stored codes)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() \
        or torch.compiler.is_compiling()


def _source_key(s: torch.Tensor) -> tuple:
    # Identity and in-place version catch copy_/optimizer steps/reassigned buffers; the
    # data pointer, dtype and device catch ``param.data = ...`` (what Module.to does to
    # parameters, keeping the Parameter object).
    return s, s._version, s.data_ptr(), s.dtype, s.device


def _usable(module: nn.Module, sources: tuple[torch.Tensor, ...]) -> WeightCache | None:
    # The module's cache when an entry may be used or made right now, else None.
    ctl = module.__dict__.get(_CTL)
    if ctl is None or not ctl.active or exporting() \
            or (torch.is_grad_enabled() and any(s.requires_grad for s in sources)) \
            or any(s.is_inference() for s in sources):   # no version counter to see in-place edits
        return None
    return ctl


def keeps(module: nn.Module, sources: tuple[torch.Tensor, ...]) -> bool:
    """Whether :func:`cached` would keep (or reuse) a tensor computed from ``sources`` now:
    a module can then read its whole kept table instead of computing a part of it."""
    return _usable(module, sources) is not None


def cached(module: nn.Module, sources: tuple[torch.Tensor, ...], compute: Callable[[], torch.Tensor],
           slot=None) -> torch.Tensor:
    """``compute()``, kept while ``sources`` stay the same tensors with the same contents.

    ``compute`` must be a pure function of ``sources`` (and of settings that do not
    change); when nothing may be cached the caller's forward is exactly what it was.
    ``slot`` names the entry (default: the module); modules computing the same tensor
    from the same sources pass the same slot and share one entry.
    """
    ctl = _usable(module, sources)
    if ctl is None:
        return compute()
    slot = id(module) if slot is None else slot
    entry = ctl._entries.get(slot)
    if entry is not None and len(entry[0]) == len(sources) and all(
            a[0] is s and a[1:] == _source_key(s)[1:] for a, s in zip(entry[0], sources)):
        return entry[1]
    ctl._entries.pop(slot, None)   # free the stale tensor before computing its successor
    with torch.inference_mode(False), torch.no_grad():   # a normal tensor even if called in inference mode
        value = compute()
    ctl._entries[slot] = (tuple(_source_key(s) for s in sources), value)
    return value


def drop_entry(module: nn.Module, slot=None) -> None:
    """Forget ``module``'s kept tensor (called when its buffers move or change dtype)."""
    ctl = module.__dict__.get(_CTL)
    if ctl is not None:
        ctl.drop(id(module) if slot is None else slot)


def _cacheable(module: nn.Module) -> bool:
    return getattr(type(module), "weight_cacheable", False)


def set_weight_cache(model: nn.Module, mode: str) -> WeightCache:
    """Set how ``model``'s quantized modules keep their weights: ``"model"``,
    ``"generate"`` or ``"none"`` (see the module docstring for the trade-off).

    Replaces any earlier setting (its entries are dropped). With ``"generate"`` the
    model's ``generate`` is wrapped in :func:`cache_scope`. Returns the
    :class:`WeightCache` (also ``model.dqtool_weight_cache``).
    """
    ctl = WeightCache(mode)
    old = getattr(model, "dqtool_weight_cache", None)
    if isinstance(old, WeightCache):
        old.clear()
    for m in model.modules():
        if _cacheable(m):
            m.__dict__[_CTL] = ctl
    model.__dict__["dqtool_weight_cache"] = ctl
    if mode == "generate" and hasattr(type(model), "generate"):
        model.__dict__["generate"] = types.MethodType(_generate_in_scope, model)
    else:
        model.__dict__.pop("generate", None)
    return ctl


def _generate_in_scope(self, *args, **kwargs):
    with cache_scope(self):
        return type(self).generate(self, *args, **kwargs)


@contextlib.contextmanager
def cache_scope(model: nn.Module):
    """Keep weights for the duration of the block (mode ``"generate"``; a no-op otherwise).

    Example (needs a packed folder, so not run as a doctest)::
        model, tok = dqtool.load_packed("runs/packed-2-2-8", cache="generate")
        with cache_scope(model):          # several forwards share one dequantization
            for batch in batches:
                model(**batch)
    """
    ctl = getattr(model, "dqtool_weight_cache", None)
    if not isinstance(ctl, WeightCache):
        yield None
        return
    with ctl.scope():
        yield ctl
