"""Batched generation of text with any model that has Hugging Face's ``generate``.

Rows are generated longest first, so batches hold similar lengths (little padding) and an
out-of-memory batch size fails on the first batch, not the last; outputs come back in input
order. ``dqtool eval``, ``dqtool bench`` and QAT's teacher targets use it.
"""

from __future__ import annotations

import torch


def pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to ``ids [B, S]`` and ``mask [B, S]`` (1 = real token).

    Example:
        >>> ids, mask = pad([[5, 6, 7], [8]], 1, left=False)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 1, 1]], [[1, 1, 1], [1, 0, 0]])
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, sl] = torch.tensor(s, dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


def generate_texts(model, tok, sources: list[str], generate_kwargs: dict, batch_size: int, device: str,
                   max_source_length: int, desc: str = "eval: generation") -> list[str]:
    """Decoded generations for ``sources``, in input order, with progress (``desc``).

    Example (needs a model, so not run as a doctest)::
        preds = generate_texts(model, tok, ["summarize: some text"], {"num_beams": 1}, 32, "cpu", 512)
    """
    enc = tok(sources, max_length=max_source_length, truncation=True)["input_ids"]
    # Stable sort: equal lengths keep input order, so the batches are reproducible.
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    left = getattr(tok, "padding_side", "right") == "left"
    out: list[str] = [""] * len(sources)
    from dqtool.base.progress import Progress

    with torch.inference_mode(), Progress(len(order), desc, unit="rows") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad([enc[i] for i in idx], pad_id, left)  # [B, S], [B, S]
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 **generate_kwargs)  # [B, T]
            for i, text in zip(idx, tok.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text.strip()
            bar.update(len(idx))
    return out
