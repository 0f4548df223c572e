"""Greedy and beam search in numpy, as Hugging Face's ``generate`` runs them (transformers 4.57).

The searches drive a decoder through a small protocol — ``start(enc, mask)`` returns a
state with ``step(seqs [N, cur]) -> logits [N, V]`` and ``reorder(rows)`` (see
:class:`dqtool.runtimes.ort.Decoding`) — and apply Hugging Face's logits processors
(:class:`Processors`) in its order. The generation config ``gc`` is already resolved
(:func:`dqtool.runtimes.genconfig.resolve_generation_config`).

One difference from Hugging Face that needs exactly equal scores to show: equal candidates
are ranked lower index first, where ``torch.topk`` leaves their order unspecified.
"""

from __future__ import annotations

import numpy as np

from dqtool.runtimes.genconfig import as_list

_NEG = np.float32(-1.0e9)  # Hugging Face's "finished / unused beam" score


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of each row of ``x`` [R, N], largest first (ties: lower index first).

    Long rows (beams x vocabulary) skip a full partition: the ``k``-th largest of the
    maxima of 256-wide chunks is a lower bound of the ``k``-th largest entry, so only the
    entries at or above it are sorted.

    Example:
        >>> topk(np.array([[1.0, 3.0, 3.0, 2.0]]), 3).tolist()
        [[1, 2, 3]]
    """
    rows, n = x.shape
    k = min(k, n)
    chunk = 256
    if n < 16 * chunk or k > n // chunk:
        thr = np.partition(x, n - k, axis=1)[:, n - k]  # the k-th largest entry itself
    else:
        full = n // chunk * chunk
        cmax = x[:, :full].reshape(rows, -1, chunk).max(axis=2)
        if full < n:
            cmax = np.concatenate([cmax, x[:, full:].max(axis=1, keepdims=True)], axis=1)
        thr = np.partition(cmax, cmax.shape[1] - k, axis=1)[:, cmax.shape[1] - k]
    out = np.empty((rows, k), dtype=np.int64)
    for r in range(rows):
        cand = np.flatnonzero(x[r] >= thr[r])
        out[r] = cand[np.lexsort((cand, -x[r, cand]))[:k]]
    return out


class Processors:
    """Hugging Face's logits processors of one ``generate`` call, configured from its
    resolved generation config ``gc``."""

    def __init__(self, gc):
        self.gc = gc
        self.max_length = int(gc.max_length)
        self.start = int(gc.decoder_start_token_id)
        self.eos = as_list(gc.eos_token_id)
        self.eos_arr = np.array(self.eos, dtype=np.int64)
        self.pad = gc.pad_token_id
        self.ngram = int(gc.no_repeat_ngram_size or 0)
        self.min_length = int(gc.min_length or 0) if self.eos else 0
        self.rep_penalty = gc.repetition_penalty if gc.repetition_penalty not in (None, 1.0) else None
        self.forced_bos = gc.forced_bos_token_id
        self.forced_eos = as_list(gc.forced_eos_token_id) if gc.forced_eos_token_id is not None else None
        self.bad_single: list[int] = []
        self.bad_multi: list[tuple[list[int], int]] = []
        if gc.bad_words_ids is not None:
            for seq in gc.bad_words_ids:  # Hugging Face drops bad words that are a lone EOS
                if any(list(seq) == [e] for e in self.eos):
                    continue
                if len(seq) == 1:
                    self.bad_single.append(int(seq[0]))
                else:
                    self.bad_multi.append(([int(t) for t in seq[:-1]], int(seq[-1])))

    def is_eos(self, tokens: np.ndarray) -> np.ndarray:
        if len(self.eos) == 1:
            return tokens == self.eos[0]
        return (tokens[..., None] == self.eos_arr).any(axis=-1)

    # Hugging Face's processor order: repetition penalty, no-repeat n-gram, bad words,
    # min length, forced BOS, forced EOS.
    def process(self, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Apply the logits processors in place; ``seqs`` [N, cur_len] are the sequences so far."""
        cur_len = seqs.shape[1]
        if self.rep_penalty is not None:
            p = np.float32(self.rep_penalty)
            for r in range(seqs.shape[0]):
                toks = np.unique(seqs[r])
                s = scores[r, toks]
                scores[r, toks] = np.where(s < 0, s * p, s / p)
        if self.ngram > 0 and cur_len + 1 >= self.ngram:
            n = self.ngram
            for r, row in enumerate(seqs.tolist()):
                prefix = row[cur_len - n + 1:]
                banned = [row[i + n - 1] for i in range(cur_len - n + 1) if row[i:i + n - 1] == prefix]
                if banned:
                    scores[r, banned] = -np.inf
        if self.bad_single:
            scores[:, self.bad_single] = -np.inf
        for prefix, last in self.bad_multi:
            if len(prefix) + 1 <= cur_len:
                hit = (seqs[:, cur_len - len(prefix):] == np.array(prefix)).all(axis=1)
                scores[hit, last] = -np.inf
        if cur_len < self.min_length:
            scores[:, self.eos] = -np.inf
        if self.forced_bos is not None and cur_len == 1:
            scores[:] = -np.inf
            scores[:, self.forced_bos] = 0
        if self.forced_eos is not None and cur_len == self.max_length - 1:
            scores[:] = -np.inf
            scores[:, self.forced_eos] = 0
        return scores


def greedy(start, enc: np.ndarray, mask: np.ndarray, gc) -> np.ndarray:
    """Hugging Face's greedy search (``_sample`` without sampling): sequences [B, T] with the
    decoder start token first and finished rows padded.

    ``start(enc, mask)`` gives the decoder state (a :class:`~dqtool.runtimes.ort.Decoding`);
    ``enc`` [B, S, d] and ``mask`` [B, S] are the encoder output and its mask; ``gc`` is the
    resolved generation config (:mod:`dqtool.runtimes.genconfig`).
    """
    proc, b = Processors(gc), enc.shape[0]
    if (gc.num_return_sequences or 1) != 1:
        raise ValueError("greedy search returns one sequence per input: pass num_return_sequences=1 "
                         "or num_beams > 1")
    seqs = np.empty((b, proc.max_length), dtype=np.int64)  # [B, T]; columns < cur are written
    seqs[:, 0] = proc.start
    cur = 1
    has_eos = bool(proc.eos)
    unfinished = np.ones(b, dtype=bool)  # [B]
    decoding = start(enc, mask)
    while True:
        logits = decoding.step(seqs[:, :cur])  # [B, V]
        scores = proc.process(seqs[:, :cur], np.asarray(logits, dtype=np.float32))  # [B, V]
        nxt = scores.argmax(axis=-1)
        if has_eos:
            nxt = np.where(unfinished, nxt, proc.pad)
            unfinished &= ~proc.is_eos(nxt)
        seqs[:, cur] = nxt
        cur += 1
        if cur >= proc.max_length or not unfinished.any():
            return seqs[:, :cur]

def beam_search(start, enc: np.ndarray, mask: np.ndarray, gc) -> np.ndarray:
    """Hugging Face's vectorized beam search (transformers 4.57 ``_beam_search``), in numpy:
    sequences [B * num_return_sequences, T]. Arguments as for :func:`greedy`.

    Shapes: B inputs, nb beams, K = keep candidates per input, V vocabulary, L = max_length,
    P = 1 (the decoder prompt: the start token), cur = tokens so far.
    """
    proc = Processors(gc)
    nb, b = int(gc.num_beams), enc.shape[0]
    max_length = proc.max_length
    early_stopping = gc.early_stopping
    lp_exp = float(gc.length_penalty if gc.length_penalty is not None else 1.0)
    nrs = int(gc.num_return_sequences or 1)
    keep = max(2, 1 + len(proc.eos)) * nb
    top_mask = np.zeros(keep, dtype=bool)
    top_mask[:nb] = True
    # Hugging Face: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`.
    fill = (proc.pad if proc.pad else proc.eos[0]) if proc.eos else -1
    prompt = 1
    rows = np.arange(b)[:, None]

    enc = np.repeat(enc, nb, axis=0)    # [B * nb, S, d]
    mask = np.repeat(mask, nb, axis=0)  # [B * nb, S]
    # The running beams (still generating) and the finished hypotheses kept so far:
    running = np.full((b, nb, max_length), fill, dtype=np.int64)  # [B, nb, L] tokens
    running[:, :, 0] = proc.start
    sequences = running.copy()                                    # [B, nb, L] finished tokens
    running_scores = np.zeros((b, nb), dtype=np.float32)          # [B, nb] summed log-probs
    running_scores[:, 1:] = _NEG                                  # only beam 0 is live at first
    beam_scores = np.full((b, nb), _NEG, dtype=np.float32)        # [B, nb] length-normalized
    finished = np.zeros((b, nb), dtype=bool)                      # [B, nb] slot holds a hypothesis
    unsatisfied = np.ones((b, 1), dtype=bool)                     # [B, 1] input may still improve
    running_idx = np.full((b, nb, max_length - prompt), -1, dtype=np.int32)  # [B, nb, L-P] source row per step
    beam_idx = running_idx.copy()                                 # [B, nb, L-P] the same for finished
    decoding = start(enc, mask)
    cur = prompt
    while True:
        flat = running[:, :, :cur].reshape(b * nb, cur)           # [B * nb, cur]
        logits = decoding.step(flat)                              # [B * nb, V]
        vocab = logits.shape[-1]
        logp = proc.process(flat, log_softmax(logits.astype(np.float32, copy=False)))
        logp = (logp.reshape(b, nb, vocab) + running_scores[:, :, None]).reshape(b, nb * vocab)

        # top-k continuations
        top = topk(logp, keep)                                    # [B, K] into nb * V
        top_lp = np.take_along_axis(logp, top, axis=1)            # [B, K]
        src = top // vocab                                        # [B, K] beam each comes from
        tok = top % vocab                                         # [B, K] its new token
        top_seq = running[rows, src]                              # [B, K, L]
        top_idx = running_idx[rows, src]                          # [B, K, L-P]
        top_seq[:, :, cur] = tok
        top_idx[:, :, cur - prompt] = src + rows * nb
        hits = proc.is_eos(tok) | (cur + 1 >= max_length)

        # running beams for the next step: the best that did not stop
        run_lp = top_lp + hits.astype(np.float32) * _NEG
        nxt = topk(run_lp, nb)
        running = np.take_along_axis(top_seq, nxt[:, :, None], axis=1)
        running_scores = np.take_along_axis(run_lp, nxt, axis=1)
        running_idx = np.take_along_axis(top_idx, nxt[:, :, None], axis=1)

        # finished beams: add the ones that just stopped, if they beat the kept ones
        just = hits & top_mask[None, :]
        fin_lp = top_lp / np.float32((cur + 1 - prompt) ** lp_exp)
        full = finished.all(axis=-1, keepdims=True) & (early_stopping is True)
        fin_lp = fin_lp + full.astype(np.float32) * _NEG
        fin_lp = fin_lp + (~unsatisfied).astype(np.float32) * _NEG
        fin_lp = fin_lp + (~just).astype(np.float32) * _NEG
        merged_scores = np.concatenate([beam_scores, fin_lp], axis=1)
        best = topk(merged_scores, nb)
        sequences = np.take_along_axis(np.concatenate([sequences, top_seq], axis=1), best[:, :, None], axis=1)
        beam_scores = np.take_along_axis(merged_scores, best, axis=1)
        beam_idx = np.take_along_axis(np.concatenate([beam_idx, top_idx], axis=1), best[:, :, None], axis=1)
        finished = np.take_along_axis(np.concatenate([finished, just], axis=1), best, axis=1)

        decoding.reorder(running_idx[:, :, cur - prompt].reshape(-1))
        cur += 1

        # early-stop heuristic and loop condition
        if early_stopping == "never" and lp_exp > 0.0:
            best_len = max_length - prompt
        else:
            best_len = cur - prompt
        best_running = running_scores[:, :1] / np.float32(best_len ** lp_exp)
        worst_finished = np.where(finished, beam_scores.min(axis=1, keepdims=True), _NEG)
        unsatisfied = unsatisfied & (best_running > worst_finished).any(axis=-1, keepdims=True)
        open_beam = not (finished.all() and early_stopping is True)
        if not (unsatisfied.any() and open_beam and not hits.all()):
            break

    sequences = sequences[:, :nrs].reshape(b * nrs, max_length)
    beam_idx = beam_idx[:, :nrs].reshape(b * nrs, -1)
    generated = int((beam_idx != -1).sum(axis=1).max())
    return np.ascontiguousarray(sequences[:, :prompt + generated])
