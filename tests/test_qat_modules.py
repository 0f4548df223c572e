from dataclasses import replace
import pytest
import torch
import torch.nn as nn

from dqtool.stages.distill import DistillConfig, distill
from dqtool.base.errors import DQToolError
from dqtool.model.losses import LossConfig, distill_losses
from dqtool.model.qmodules import QuantEmbedding, QuantLinear, prepare
from dqtool.qmath.quant import fake_quant
from dqtool.model.registry import get_module, linears, spec_for
from dqtool.qmath.scheme import QuantScheme
from tiny import ARCHS, tiny_model

OFF = QuantScheme(w_bits=None, e_bits=None, a_bits=None)
ALL_TERMS = LossConfig(task=1, logits=1, hidden=1, attention=1, enc_last=1)  # logits: KL (default)


def _batch(vocab=300):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(4, vocab, (2, 5), generator=g)
    labels[1, 4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _outputs(model, batch):
    return model(**batch, output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_distillation_losses_zero_for_full_copy_without_quantization(arch, tiny_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    distill(tiny_dir(arch), tmp_path / "s", DistillConfig())
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_dir(arch), attn_implementation="eager").eval()
    student = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "s", attn_implementation="eager")
    prepare(student, OFF)
    student.train()  # step 0 of training (the tiny configs have no dropout)
    b = _batch()
    terms = distill_losses(_outputs(student, b), _outputs(teacher, b), ALL_TERMS,
                           {"encoder": [0, 1, 2, 3], "decoder": [0, 1, 2, 3]}, b["attention_mask"], b["labels"].ne(-100))
    assert set(terms) == {"task", "logits", "hidden", "attention", "enc_last", "total"}
    for k in ("logits", "hidden", "attention", "enc_last"):
        assert terms[k].item() == 0.0, k
    assert terms["task"].item() > 0
    mse = distill_losses(_outputs(student, b), _outputs(teacher, b), replace(ALL_TERMS, logits_kind="mse"),
                         {"encoder": [0, 1, 2, 3], "decoder": [0, 1, 2, 3]}, b["attention_mask"], b["labels"].ne(-100))
    assert mse["logits"].item() == 0.0


def test_losses_use_the_layer_map(tiny_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    distill(tiny_dir("bart"), tmp_path / "s", DistillConfig(encoder_layers=2, decoder_layers=1))
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_dir("bart"), attn_implementation="eager").eval()
    student = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    b = _batch()
    s, t = _outputs(student, b), _outputs(teacher, b)
    # Layer 0 of a copied student sees the same input as the teacher's layer 0: identical attention.
    assert torch.equal(s.encoder_attentions[0], t.encoder_attentions[0])
    terms = distill_losses(s, t, LossConfig(task=0, logits=0, hidden=0, attention=1, enc_last=0),
                           {"encoder": [0, 3], "decoder": [0]}, b["attention_mask"], None)
    wrong = distill_losses(s, t, LossConfig(task=0, logits=0, hidden=0, attention=1, enc_last=0),
                           {"encoder": [1, 2], "decoder": [2]}, b["attention_mask"], None)
    assert 0 < terms["attention"].item() < wrong["attention"].item()


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_swaps_every_quantized_module_and_keeps_parameters(arch):
    model = tiny_model(arch)
    spec = spec_for(model.config)
    before = {k: v for k, v in model.state_dict().items()}
    params_before = {id(p) for p in model.parameters()}
    names = list(linears(model, spec))
    prepare(model, QuantScheme.from_wea("4-8-8", act_clip="pact"))
    for n in names:
        assert isinstance(get_module(model, n), QuantLinear)
    assert isinstance(get_module(model, spec.token_embedding), QuantEmbedding)
    assert isinstance(get_module(model, spec.lm_head), QuantLinear)
    # HF parameter names and objects are unchanged; only learned clips are added.
    after = model.state_dict()
    assert set(before) <= set(after)
    assert all(k.endswith((".clip", ".calibrated")) for k in set(after) - set(before))
    assert params_before <= {id(p) for p in model.parameters()}
    # Tied lm_head is trained at the embedding's precision (the matrix export stores once).
    head = get_module(model, spec.lm_head)
    assert head.wspec == (model.dqtool_scheme.embedding_spec() if spec.lm_head_tied(model.config)
                          else model.dqtool_scheme.weight_spec())


def test_quantized_forward_uses_fake_quant_weights():
    lin = nn.Linear(16, 8)
    scheme = QuantScheme.from_wea("2-8-none")
    q = QuantLinear(lin, scheme.weight_spec(), None)
    x = torch.randn(3, 16)
    expected = torch.nn.functional.linear(x, fake_quant(lin.weight, scheme.weight_spec()), lin.bias)
    assert torch.equal(q(x), expected)
    assert fake_quant(lin.weight, scheme.weight_spec()).unique().numel() <= 3 * 8  # ternary per row
    assert not torch.equal(q(x), lin(x))


def test_quantized_model_generates_and_differs_from_float(tiny_dir):
    from transformers import AutoModelForSeq2SeqLM

    f = AutoModelForSeq2SeqLM.from_pretrained(tiny_dir("bart")).eval()
    q = prepare(AutoModelForSeq2SeqLM.from_pretrained(tiny_dir("bart")), QuantScheme.from_wea("2-2-8")).eval()
    b = _batch()
    with torch.no_grad():
        lf = f(**b).logits
        lq = q(**b).logits
        g = q.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=5)
    assert not torch.allclose(lf, lq)
    assert g.shape[0] == 2


def test_group_size_must_divide_width():
    with pytest.raises(DQToolError, match="group_size"):
        prepare(tiny_model("bart"), QuantScheme.from_wea("4-8-8", weight_granularity="group", weight_group_size=5))
