"""dqtool.runtimes.ort: generation over optimum-layout ONNX folders equals Hugging Face's generate.

Tiny models are exported with optimum's ``main_export`` (about a second each). Most tiny
models of ``tests/tiny.py`` tie their output embedding to the input one, so greedy
decoding just repeats one token and every input gives the same output; the models
here untie it, draw every matrix at unit scale and scale the EOS row of the output layer,
so outputs depend on the input and rows end with EOS at different steps (padding and
finished beams are exercised). Token equality is exact: with these seeds and inputs the
smallest top-1/top-2 logit gap of the greedy runs is above 1e-4 (checked below), far
above the float noise between ONNX Runtime and torch (about 1e-6).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from dqtool.base.errors import DQToolError

ARCHS = ("bart", "t5", "marian")
# (scale of the EOS row of the output layer, added EOS logit bias) per architecture: makes EOS
# the top token now and then, so rows and beams finish at different steps (T5 has no bias).
EOS_TUNING = {"bart": (5.0, 2.0), "t5": (3.0, 0.0), "marian": (3.0, 2.0), "t5_pad0": (3.0, 0.0)}
LENGTHS = (9, 4, 12, 6, 7, 3)  # one padded batch of different source lengths


def _lively_model(arch: str, seed: int = 0):
    from tiny import tiny_config
    from transformers import AutoModelForSeq2SeqLM

    cfg = tiny_config("t5" if arch == "t5_pad0" else arch, 2, 2)
    cfg.tie_word_embeddings = False
    if arch == "t5_pad0":  # the special ids of real T5 checkpoints: pad 0 = decoder start, EOS 1
        cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id = 0, 1, 0
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if not p.requires_grad:  # Marian's sinusoidal positions: rebuilt by from_pretrained
                continue
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        scale, bias = EOS_TUNING[arch]
        model.get_output_embeddings().weight[cfg.eos_token_id] *= scale
        if bias:
            model.final_logits_bias[0, cfg.eos_token_id] += bias
        # Untied configs still share one tensor between the shared and the encoder/decoder
        # embeddings; save_pretrained would drop the copies and from_pretrained not re-tie them.
        for module in model.modules():
            emb = getattr(module, "embed_tokens", None)
            if isinstance(emb, torch.nn.Embedding):
                emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    return model


def _batch(pad_id: int = 1, eos_id: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(LENGTHS), max(LENGTHS)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(3, 300, (n,), generator=g)
        ids[row, n - 1] = eos_id
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Factory: ``(hf_model, onnx_folder)`` per architecture, exported once per module."""
    from optimum.exporters.onnx import main_export
    from tiny import tiny_tokenizer
    from transformers import AutoModelForSeq2SeqLM

    cache = {}

    def make(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"ort-{arch}")
            _lively_model(arch).save_pretrained(root / "hf")
            tiny_tokenizer().save_pretrained(root / "hf")
            main_export(str(root / "hf"), output=str(root / "onnx"), task="text2text-generation-with-past",
                        device="cpu")
            # The reference is the model as saved (what the exporter read), checked to round-trip.
            model = AutoModelForSeq2SeqLM.from_pretrained(root / "hf").eval()
            saved = _lively_model(arch).state_dict()
            assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
            cache[arch] = (model, root / "onnx")
        return cache[arch]

    return make


def _load(folder):
    from dqtool.runtimes.ort import OnnxSeq2Seq

    return OnnxSeq2Seq.from_folder(folder, threads=1)


def _both(hf, onnx, **kwargs):
    ids, mask = _batch(hf.config.pad_token_id, hf.config.eos_token_id)
    with torch.inference_mode():
        want = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = onnx.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return want, got


def _assert_same(want: torch.Tensor, got: torch.Tensor, what: str):
    assert got.dtype == torch.long, what
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != HF {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}:\nONNX {got.tolist()}\nHF   {want.tolist()}"


GREEDY = [
    {},  # everything from the generation config (max_length 20 -> 21 like HF, forced EOS for bart/marian)
    dict(num_beams=1, max_length=30),
    dict(num_beams=1, max_length=30, no_repeat_ngram_size=2),
    dict(num_beams=1, max_length=16, min_length=10),
    dict(num_beams=1, max_new_tokens=12, repetition_penalty=1.5, bad_words_ids=[[7], [40, 41]]),
    dict(num_beams=1, max_length=12, forced_bos_token_id=0),
]
BEAM = [
    dict(num_beams=3, max_length=30),
    dict(num_beams=3, max_length=30, no_repeat_ngram_size=2),
    dict(num_beams=3, max_length=30, min_length=8),
    dict(num_beams=3, max_length=30, length_penalty=2.0, early_stopping=True),
    dict(num_beams=3, max_length=30, no_repeat_ngram_size=2, min_length=6, length_penalty=2.0, early_stopping=True),
    dict(num_beams=4, max_length=24, length_penalty=0.5, early_stopping=False, num_return_sequences=2),
    dict(num_beams=3, max_new_tokens=15, early_stopping="never"),
    dict(num_beams=3, max_length=14, forced_bos_token_id=0, early_stopping=True),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(exported, arch):
    hf, folder = exported(arch)
    onnx = _load(folder)
    ended_early = 0
    for kwargs in GREEDY:
        want, got = _both(hf, onnx, **kwargs)
        _assert_same(want, got, f"{arch} greedy {kwargs}")
        ended_early += int((want[:, -1] == hf.config.pad_token_id).sum())
    assert ended_early > 0  # some rows hit EOS before the others and were padded

    # The precondition of exact equality: no near-ties between the top two logits.
    ids, mask = _batch()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_length=30, output_scores=True,
                          return_dict_in_generate=True)
    top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_matches_hf(exported, arch):
    hf, folder = exported(arch)
    onnx = _load(folder)
    ended_early = 0
    for kwargs in BEAM:
        want, got = _both(hf, onnx, **kwargs)
        _assert_same(want, got, f"{arch} beam {kwargs}")
        ended_early += int((want[:, -1] == hf.config.pad_token_id).sum())
    assert ended_early > 0  # some best beams finished before the others and were padded


def test_other_decoder_layouts(exported, tmp_path):
    """decoder_model + decoder_with_past (no merged file), and decoder_model alone (no cache)."""
    from dqtool.runtimes.ort import OnnxSeq2Seq

    hf, folder = exported("bart")
    onnx = OnnxSeq2Seq.from_folder(folder, threads=1, decoder="pair")  # all three files: the pair is chosen
    assert onnx.decoder_with_past is not None and onnx.uses_cache
    _assert_same(*_both(hf, onnx, num_beams=2, max_length=20), "pair chosen")
    pair = tmp_path / "pair"
    shutil.copytree(folder, pair)
    (pair / "decoder_model_merged.onnx").unlink()
    onnx = _load(pair)
    assert onnx.uses_cache and onnx.decoder_with_past is not None
    for kwargs in (dict(num_beams=1, max_length=30), dict(num_beams=3, max_length=30, no_repeat_ngram_size=2)):
        _assert_same(*_both(hf, onnx, **kwargs), f"pair {kwargs}")
    (pair / "decoder_with_past_model.onnx").unlink()
    onnx = _load(pair)
    assert not onnx.uses_cache
    for kwargs in (dict(num_beams=1, max_length=20), dict(num_beams=2, max_length=12)):
        _assert_same(*_both(hf, onnx, **kwargs), f"no cache {kwargs}")


def test_encode_and_decoder_step_match_torch(exported):
    hf, folder = exported("t5")
    onnx = _load(folder)
    ids, mask = _batch()
    with torch.inference_mode():
        enc_hf = hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        start = torch.full((ids.shape[0], 1), hf.config.decoder_start_token_id)
        dec_ids = torch.cat([start, torch.full_like(start, 17), torch.full_like(start, 40)], dim=1)
        logits_hf = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
    enc = onnx.encode(ids, mask)
    assert enc.shape == tuple(enc_hf.shape)
    np.testing.assert_allclose(enc[mask.bool().numpy()], enc_hf[mask.bool()].numpy(), atol=1e-4)
    cache = None
    for t in range(dec_ids.shape[1]):
        logits, cache = onnx.decoder_step(dec_ids[:, t:t + 1], enc, mask, cache)
        np.testing.assert_allclose(logits, logits_hf[:, t].numpy(), atol=1e-4)
        assert cache.length == t + 1
    assert cache.self_kv[0].shape[2] == 3 and cache.cross_kv[0].shape[2] == ids.shape[1]


def test_model_surface(exported):
    from dqtool.formats.onnx import is_onnx_folder
    from dqtool.runtimes.ort import load_onnx

    hf, folder = exported("marian")
    assert is_onnx_folder(folder) and not is_onnx_folder(folder.parent / "hf")
    model, tok = load_onnx(folder, threads=1)
    assert tok is not None and tok.pad_token_id == 1
    assert model.to("cpu") is model and model.to(torch.device("cpu")) is model and model.eval() is model
    assert model.config.model_type == "marian" and model.generation_config.decoder_start_token_id == 1
    with pytest.raises(DQToolError, match="--device cpu"):
        model.to("cuda")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True)
    with pytest.raises(ValueError, match="not supported"):
        model.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_beam_groups=2, diversity_penalty=1.0)
    with pytest.raises(ValueError, match="unknown arguments"):
        model.generate(input_ids=ids, attention_mask=mask, no_such_setting=3)
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(input_ids=ids, attention_mask=mask, logits_processor=[lambda i, s: s])
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True)
    # Ignored HF arguments, a missing attention mask (inferred from the pad token like HF),
    # and the generation config's own defaults when nothing is passed.
    with torch.inference_mode():
        want = hf.generate(input_ids=ids)
    got = model.generate(ids, use_cache=True, output_scores=False)
    _assert_same(want, got, "defaults without attention_mask")


def test_folder_without_onnx_files_is_one_clear_error(tmp_path, exported):
    from dqtool.runtimes.ort import OnnxSeq2Seq

    _, folder = exported("bart")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(DQToolError, match="encoder_model.onnx and decoder_model_merged.onnx"):
        OnnxSeq2Seq.from_folder(tmp_path)
    with pytest.raises(DQToolError, match="not found"):
        OnnxSeq2Seq.from_folder(tmp_path / "missing")
    only_onnx = tmp_path / "only-onnx"
    only_onnx.mkdir()
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        shutil.copy(folder / name, only_onnx / name)
    with pytest.raises(DQToolError, match="no config.json"):
        OnnxSeq2Seq.from_folder(only_onnx)


def test_t5_pad_id_zero(exported):
    """Pad id 0 (real T5): greedy pads finished rows with 0, beam search with EOS, as HF does."""
    hf, folder = exported("t5_pad0")
    onnx = _load(folder)
    for kwargs, fill in ((dict(num_beams=1, max_length=30), 0), (dict(num_beams=3, max_length=30), 1)):
        want, got = _both(hf, onnx, **kwargs)
        _assert_same(want, got, f"t5 pad 0 {kwargs}")
        assert (want[:, -1] == fill).any()


def test_project_tiny_folder(tiny_dir, tmp_path):
    """The shared tiny folder of tests/tiny.py (gated T5 v1.1) exports and generates like HF."""
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForSeq2SeqLM

    src = tiny_dir("t5v1_1", 2, 2)
    main_export(str(src), output=str(tmp_path), task="text2text-generation-with-past", device="cpu")
    hf = AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    onnx = _load(tmp_path)
    for kwargs in (dict(num_beams=1, max_length=20), dict(num_beams=3, max_length=20, no_repeat_ngram_size=2)):
        _assert_same(*_both(hf, onnx, **kwargs), f"t5v1_1 {kwargs}")


def test_topk_matches_a_full_stable_sort():
    from dqtool.runtimes.search import topk

    rng = np.random.default_rng(0)
    for n in (7, 300, 4096, 50265 * 4):
        for k in (1, 6, 12):
            x = rng.standard_normal((3, n)).astype(np.float32)
            x[1] = np.round(x[1] * 2) / 2  # many ties
            x[2, : n // 2] = -np.inf
            want = np.stack([np.lexsort((np.arange(n), -row))[:k] for row in x])
            np.testing.assert_array_equal(topk(x, k), want)


def test_kv_cache_reorder_moves_rows_in_place():
    from dqtool.runtimes.ort import KVCache

    kv = np.arange(4 * 2 * 3 * 2, dtype=np.float32).reshape(4, 2, 3, 2)
    cross = np.zeros((4, 2, 5, 2), dtype=np.float32)
    cache = KVCache([kv.copy(), kv.copy()], [cross], 3)
    order = np.array([1, 0, 0, 3])  # a swap and a duplicate
    cache.reorder(order)
    for a in cache.self_kv:
        np.testing.assert_array_equal(a, kv[order])
    assert cache.cross_kv[0] is cross
