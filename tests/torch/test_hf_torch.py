"""Hugging Face ``transformers`` models in the PyTorch backend: torch.fx does not trace
them (masks, positions and caches are built with Python control flow on tensors), and
making a leaf of the module that fails (the whole ``LlamaModel``) would leave nothing to
equalize. The error says so and names the ONNX route (docs/transformers.rst); the model
is left as it was."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import cle_torch  # noqa: E402
from cle_torch import UntraceableModelError  # noqa: E402
from tests.helpers import torch_models as tm  # noqa: E402


class _HFStyle(nn.Module):
    """Control flow on a tensor's value, in a class that says it is Hugging Face's."""

    __module__ = "transformers.models.fake.modeling_fake"

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # (a mask built from the input's values)
            x = x * 2
        return self.fc2(torch.relu(self.fc1(x)))


def test_an_hf_model_that_does_not_trace_is_sent_to_the_onnx_route():
    with pytest.raises(UntraceableModelError) as info:
        cle_torch.equalize_model(_HFStyle().eval(), input_shapes=(2, 8))
    message = str(info.value)
    assert "Hugging Face transformers model" in message and "cle_onnx" in message
    assert "leaf_modules" in message  # the general hints stay


def test_other_untraceable_models_are_not_told_about_hugging_face():
    model, _ = tm.untraceable()
    with pytest.raises(UntraceableModelError) as info:
        cle_torch.equalize_model(model)
    assert "Hugging Face" not in str(info.value)


def test_a_real_hf_llama_fails_with_the_onnx_route_and_is_left_unchanged():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        use_cache=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (2, 8))
    with pytest.raises(UntraceableModelError) as info:
        cle_torch.equalize_model(model, dummy_input=ids)
    assert "Hugging Face transformers model" in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
