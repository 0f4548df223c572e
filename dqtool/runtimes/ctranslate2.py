"""CTranslate2 as a runtime: a converted seq2seq folder used like a Hugging Face model.

:class:`CT2Seq2Seq` wraps ``ctranslate2.Translator`` with Hugging Face's ``generate``
signature and generation-config rules (:mod:`dqtool.runtimes.genconfig`); bench's
``ctranslate2-int8`` peer (:mod:`dqtool.stages.bench.peers`) builds the folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dqtool.base.errors import DQToolError
from dqtool.runtimes.genconfig import as_list, resolve_generation_config

HF_DIR = "hf"  # HF config, generation config and tokenizer of a CTranslate2 folder


def _ct2_vocabulary(folder: Path, name: str) -> list[str] | None:
    if (folder / f"{name}.json").is_file():
        return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    if (folder / f"{name}.txt").is_file():  # CTranslate2 < 3
        return (folder / f"{name}.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    return None


def load_ct2(folder: str | os.PathLike, threads: int):
    """``(CT2Seq2Seq, tokenizer_or_None)`` of a ``ctranslate2-*`` peer folder.

    Example (needs a real folder, so not run as a doctest)::
        model, tok = load_ct2("runs/bench/peers/ctranslate2-int8", threads=2)
    """
    from transformers import AutoTokenizer

    model = CT2Seq2Seq(folder, threads)
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(folder) / HF_DIR))
    except Exception:
        tok = None
    return model, tok


class CT2Seq2Seq:
    """A CTranslate2 ``Translator`` used like a Hugging Face seq2seq model (``generate`` only).

    ``generate`` takes HF's arguments, resolves them with the generation config by HF's
    rules (as :class:`~dqtool.runtimes.ort.OnnxSeq2Seq` does) and maps them:

    * ids <-> tokens through the converted model's own vocabulary (the source row without
      its padding, per ``attention_mask``);
    * ``num_beams`` -> ``beam_size`` (CTranslate2's beam search stops when ``num_beams``
      hypotheses are finished: HF's ``early_stopping=True``), ``num_return_sequences`` ->
      ``num_hypotheses``;
    * ``max_length - 1`` (or ``max_new_tokens``) -> ``max_decoding_length`` and
      ``min_length - 1`` (or ``min_new_tokens``) -> ``min_decoding_length``: both count the
      generated tokens with EOS and the forced BOS, as HF counts them after the decoder
      start token;
    * ``forced_bos_token_id`` -> a one-token ``target_prefix``; ``forced_eos_token_id``: a
      row that reaches the length limit without EOS gets EOS as its last token (HF forces
      it at that step; identical for greedy);
    * ``length_penalty``, ``no_repeat_ngram_size``, ``repetition_penalty`` as they are;
      ``bad_words_ids`` -> ``suppress_sequences``.

    The result is HF's: ``torch.LongTensor [B * num_return_sequences, T]`` starting with
    the decoder start token, EOS kept, ``pad_token_id`` after it.

    Example (needs a converted folder, so not run as a doctest)::
        model, tok = load_ct2("runs/bench/peers/ctranslate2-int8", threads=1)
        model.generate(**tok(["some text"], return_tensors="pt"), num_beams=4, max_length=62)
    """

    main_input_name = "input_ids"

    def __init__(self, folder: str | os.PathLike, threads: int):
        import ctranslate2
        from transformers import AutoConfig, GenerationConfig

        self.folder = Path(folder)
        hf = self.folder / HF_DIR
        if not (self.folder / "model.bin").is_file() or not (hf / "config.json").is_file():
            raise DQToolError(f"{self.folder} is not a CTranslate2 peer folder (model.bin + hf/config.json): "
                              f"rebuild it with bench --peers ctranslate2-int8")
        self.translator = ctranslate2.Translator(str(self.folder), device="cpu", compute_type="default",
                                                 intra_threads=int(threads), inter_threads=1)
        self.config = AutoConfig.from_pretrained(str(hf))
        if (hf / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(str(hf))
        else:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        shared = _ct2_vocabulary(self.folder, "shared_vocabulary")
        self.source_vocab = shared or _ct2_vocabulary(self.folder, "source_vocabulary")
        self.target_vocab = shared or _ct2_vocabulary(self.folder, "target_vocabulary")
        if self.source_vocab is None or self.target_vocab is None:
            raise DQToolError(f"{self.folder} has no CTranslate2 vocabulary file: rebuild the peer")
        self.target_ids = {t: i for i, t in enumerate(self.target_vocab)}
        start = json.loads((self.folder / "config.json").read_text()).get("decoder_start_token")
        self._start_token = start
        self.device = torch.device("cpu")

    def eval(self) -> "CT2Seq2Seq":
        return self

    def to(self, device="cpu") -> "CT2Seq2Seq":
        if torch.device(device).type != "cpu":
            raise DQToolError("the CTranslate2 peer runs on CPU here: pass --device cpu")
        return self

    def __repr__(self) -> str:
        return f"CT2Seq2Seq({self.folder})"

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs) -> torch.Tensor:
        """HF-style ``generate`` (see the class docstring for the mapping)."""
        if input_ids is None:
            raise ValueError("generate needs input_ids [batch, source_length]")
        # HF's precedence and length rules, shared with the ONNX runtime (it only reads
        # self.config / self.generation_config).
        gc = resolve_generation_config(self, generation_config, kwargs)
        start = gc.decoder_start_token_id
        if self._start_token is not None and self.target_vocab[start] != self._start_token:
            raise ValueError(f"decoder_start_token_id {start} differs from the converted model's start token "
                             f"{self._start_token!r}: re-convert the model with the wanted start token")
        ids = torch.as_tensor(input_ids).cpu()
        if attention_mask is None:
            # HF: the mask comes from the pad token when the input holds it and it is not EOS.
            eos_ids = as_list(gc.eos_token_id)
            keep = ids != gc.pad_token_id if (gc.pad_token_id is not None and gc.pad_token_id not in eos_ids) \
                else torch.ones_like(ids, dtype=torch.bool)
        else:
            keep = torch.as_tensor(attention_mask).cpu().bool()
        source = [[self.source_vocab[i] for i in row[m].tolist()] for row, m in zip(ids, keep)]
        eos = as_list(gc.eos_token_id)
        max_new = gc.max_length - 1
        n_ret = gc.num_return_sequences or 1
        prefix = None
        if gc.forced_bos_token_id is not None:
            prefix = [[self.target_vocab[gc.forced_bos_token_id]]] * len(source)
        results = self.translator.translate_batch(
            source, prefix, beam_size=gc.num_beams, num_hypotheses=n_ret,
            length_penalty=gc.length_penalty if gc.length_penalty is not None else 1.0,
            repetition_penalty=gc.repetition_penalty or 1.0, no_repeat_ngram_size=gc.no_repeat_ngram_size or 0,
            suppress_sequences=[[self.target_vocab[i] for i in seq] for seq in gc.bad_words_ids or []] or None,
            end_token=[self.target_vocab[i] for i in eos] or None, return_end_token=True,
            max_input_length=0, max_decoding_length=max_new, min_decoding_length=max((gc.min_length or 0) - 1, 0))
        forced_eos = as_list(gc.forced_eos_token_id)
        rows = []
        for res in results:
            for hyp in res.hypotheses[:n_ret]:
                new = [self.target_ids[t] for t in hyp]
                if forced_eos and len(new) == max_new and new[-1] not in eos:
                    new[-1] = forced_eos[0]
                rows.append([start] + new)
        out = torch.full((len(rows), max(len(r) for r in rows)), gc.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out
