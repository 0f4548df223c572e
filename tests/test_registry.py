import pytest
import torch.nn as nn
from transformers import GPT2Config

from dqtool.base.errors import DQToolError
from dqtool.model.layermap import default_map
from dqtool.model.registry import get_module, linears, num_layers, spec_for, supported
from tiny import ARCHS, tiny_config, tiny_model

# Linear layers per layer: BART family enc 4 attn + 2 ffn, dec 8 attn + 2 ffn;
# T5 v1.0 adds wi/wo (2), v1.1 wi_0/wi_1/wo (3).
EXPECTED_LINEARS = {"bart": 6 + 10, "mbart": 16, "marian": 16, "pegasus": 16, "t5": 6 + 10, "t5v1_1": 7 + 11}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_registered_path_resolves(arch):
    cfg = tiny_config(arch, 2, 3)
    model = tiny_model(arch, 2, 3)
    spec = spec_for(cfg)
    emb = get_module(model, spec.token_embedding)
    assert isinstance(emb, nn.Embedding)
    for alias in spec.embedding_aliases:
        assert get_module(model, alias).weight is emb.weight
    assert (get_module(model, spec.lm_head).weight is emb.weight) == spec.lm_head_tied(cfg)
    for path in spec.position_embeddings:
        assert isinstance(get_module(model, path), nn.Embedding)
    for stack_name, stack in spec.stacks().items():
        layers = get_module(model, stack.layers_path)
        assert len(layers) == num_layers(cfg, stack) == (2 if stack_name == "encoder" else 3)
        for path in stack.norm_paths:
            assert hasattr(get_module(model, path), "weight")
        for name in stack.layer_norm_names:
            assert hasattr(get_module(layers[0], name), "weight")
        for name in stack.first_layer_only:
            get_module(layers[0], name)  # exists in layer 0 ...
            with pytest.raises(AttributeError):
                get_module(layers[1], name)  # ... and only there
    found = linears(model, spec)
    per_layer = {s: len([k for k in found if k.startswith(st.layers_path + ".0.")]) for s, st in spec.stacks().items()}
    assert per_layer["encoder"] + per_layer["decoder"] == EXPECTED_LINEARS[arch]
    assert per_layer["encoder"] * 2 + per_layer["decoder"] * 3 == len(found)
    # Every Linear inside the layer stacks is covered: nothing quantizable is forgotten.
    stack_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert stack_linears == set(found)


def test_unknown_architecture_lists_supported():
    with pytest.raises(DQToolError) as e:
        spec_for(GPT2Config())
    msg = str(e.value)
    assert "gpt2" in msg
    for name in supported():
        assert name in msg


@pytest.mark.parametrize("n_t,n_s,scheme,stack,expected", [
    (12, 6, "sft", "encoder", [0, 2, 4, 7, 9, 11]),
    (12, 6, "sft", "decoder", [0, 2, 4, 7, 9, 11]),
    (6, 3, "sft", "encoder", [0, 2, 5]),
    (6, 1, "sft", "encoder", [0]),
    (12, 1, "sft", "encoder", [0]),
    (12, 1, "sft", "decoder", [11]),   # a 1-layer decoder copies the last layer (the LM head's input)
    (3, 1, "sft", "decoder", [2]),
    (6, 1, "dqbart", "encoder", [5]),
    (6, 1, "dqbart", "decoder", [5]),
    (6, 2, "dqbart", "decoder", [0, 5]),
    (6, 6, "dqbart", "decoder", [0, 1, 2, 3, 4, 5]),
    (5, 3, "sft", "encoder", [0, 2, 4]),
])
def test_default_maps(n_t, n_s, scheme, stack, expected):
    assert default_map(n_t, n_s, scheme, stack) == expected
