"""Tiny models built from config for every supported architecture (no hub, CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("bart", "mbart", "marian", "pegasus", "t5", "t5v1_1")
VOCAB = 320  # byte-level BPE needs 256 bytes + specials + a few merges

_SENTENCES = [
    "the cat sat on the mat", "a library for parsing files", "development files for the library",
    "documentation for the package", "command line tool to convert images", "fast small and simple",
]


def tiny_config(arch: str, enc: int = 4, dec: int = 4):
    """A config of ``arch`` with d_model 16 and the given depths."""
    from transformers import BartConfig, MarianConfig, MBartConfig, PegasusConfig, T5Config

    common = dict(vocab_size=VOCAB, d_model=16, encoder_layers=enc, decoder_layers=dec,
                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                  decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    if arch == "bart":
        return BartConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                          forced_eos_token_id=2)
    if arch == "mbart":
        return MBartConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    if arch == "marian":
        return MarianConfig(**common, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                            decoder_vocab_size=VOCAB)
    if arch == "pegasus":
        return PegasusConfig(**common, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    if arch in ("t5", "t5v1_1"):
        gated = arch == "t5v1_1"
        return T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=enc, num_decoder_layers=dec,
                        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
                        pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    raise ValueError(arch)


def tiny_model(arch: str, enc: int = 4, dec: int = 4, seed: int = 0, **config):
    """A tiny model of ``arch``; ``config`` overrides config fields (e.g. ``d_model``)."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, enc, dec)
    for k, v in config.items():
        setattr(cfg, k, v)
    model = AutoModelForSeq2SeqLM.from_config(cfg)
    # Random, non-zero norms and biases so a copy from the wrong place cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE with BART's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_SENTENCES * 5, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def pack_tiny(root: Path, model, scheme) -> Path:
    """``model`` prepared with ``scheme``, saved as a QAT folder ``root/qat`` and converted to
    ``root/packed`` (float32 floats, one check sample); returns the packed folder."""
    from dqtool.formats.manifest import write_manifest
    from dqtool.formats.qat import save_qat
    from dqtool.model.qmodules import prepare
    from dqtool.stages.convert import ConvertConfig, convert

    prepare(model, scheme)
    (root / "qat").mkdir(parents=True)
    save_qat(model, tiny_tokenizer(), root / "qat", scheme)
    write_manifest(root / "qat", "qat", inputs={}, config={})
    convert(root / "qat", root / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    return root / "packed"


def save_tiny(path: Path, arch: str, enc: int = 4, dec: int = 4, seed: int = 0):
    """Save a tiny model with a tokenizer into ``path``; return the model."""
    model = tiny_model(arch, enc, dec, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


WORDS = "library tool files development data python module documentation server client game network".split()


def write_pairs(folder: Path, sizes=(("train", 48), ("validation", 8)), seed: int = 0) -> Path:
    """Write ``split.jsonl`` files of synthetic source/target pairs (the target is in the source)."""
    import json
    import random

    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                t = " ".join(rnd.choice(WORDS) for _ in range(3))
                f.write(json.dumps({"source": f"this package provides {t} and more", "target": t}) + "\n")
    return folder
