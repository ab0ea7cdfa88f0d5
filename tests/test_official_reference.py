"""The frozen clean-room reference of the official model (`tests/official_reference.py`), which the CPU benchmark
measures the model against: official state dicts load into it strictly, it reproduces the official fixtures, its
key layout is that of every released architecture, and it agrees with our model on the H/G-style flags that the
fixtures do not cover."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from official_reference import InternImage

import modeling_internimage
from convert_checkpoints import config_from_official_kwargs, rename_official_key
from modeling_internimage import InternImageForImageClassification

MODELS = ("tiny_t", "tiny_l")
MANIFESTS = sorted((FIXTURES / "manifests").glob("*.json"))


def official_fixture(name: str) -> tuple[InternImage, torch.Tensor, dict[str, torch.Tensor]]:
    """The reference built from the fixture's official kwargs with its official checkpoint loaded strictly."""
    folder = FIXTURES / "models" / name
    model = InternImage(**json.loads((folder / "official_args.json").read_text())["kwargs"]).eval()
    model.load_state_dict(torch.load(folder / "checkpoint.pth", weights_only=True)["model"], strict=True)
    pixel_values = torch.load(folder / "input.pt", weights_only=True)
    return model, pixel_values, torch.load(folder / "expected.pt", weights_only=True)


@pytest.mark.parametrize("name", MODELS)
def test_reference_reproduces_the_official_fixtures(name):
    model, pixel_values, expected = official_fixture(name)
    with torch.no_grad():
        stem, stage_outputs = model.forward_features_seq_out(pixel_values)
        head_input = model.forward_head_input(pixel_values)
        logits = model(pixel_values)
        logits_f64 = model.double()(pixel_values.double())
    close = {"rtol": 0, "atol": 1e-4}
    torch.testing.assert_close(stem.permute(0, 3, 1, 2), expected["stem"], **close)
    for index, stage_output in enumerate(stage_outputs):
        torch.testing.assert_close(stage_output.permute(0, 3, 1, 2), expected[f"stage_{index}"], **close)
    torch.testing.assert_close(head_input, expected["head_input"], **close)
    torch.testing.assert_close(logits, expected["logits"], **close)
    # Float64 sampling grids: the official float64 forward with float64 reference grids.
    torch.testing.assert_close(logits_f64, expected["logits_f64ref"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_reference_has_the_key_layout_of_every_released_architecture(manifest):
    official = json.loads(manifest.read_text())
    with torch.device("meta"):
        model = InternImage(**official["constructor_kwargs"])
    assert [[key, list(value.shape)] for key, value in model.state_dict().items()] == official["state_dict"]


def reference_and_ours(seed: int, **kwargs) -> tuple[InternImage, InternImageForImageClassification]:
    """A randomised float64 reference (offsets of a few pixels, every norm and scale perturbed) and our model
    loaded from its state dict through the converter's key mapping."""
    torch.manual_seed(seed)
    reference = InternImage(num_classes=5, drop_path_rate=0.0, **kwargs).double().eval()
    with torch.no_grad():
        for key, tensor in reference.state_dict().items():
            if tensor.is_floating_point():
                tensor.normal_(1.0 if key.endswith(("norm.weight", ".0.weight", ".1.weight")) else 0.0, 0.3)
        for level in reference.levels:
            for block in level.blocks:
                block.dcn.offset.bias.normal_(0, 2.0)
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5)
    fields = {key: value for key, value in kwargs.items() if key not in ("pretrain_embed_dim", "clip_embed_dim")}
    config = config_from_official_kwargs(
        fields, num_labels=5, drop_path_rate=0.0,
        attention_pooler_hidden_size=kwargs.get("pretrain_embed_dim", 1024),
        attention_pooler_num_heads=kwargs.get("attnpool_num_heads", 16),
        attention_pooler_output_size=kwargs.get("clip_embed_dim", 768),
    )
    ours = InternImageForImageClassification(config).double().eval()
    ours.load_state_dict({rename_official_key(k): v for k, v in reference.state_dict().items()}, strict=True)
    return reference, ours


TINY = {"channels": 8, "depths": [1, 1, 3, 1], "groups": [2, 4, 8, 16]}
CLIP_HEAD = {"use_clip_projector": True, "pretrain_embed_dim": 16, "attnpool_num_heads": 2, "clip_embed_dim": 12}
FLAG_SETS = {
    # H: res-post-norm, dw kernel 5, centre feature scale, level-2 post norms, attention-pooling head.
    "h_style": {**TINY, **CLIP_HEAD, "res_post_norm": True, "dw_kernel_size": 5, "center_feature_scale": True,
                "level2_post_norm": True, "level2_post_norm_block_ids": [0, 2]},
    # G: post-norm with centre feature scale (so the levels keep their final norm).
    "g_style": {**TINY, **CLIP_HEAD, "post_norm": True, "dw_kernel_size": 5, "center_feature_scale": True,
                "level2_post_norm": True, "level2_post_norm_block_ids": [1]},
    # S/B: post-norm with layer scale; pre-norm with layer scale; remove_center with offset_scale 2.
    "s_style": {**TINY, "post_norm": True, "layer_scale": 1e-5},
    "pre_norm_layer_scale": {**TINY, "layer_scale": 0.5, "offset_scale": 0.5},
    "remove_center": {**TINY, "remove_center": True, "offset_scale": 2.0},
}


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_reference_agrees_with_the_model_on_every_flag(flags):
    reference, ours = reference_and_ours(0, **flags)
    pixel_values = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stem, stage_outputs = reference.forward_features_seq_out(pixel_values)
        logits = reference(pixel_values)
        outputs = ours(pixel_values, output_hidden_states=True)
    assert logits.abs().max() > 0.1
    for stage_output, hidden_state in zip(stage_outputs, outputs.hidden_states):
        torch.testing.assert_close(hidden_state, stage_output.permute(0, 3, 1, 2), rtol=0, atol=1e-9)
    torch.testing.assert_close(outputs.logits, logits, rtol=0, atol=1e-9)


def test_reference_training_mode_applies_stochastic_depth():
    torch.manual_seed(0)
    model = InternImage(**TINY, num_classes=3, drop_path_rate=0.5).train()
    pixel_values = torch.randn(4, 3, 32, 32)
    first, second = model(pixel_values), model(pixel_values)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(pixel_values), model(pixel_values), rtol=0, atol=0)


@pytest.fixture
def fused_linear_calls(monkeypatch):
    """Counts the oneDNN fused matrix products the model runs (0 where this torch build has none)."""
    calls = []
    fused_linear = modeling_internimage._fused_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("gelu", False) or kwargs.get("residual") is not None)
        return fused_linear(*args, **kwargs)

    monkeypatch.setattr(modeling_internimage, "_fused_linear", counting)
    return calls


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_cpu_inference_path_agrees_with_the_reference_in_float32(flags, fused_linear_calls):
    """Without autograd on CPU the blocks' linears run as oneDNN products with the bias, the GELU and (pre-norm)
    the residual fused in; the result stays the official model's within float32 rounding."""
    reference, ours = reference_and_ours(0, **flags)
    reference, ours = reference.float(), ours.float()
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values)
        logits = ours(pixel_values).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    if modeling_internimage._ONEDNN_LINEAR is not None:
        assert any(fused_linear_calls), "no fused product ran"
    fused_linear_calls.clear()
    ours(pixel_values).logits.sum().backward()  # with autograd: the plain modules
    assert not fused_linear_calls and ours.classifier.weight.grad is not None


@pytest.mark.parametrize("mode", ["bfloat16_model", "autocast"])
def test_cpu_bfloat16_inference_keeps_the_reference_predictions(mode, fused_linear_calls):
    reference, ours = reference_and_ours(0, **FLAG_SETS["h_style"])
    reference, ours = reference.float(), ours.float()
    pixel_values = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values)
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = ours(pixel_values).logits
        else:
            logits = ours.bfloat16()(pixel_values.bfloat16()).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=0.05 * expected.abs().max().item())
    fast_bfloat16 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert bool(fused_linear_calls) == (modeling_internimage._ONEDNN_LINEAR is not None and fast_bfloat16)


@pytest.mark.parametrize("flags", [FLAG_SETS["s_style"], FLAG_SETS["h_style"], TINY], ids=["s_style", "h_style", "t"])
def test_training_gradients_agree_with_the_reference(flags):
    """In float32 with autograd the blocks' linears fuse only the bias into the oneDNN product (with `F.linear`'s
    backward), and stochastic depth and layer scale are applied to the residual in one pass: the parameter
    gradients stay the official model's."""
    reference, ours = reference_and_ours(0, **flags)
    reference, ours = reference.float().train(), ours.float().train()
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 3])
    torch.nn.functional.cross_entropy(reference(pixel_values), labels).backward()
    torch.nn.functional.cross_entropy(ours(pixel_values).logits, labels).backward()
    reference_grads = {rename_official_key(k): p.grad for k, p in reference.named_parameters()}
    largest = max(grad.abs().max().item() for grad in reference_grads.values())
    for name, parameter in ours.named_parameters():
        expected = reference_grads[name]
        atol = 1e-4 * expected.abs().max().item() + 1e-6 * largest  # float32 rounding of the whole backward
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-3, atol=atol, msg=name)


def test_hooked_or_replaced_linears_are_called_as_modules():
    """A forward hook on a block's linear (reading the offsets, say) still fires, and a replaced linear (LoRA,
    quantisation) still runs, on the fused CPU path too."""
    reference, ours = reference_and_ours(0, **TINY)
    ours = ours.float()
    dcn = ours.internimage.encoder.stages[0].layers[0].dcn
    offsets = []
    dcn.offset.register_forward_hook(lambda module, args, output: offsets.append(output))
    doubled = torch.nn.Sequential(dcn.output_proj, torch.nn.Identity())
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = ours(pixel_values).logits
        assert len(offsets) == 1 and offsets[0].shape == (2, 16, 16, 2 * 9 * 2)
        dcn.output_proj = doubled
        doubled[1] = torch.nn.Hardtanh(-1e-3, 1e-3)  # a replacement that changes the output
        assert not torch.allclose(ours(pixel_values).logits, before)
