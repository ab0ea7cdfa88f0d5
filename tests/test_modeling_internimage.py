"""InternImageModel and InternImageForImageClassification: transformers' common model tests and behaviour tests.

`InternImageModelTest` runs transformers' own `ModelTesterMixin` on a tiny configuration (see
`tests/transformers_common.py` for where the mixin comes from). The pytest functions below check what the model
promises its users: output semantics, poolers, losses, head re-initialisation, gradient checkpointing, stochastic
depth, input validation, the official initialisation, float64, remote-code loading and the DCNv3 backend seam.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto import modeling_auto

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from official_format import fixture_classifier  # noqa: E402
from transformers_common import load_transformers_common_tests  # noqa: E402

import dcnv3_ops  # noqa: E402
from configuration_internimage import AUTO_MAP, InternImageConfig  # noqa: E402
from convert_checkpoints import model_code_files  # noqa: E402
from internimage_auto import register_internimage  # noqa: E402
from modeling_internimage import (  # noqa: E402
    InternImageBackbone,
    InternImageDCNv3,
    InternImageForImageClassification,
    InternImageLayer,
    InternImageModel,
    InternImageStage,
)

COMMON = load_transformers_common_tests()
CODE_FILES = model_code_files()


def tiny_config(**overrides) -> InternImageConfig:
    """A T-style model small enough for CPU tests: widths 8, 16, 32, 64 with 4 channels per DCNv3 group."""
    fields = {
        "channels": 8, "depths": [1, 1, 2, 1], "groups": [2, 4, 8, 16], "num_labels": 10, "image_size": 32,
        "drop_path_rate": 0.0,
    }
    fields.update(overrides)
    return InternImageConfig(**fields)


def tiny_attention_pooler_config(**overrides) -> InternImageConfig:
    """H/G-style tiny model: res-post-norm, dw kernel 5, centre feature scale, stage-3 post norms, attention pooler."""
    fields = {
        "res_post_norm": True, "dw_kernel_size": 5, "center_feature_scale": True, "stage3_post_norm_block_ids": [1],
        "pooler_type": "attention", "attention_pooler_hidden_size": 16, "attention_pooler_num_heads": 2,
    }
    fields.update(overrides)
    return tiny_config(**fields)


def pixels(batch: int = 2, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def seeded(model_class: type[nn.Module], config: InternImageConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(config).eval()


# ---------------------------------------------------------------------------------------------------------------
# transformers' common tests
# ---------------------------------------------------------------------------------------------------------------


class InternImageModelTester:
    """Builds the tiny configuration and inputs for `ModelTesterMixin` (the convnextv2 tester's pattern)."""

    def __init__(
        self,
        parent: unittest.TestCase,
        batch_size: int = 3,
        image_size: int = 32,
        num_channels: int = 3,
        channels: int = 8,
        depths: tuple[int, ...] = (1, 1, 2, 1),
        groups: tuple[int, ...] = (2, 4, 8, 16),
        num_labels: int = 10,
        is_training: bool = True,
        use_labels: bool = True,
    ) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.channels = channels
        self.depths = list(depths)
        self.groups = list(groups)
        self.num_labels = num_labels
        self.is_training = is_training
        self.use_labels = use_labels
        self.num_stages = len(depths)

    def get_config(self) -> InternImageConfig:
        return InternImageConfig(
            num_channels=self.num_channels,
            channels=self.channels,
            depths=self.depths,
            groups=self.groups,
            num_labels=self.num_labels,
            image_size=self.image_size,
            drop_path_rate=0.0,
        )

    def prepare_config_and_inputs(self) -> tuple[InternImageConfig, torch.Tensor, torch.Tensor | None]:
        pixel_values = COMMON.floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = COMMON.ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self) -> tuple[InternImageConfig, dict[str, torch.Tensor]]:
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config: InternImageConfig, pixel_values: torch.Tensor, labels) -> None:
        model = InternImageModel(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        stride = 2 ** (self.num_stages + 1)
        self.parent.assertEqual(
            result.last_hidden_state.shape,
            (self.batch_size, config.stage_channels[-1], self.image_size // stride, self.image_size // stride),
        )
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, int(1.5 * config.stage_channels[-1])))

    def create_and_check_for_image_classification(
        self, config: InternImageConfig, pixel_values: torch.Tensor, labels: torch.Tensor
    ) -> None:
        model = InternImageForImageClassification(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertEqual(result.loss.shape, ())


class InternImageModelTest(COMMON.ModelTesterMixin, unittest.TestCase):
    """transformers' `ModelTesterMixin` on InternImage; skipped tests are the ones that cannot apply to a CNN."""

    all_model_classes = (InternImageModel, InternImageForImageClassification)
    has_attentions = False
    test_resize_embeddings = False
    test_torch_exportable = False

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        # The mixin tells base models from task heads by transformers' auto mappings; register InternImage in them
        # for this class only, as if it were a model inside transformers.
        for names, class_name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "InternImageModel"),
            (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "InternImageForImageClassification"),
        ):
            patcher = mock.patch.dict(names, {InternImageConfig.model_type: class_name})
            patcher.start()
            cls.addClassCleanup(patcher.stop)
        patcher = mock.patch.dict(modeling_auto.MODEL_MAPPING._extra_content, {InternImageConfig: InternImageModel})
        patcher.start()
        cls.addClassCleanup(patcher.stop)

    def setUp(self) -> None:
        self.model_tester = InternImageModelTester(self)
        self.config_tester = COMMON.ConfigTester(
            self,
            config_class=InternImageConfig,
            has_text_modality=False,
            common_properties=["num_channels", "channels", "depths", "num_hidden_layers"],
            channels=16,
            depths=[1, 1, 1, 1],
            groups=[4, 4, 8, 8],
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    def test_model(self) -> None:
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self) -> None:
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    def test_hidden_states_output(self) -> None:
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        size = self.model_tester.image_size
        strides = [2 ** (i + 2) for i in range(config.num_stages)]
        expected = [(width, size // stride, size // stride) for width, stride in zip(config.stage_channels, strides)]
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with torch.no_grad():
                outputs = model(**inputs_dict, output_hidden_states=True)
            self.assertEqual([tuple(h.shape[1:]) for h in outputs.hidden_states], expected)

    @unittest.skip(reason="InternImage takes pixel values, it has no input embeddings")
    def test_inputs_embeds(self) -> None: ...

    @unittest.skip(reason="InternImage takes pixel values, it has no input embeddings")
    def test_model_get_set_embeddings(self) -> None: ...


class InternImageBackboneTest(COMMON.BackboneTesterMixin, unittest.TestCase):
    """transformers' `BackboneTesterMixin` on `InternImageBackbone`, with the model tests' tiny configuration."""

    all_model_classes = (InternImageBackbone,)
    config_class = InternImageConfig
    has_attentions = False

    def setUp(self) -> None:
        self.model_tester = InternImageModelTester(self)

    @unittest.skip(
        reason="its first check expects out_features=None to mean the last stage only; InternImage's config defaults "
        "to the four stage maps (dense-prediction heads such as UperNet take all four, as the official backbones "
        "return them). Its other checks are in test_out_features_and_out_indices."
    )
    def test_config(self) -> None: ...

    def test_out_features_and_out_indices(self) -> None:
        """`test_config`'s checks with InternImage's default (the four stage maps)."""
        config = InternImageConfig()
        self.assertEqual(config.stage_names, ["stem", "stage1", "stage2", "stage3", "stage4"])
        self.assertEqual((config.out_features, config.out_indices), (config.stage_names[1:], [1, 2, 3, 4]))
        for kwargs, features, indices in (
            ({"out_features": ["stem", "stage1"], "out_indices": [0, 1]}, ["stem", "stage1"], [0, 1]),
            ({"out_features": ["stage1", "stage3"]}, ["stage1", "stage3"], [1, 3]),
            ({"out_indices": [0, 2]}, ["stem", "stage2"], [0, 2]),
        ):
            config = InternImageConfig(**kwargs)
            self.assertEqual((config.out_features, config.out_indices), (features, indices))
        config.out_features = None  # after construction, None selects the last stage, as in transformers
        self.assertEqual((config.out_features, config.out_indices), (["stage4"], [4]))
        with self.assertRaises(ValueError):
            InternImageConfig(out_features=["stage1", "stage2"], out_indices=[0, 2])


# ---------------------------------------------------------------------------------------------------------------
# Backbone: the official stage maps, out_features, frozen stages, UperNet
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_t", "tiny_l"])
def test_backbone_loads_classifier_folder_and_matches_official_stages(name, tmp_path):
    classifier, pixel_values, expected = fixture_classifier(name)
    classifier.save_pretrained(tmp_path)
    backbone, info = InternImageBackbone.from_pretrained(
        tmp_path, out_features=["stem", "stage1", "stage2", "stage3", "stage4"], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not info["unexpected_keys"]  # the pooler and classifier are ignored on purpose
    assert not any(name.startswith("pooler") for name, _ in backbone.named_parameters())
    with torch.no_grad():
        outputs = backbone.eval()(pixel_values)
    references = [expected["stem"]] + [expected[f"stage_{i}"] for i in range(4)]
    assert backbone.channels == [reference.shape[1] for reference in references]
    for mine, reference in zip(outputs.feature_maps, references, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hidden_states = classifier.internimage(pixel_values).hidden_states
    for mine, reference in zip(outputs.feature_maps[1:], hidden_states, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_backbone_out_features_and_config_round_trip(tmp_path):
    config = InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], out_indices=[-1])
    assert config.out_features == ["stage4"]
    config.save_pretrained(tmp_path)
    reloaded = InternImageConfig.from_pretrained(tmp_path)
    assert reloaded.out_features == ["stage4"] and reloaded.stage_names == config.stage_names
    backbone = InternImageBackbone(InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16]))
    feature_maps = backbone(torch.randn(1, 3, 32, 64)).feature_maps
    assert [tuple(f.shape) for f in feature_maps] == [(1, 8, 8, 16), (1, 16, 4, 8), (1, 32, 2, 4), (1, 64, 1, 2)]
    with pytest.raises(ValueError, match="out_features must be a subset"):
        InternImageConfig(out_features=["stage5"])
    with pytest.raises(ValueError, match="frozen_stages"):
        InternImageConfig(frozen_stages=5)


def test_frozen_stages_follow_the_official_detection_backbone(tmp_path):
    config = InternImageConfig(
        channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], frozen_stages=2, drop_path_rate=0.0
    )
    InternImageBackbone(config).save_pretrained(tmp_path)
    backbone = InternImageBackbone.from_pretrained(tmp_path).train()
    for index, stage in enumerate(backbone.encoder.stages):
        frozen = index < 2
        assert all(p.requires_grad != frozen for p in stage.parameters()), index
        assert all(module.training != frozen for module in stage.modules()), index
    assert all(p.requires_grad for p in backbone.embeddings.parameters())  # the official code leaves the stem
    # A plain sum of a LayerNorm output does not depend on its input (zero gradient): weight the maps randomly.
    feature_maps = backbone(torch.randn(1, 3, 32, 32)).feature_maps
    sum((f * torch.randn_like(f)).sum() for f in feature_maps).backward()
    assert backbone.encoder.stages[0].layers[0].dcn.input_proj.weight.grad is None
    assert backbone.encoder.stages[2].layers[0].dcn.input_proj.weight.grad.abs().sum() > 0


def test_upernet_on_internimage_forward_backward_and_round_trip(tmp_path):
    from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation
    from transformers.backbone_utils import load_backbone

    register_internimage()
    register_internimage()  # idempotent
    backbone_config = InternImageConfig(channels=8, depths=[1, 1, 2, 1], groups=[2, 4, 8, 16], drop_path_rate=0.0)
    assert type(AutoBackbone.from_config(backbone_config)) is InternImageBackbone
    config = UperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_in_channels=32, num_labels=3)
    assert type(load_backbone(config)) is InternImageBackbone
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    outputs = model(pixel_values=pixel_values, labels=labels)
    assert outputs.logits.shape == (2, 3, 64, 64) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.embeddings.conv1.weight.grad.abs().sum() > 0
    assert model.backbone.encoder.stages[3].layers[0].dcn.output_proj.weight.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path / "upernet")
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    assert type(reloaded.backbone) is InternImageBackbone
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Outputs, losses, gradients
# ---------------------------------------------------------------------------------------------------------------


def test_common_tests_skip_with_the_reason_without_parameterized(monkeypatch):
    """Machines without `parameterized` (which transformers' common tests import) skip them and say why."""
    monkeypatch.delenv("CI", raising=False)  # under CI the same reason is a failure
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "parameterized"
                        else find_spec(name, *args))
    common = load_transformers_common_tests()
    assert "`parameterized`, which is not installed" in common.skip_reason
    with pytest.raises(unittest.SkipTest, match="parameterized"):
        common.ModelTesterMixin.setUpClass()


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def test_model_returns_the_four_stage_maps_by_default():
    config = tiny_config()
    model = seeded(InternImageModel, config)
    with torch.no_grad():
        outputs = model(pixels(size=64))
        without = model(pixels(size=64), output_hidden_states=False)
    assert [tuple(h.shape) for h in outputs.hidden_states] == [
        (2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)
    ]
    assert torch.equal(outputs.last_hidden_state, outputs.hidden_states[-1])
    assert without.hidden_states is None
    torch.testing.assert_close(without.last_hidden_state, outputs.last_hidden_state, rtol=0, atol=0)


def test_classifier_returns_stage_maps_only_when_asked():
    config = tiny_config()
    classifier = seeded(InternImageForImageClassification, config)
    with torch.no_grad():
        plain = classifier(pixels())
        asked = classifier(pixels(), output_hidden_states=True)
        trunk = classifier.internimage(pixels())
    assert plain.hidden_states is None
    assert len(asked.hidden_states) == 4
    for mine, reference in zip(asked.hidden_states, trunk.hidden_states):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    torch.testing.assert_close(plain.logits, classifier.classifier(trunk.pooler_output), rtol=0, atol=0)


def test_tuple_outputs_with_return_dict_false():
    config = tiny_config()
    model = seeded(InternImageModel, config)
    classifier = seeded(InternImageForImageClassification, config)
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        as_dict = model(pixels())
        as_tuple = model(pixels(), return_dict=False)
        short_tuple = model(pixels(), return_dict=False, output_hidden_states=False)
        logits_tuple = classifier(pixels(), return_dict=False)
        loss_tuple = classifier(pixels(), labels=labels, return_dict=False, output_hidden_states=True)
        reference = classifier(pixels(), labels=labels)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.pooler_output, rtol=0, atol=0)
    assert len(as_tuple[2]) == 4 and len(short_tuple) == 2
    assert len(logits_tuple) == 1
    torch.testing.assert_close(logits_tuple[0], reference.logits, rtol=0, atol=0)
    assert len(loss_tuple) == 3
    torch.testing.assert_close(loss_tuple[0], reference.loss, rtol=0, atol=0)
    assert len(loss_tuple[2]) == 4


@pytest.mark.parametrize("model_class", [InternImageModel, InternImageForImageClassification, InternImageBackbone])
@pytest.mark.parametrize("output_hidden_states", [True, False])
def test_config_return_dict_false_gives_the_output_as_a_tuple(model_class, output_hidden_states):
    """`config.return_dict=False`: the output's fields in order, `None` ones left out; `return_dict=True` wins."""
    model = seeded(model_class, tiny_config(return_dict=False))
    with torch.no_grad():
        as_tuple = model(pixels(), output_hidden_states=output_hidden_states)
        as_output = model(pixels(), output_hidden_states=output_hidden_states, return_dict=True)
    assert isinstance(as_tuple, tuple) and not isinstance(as_output, tuple)
    expected = tuple(value for value in as_output.values() if value is not None)
    assert len(as_tuple) == len(expected) == 2 + (model_class is InternImageModel) - (not output_hidden_states)
    torch.testing.assert_close(as_tuple, expected, rtol=0, atol=0)


def test_conv_pooler_output_is_one_and_a_half_times_the_last_stage_width():
    model = seeded(InternImageModel, tiny_config(channels=16, groups=[4, 8, 16, 32]))
    with torch.no_grad():
        pooled = model(pixels()).pooler_output
    assert pooled.shape == (2, int(1.5 * 8 * 16))


def test_attention_pooler_output():
    config = tiny_attention_pooler_config()
    model = seeded(InternImageModel, config)
    classifier = seeded(InternImageForImageClassification, config)
    with torch.no_grad():
        pooled = model(pixels(size=64)).pooler_output
        logits = classifier(pixels(size=64)).logits
    assert pooled.shape == (2, 768)
    assert logits.shape == (2, 10)
    # The pooler ends in a LayerNorm with weight 1 and bias 0 at init: every row has mean 0.
    torch.testing.assert_close(pooled.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)


def test_backbone_without_pooler():
    config = tiny_config(pooler_type=None)
    model = seeded(InternImageModel, config)
    with torch.no_grad():
        outputs = model(pixels())
    assert outputs.pooler_output is None
    assert outputs.last_hidden_state.shape == (2, 64, 1, 1)
    with pytest.raises(ValueError, match="pooler"):
        InternImageForImageClassification(config)


# ---------------------------------------------------------------------------------------------------------------
# Losses and heads
# ---------------------------------------------------------------------------------------------------------------


def test_single_label_loss_is_cross_entropy():
    classifier = seeded(InternImageForImageClassification, tiny_config())
    labels = torch.tensor([3, 9])
    with torch.no_grad():
        outputs = classifier(pixels(), labels=labels)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_multi_label_loss_is_binary_cross_entropy(problem_type):
    """Float targets mean multi-label classification, also when `problem_type` is not set."""
    classifier = seeded(InternImageForImageClassification, tiny_config(problem_type=problem_type))
    labels = (torch.rand(2, 10, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        outputs = classifier(pixels(), labels=labels)
    torch.testing.assert_close(outputs.loss, F.binary_cross_entropy_with_logits(outputs.logits, labels))


def test_regression_loss_is_mean_squared_error():
    classifier = seeded(InternImageForImageClassification, tiny_config(num_labels=1))
    labels = torch.tensor([0.5, -2.0])
    with torch.no_grad():
        outputs = classifier(pixels(), labels=labels)
    assert outputs.logits.shape == (2, 1)
    torch.testing.assert_close(outputs.loss, F.mse_loss(outputs.logits.squeeze(-1), labels))


def test_ignore_mismatched_sizes_reinitialises_the_head(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = seeded(InternImageForImageClassification, tiny_config(num_labels=10))
    trained.save_pretrained(tmp_path)

    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
        InternImageForImageClassification.from_pretrained(tmp_path, num_labels=5)
    reloaded = InternImageForImageClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)

    assert reloaded.config.num_labels == 5 and reloaded.classifier.weight.shape == (5, 96)
    assert torch.count_nonzero(reloaded.classifier.bias) == 0
    assert 0.01 < reloaded.classifier.weight.std().item() < 0.03  # trunc-normal(std 0.02), not the saved weights
    trunk = trained.internimage.state_dict()
    for name, tensor in reloaded.internimage.state_dict().items():
        assert torch.equal(tensor, trunk[name]), name


# ---------------------------------------------------------------------------------------------------------------
# Training behaviour
# ---------------------------------------------------------------------------------------------------------------


def _parameter_gradients(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(pixel_values, labels=labels).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = seeded(InternImageForImageClassification, tiny_config()).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    layers = [m for m in checkpointed.modules() if isinstance(m, InternImageLayer)]
    assert len(layers) == 5 and all(layer.gradient_checkpointing for layer in layers)

    forward_calls = []
    checkpointed.internimage.encoder.stages[0].layers[0].dcn.register_forward_hook(
        lambda *args: forward_calls.append(1)
    )
    labels = torch.tensor([2, 4])
    expected = _parameter_gradients(plain, pixels(), labels)
    actual = _parameter_gradients(checkpointed, pixels(), labels)

    assert len(forward_calls) == 2  # the block ran again during backward: checkpointing is really on
    assert expected.keys() == actual.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_stochastic_depth_only_in_train_mode():
    def two_runs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            torch.manual_seed(1)
            first = model(pixels()).last_hidden_state
            torch.manual_seed(2)
            second = model(pixels()).last_hidden_state
        return first, second

    dropping = seeded(InternImageModel, tiny_config(drop_path_rate=0.5))
    first, second = two_runs(dropping.train())
    assert not torch.allclose(first, second)
    first, second = two_runs(dropping.eval())
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Without stochastic depth, train mode is deterministic too: the difference above is the dropped paths.
    first, second = two_runs(seeded(InternImageModel, tiny_config(drop_path_rate=0.0)).train())
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Gradients through the returned maps (Grad-CAM and other attributions)
# ---------------------------------------------------------------------------------------------------------------


def _stage_norm_outputs(model: nn.Module) -> list[torch.Tensor]:
    """Filled, during the next forward, with each stage's final-norm output (the channels-last stage map)."""
    captured = []
    for module in model.modules():
        if isinstance(module, InternImageStage):
            module.norm.register_forward_hook(lambda norm, args, output: captured.append(output))
    return captured


@pytest.mark.parametrize("make_config", [tiny_config, tiny_attention_pooler_config], ids=["conv", "attention"])
def test_classifier_stage_maps_receive_the_gradient_of_a_logit(make_config):
    """`hidden_states[i].retain_grad()` then `logits[0, k].backward()`: every returned map gets d logit / d map, the
    gradient of the stage's own channels-last output (they used to get none: the network consumed another view)."""
    model = seeded(InternImageForImageClassification, make_config())
    norm_outputs = _stage_norm_outputs(model)
    outputs = model(pixels(size=64), output_hidden_states=True)
    logit = outputs.logits[0, 3]
    expected = torch.autograd.grad(logit, norm_outputs, retain_graph=True)  # before retain_grad, which it would fill
    for hidden_state in outputs.hidden_states:
        hidden_state.retain_grad()
    logit.backward()
    for index, (hidden_state, gradient) in enumerate(zip(outputs.hidden_states, expected)):
        assert hidden_state.grad is not None, f"stage {index + 1} map has no gradient"
        assert gradient.abs().sum() > 0
        torch.testing.assert_close(hidden_state.grad, gradient.permute(0, 3, 1, 2), rtol=0, atol=0)


def test_base_model_last_hidden_state_is_the_last_stage_map_on_the_gradient_path():
    model = seeded(InternImageModel, tiny_config())
    for output_hidden_states in (True, False):
        outputs = model(pixels(), output_hidden_states=output_hidden_states)
        maps = (outputs.last_hidden_state, *(outputs.hidden_states or ()))
        for hidden_state in maps:
            hidden_state.retain_grad()
        outputs.pooler_output[1].sum().backward()
        assert all(hidden_state.grad is not None and hidden_state.grad.abs().sum() > 0 for hidden_state in maps)
        if output_hidden_states:
            assert outputs.last_hidden_state is outputs.hidden_states[-1]


def test_backbone_feature_maps_are_on_the_gradient_path():
    """A dense head reads every feature map; each map, the stem's included, also feeds the later ones."""
    config = tiny_config(out_features=["stem", "stage1", "stage2", "stage3", "stage4"])
    model = seeded(InternImageBackbone, config)
    outputs = model(pixels(), output_hidden_states=True)
    assert all(feature is hidden for feature, hidden in zip(outputs.feature_maps, outputs.hidden_states))
    for feature_map in outputs.feature_maps:
        feature_map.retain_grad()
    outputs.feature_maps[-1].square().sum().backward()
    for feature_map in outputs.feature_maps:
        assert feature_map.grad is not None and feature_map.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_channel_count_is_a_clear_error():
    model = seeded(InternImageModel, tiny_config())
    with pytest.raises(ValueError, match="channel"):
        model(pixels(channels=1))


def test_attention_pooler_rejects_sizes_that_are_not_multiples_of_32():
    model = seeded(InternImageModel, tiny_attention_pooler_config())
    with pytest.raises(ValueError, match="multiples of 32"):
        model(pixels(batch=1, size=200))


# ---------------------------------------------------------------------------------------------------------------
# Initialisation: `classification/models/intern_image.py` L677-691, then each DCNv3 module's own reset
# (`classification/ops_dcnv3/modules/dcnv3.py` L308-316)
# ---------------------------------------------------------------------------------------------------------------


def test_init_weights_reproduces_the_official_initialisation():
    config = tiny_config(channels=32, groups=[4, 8, 16, 32], layer_scale_init_value=1e-5, post_norm=True)
    model = seeded(InternImageForImageClassification, config)
    dcn_linears = set()
    for module in model.modules():
        if isinstance(module, InternImageDCNv3):
            for linear in (module.offset, module.mask):
                assert torch.count_nonzero(linear.weight) == 0 and torch.count_nonzero(linear.bias) == 0
            for linear in (module.input_proj, module.output_proj):
                bound = math.sqrt(6 / (linear.in_features + linear.out_features))
                assert linear.weight.abs().max() <= bound
                assert linear.weight.abs().max() > 0.9 * bound  # uniform over the whole Xavier range
                assert torch.count_nonzero(linear.bias) == 0
            dcn_linears.update(id(m) for m in module.modules())
        elif isinstance(module, InternImageLayer):
            assert torch.equal(module.layer_scale1, torch.full_like(module.layer_scale1, 1e-5))
            assert torch.equal(module.layer_scale2, torch.full_like(module.layer_scale2, 1e-5))
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    other_linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in dcn_linears]
    assert len(other_linears) == 2 * sum(config.depths) + 1  # MLPs and the classifier
    weights = torch.cat([linear.weight.flatten() for linear in other_linears])
    assert abs(weights.std().item() - 0.02) < 0.001 and weights.abs().max() < 0.1
    assert all(torch.count_nonzero(linear.bias) == 0 for linear in other_linears)


def _box_filter(values: torch.Tensor, spacing: int) -> torch.Tensor:
    """Mean over the 3x3 neighbours `spacing` pixels apart, zero-padded: (B, H, W, C) -> (B, H, W, C)."""
    channels = values.shape[-1]
    kernel = torch.full((channels, 1, 3, 3), 1 / 9, dtype=values.dtype)
    filtered = F.conv2d(values.permute(0, 3, 1, 2), kernel, padding=spacing, dilation=spacing, groups=channels)
    return filtered.permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    ("offset_scale", "center_feature_scale"), [(1.0, False), (2.0, False), (1.0, True)]
)
def test_dcnv3_at_init_is_a_box_filter(offset_scale, center_feature_scale):
    config = tiny_config(offset_scale=offset_scale, center_feature_scale=center_feature_scale)
    dcn = seeded(InternImageModel, config).double().encoder.stages[1].layers[0].dcn
    hidden_states = torch.randn(2, 7, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        values = dcn.input_proj(hidden_states)
        expected = _box_filter(values, spacing=int(offset_scale))
        if center_feature_scale:
            expected = 0.5 * expected + 0.5 * values
        torch.testing.assert_close(dcn(hidden_states), dcn.output_proj(expected), rtol=0, atol=1e-12)


def test_float64_model_matches_float32():
    model = seeded(InternImageForImageClassification, tiny_attention_pooler_config())
    with torch.no_grad():
        logits32 = model(pixels(size=64)).logits
        logits64 = model.double()(pixels(size=64).double()).logits
    assert logits64.dtype == torch.float64
    torch.testing.assert_close(logits64.float(), logits32, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------------------------


def _backend_on_gpu(backend: str) -> str:
    """`backend`, or a skip when it cannot run on this machine's GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "triton" and not dcnv3_ops.triton_is_available():
        pytest.skip("triton is not installed")
    if backend == "cuda" and dcnv3_ops._cuda_extension_module() is None:
        pytest.skip("the dcnv3_cuda extension is not built (pip install ./dcnv3_cuda --no-build-isolation)")
    return backend


def check_nan_input_gives_nan_logits(backend: str, device: str) -> None:
    """A NaN pixel makes its own image's logits NaN, without raising (the NaN offsets it causes used to crash the
    PyTorch backend with an out-of-range index), and leaves the other image alone (eval mode)."""
    model = seeded(InternImageForImageClassification, tiny_config(dcn_backend=backend)).to(device)
    pixel_values = pixels().to(device)
    pixel_values[0, :, 5, 7] = float("nan")
    with torch.no_grad():
        logits = model(pixel_values).logits
    assert logits[0].isnan().all() and torch.isfinite(logits[1]).all()


def check_loss_scaler_skips_the_step_after_an_overflow(overflow: str, backend: str, device: str) -> None:
    """float16 autocast and a `GradScaler`: an overflow in the forward (huge pixels, or an offset projection whose
    output exceeds float16's 65504, i.e. infinite offsets) gives a non-finite loss, the scaler sees non-finite
    gradients and skips the step (parameters unchanged, scale halved) instead of the run crashing or stepping."""
    model = seeded(InternImageForImageClassification, tiny_config(dcn_backend=backend)).to(device).train()
    pixel_values = pixels().to(device)
    if overflow == "input":
        pixel_values = pixel_values * 1e6
    else:
        with torch.no_grad():
            model.internimage.encoder.stages[1].layers[0].dcn.offset.bias[0] = 1e5
    parameters = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    with torch.autocast(device, dtype=torch.float16):
        loss = model(pixel_values, labels=torch.tensor([1, 2], device=device)).loss
    assert not torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 512.0
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), parameters[name], rtol=0, atol=0, msg=name)


def test_nan_input_gives_nan_logits(backend_env):
    check_nan_input_gives_nan_logits("pytorch", "cpu")


@pytest.mark.parametrize("overflow", ["input", "offset"])
def test_float16_loss_scaler_skips_the_step_after_an_overflow(backend_env, overflow):
    check_loss_scaler_skips_the_step_after_an_overflow(overflow, "pytorch", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["pytorch", "triton", "cuda"])
def test_gpu_nan_input_gives_nan_logits(backend_env, backend):
    check_nan_input_gives_nan_logits(_backend_on_gpu(backend), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("overflow", ["input", "offset"])
@pytest.mark.parametrize("backend", ["pytorch", "triton", "cuda"])
def test_gpu_float16_loss_scaler_skips_the_step_after_an_overflow(backend_env, backend, overflow):
    check_loss_scaler_skips_the_step_after_an_overflow(overflow, _backend_on_gpu(backend), "cuda")


# ---------------------------------------------------------------------------------------------------------------
# Remote code
# ---------------------------------------------------------------------------------------------------------------

REMOTE_CODE_SCRIPT = """
import json, sys
import torch
from transformers import AutoModel, AutoModelForImageClassification
folder, pixels_path, result_path = sys.argv[1:]
pixel_values = torch.load(pixels_path)
results = {}
for auto_class in (AutoModel, AutoModelForImageClassification):
    model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    main = outputs.logits if hasattr(outputs, "logits") else outputs.pooler_output
    results[auto_class.__name__] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "main": main.tolist(),
        "hidden_states": [h.tolist() for h in outputs.hidden_states],
    }
json.dump(results, open(result_path, "w"))
"""


def test_remote_code_loading_in_a_fresh_hf_home(tmp_path):
    folder, scripts = tmp_path / "model", tmp_path / "scripts"
    scripts.mkdir()
    classifier = seeded(InternImageForImageClassification, tiny_config())
    classifier.config.auto_map = AUTO_MAP
    classifier.save_pretrained(folder)
    for name in CODE_FILES:
        shutil.copy(ROOT / name, folder / name)
    pixel_values = pixels()
    torch.save(pixel_values, tmp_path / "pixels.pt")
    (scripts / "load.py").write_text(REMOTE_CODE_SCRIPT)

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(scripts / "load.py"), str(folder), str(tmp_path / "pixels.pt"), str(tmp_path / "r")]
    completed = subprocess.run(command, cwd=scripts, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "r").read_text())

    with torch.no_grad():
        expected = classifier(pixel_values, output_hidden_states=True)
        pooled = classifier.internimage(pixel_values).pooler_output
    for auto_name, class_name, main in (
        ("AutoModel", "InternImageModel", pooled),
        ("AutoModelForImageClassification", "InternImageForImageClassification", expected.logits),
    ):
        loaded = results[auto_name]
        assert loaded["class"].startswith("transformers_modules.") and loaded["class"].endswith(class_name)
        torch.testing.assert_close(torch.tensor(loaded["main"]), main, rtol=0, atol=1e-6)
        for mine, reference in zip(loaded["hidden_states"], expected.hidden_states, strict=True):
            torch.testing.assert_close(torch.tensor(mine), reference, rtol=0, atol=1e-6)
    assert (tmp_path / "hf_home" / "modules" / "transformers_modules").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# DCNv3 backend seam
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def backend_env(monkeypatch):
    """No backend override from the caller's environment; the once-per-choice log is reset."""
    monkeypatch.delenv(dcnv3_ops.BACKEND_ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dcnv3_ops._log_choice.cache_clear()
    yield monkeypatch
    dcnv3_ops._log_choice.cache_clear()


def test_environment_variable_overrides_the_config_backend(backend_env):
    reference = seeded(InternImageModel, tiny_config())
    cuda_configured = seeded(InternImageModel, tiny_config(dcn_backend="cuda"))
    backend_env.setenv(dcnv3_ops.BACKEND_ENV_VAR, "pytorch")
    with torch.no_grad():
        torch.testing.assert_close(
            cuda_configured(pixels()).pooler_output, reference(pixels()).pooler_output, rtol=0, atol=0
        )


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_is_a_runtime_error_with_how_to(backend_env, backend):
    """A model on CPU asking for a GPU backend, with or without a GPU present: what to install, or what to use."""
    if backend == "cuda":
        installed = dcnv3_ops._cuda_extension_module() is not None
        how_to = "runs on CUDA tensors, got cpu tensors" if installed else "pip install ./dcnv3_cuda"
    else:
        how_to = "TRITON_INTERPRET=1" if dcnv3_ops.triton_is_available() else "pip install triton"
    model = seeded(InternImageModel, tiny_config(dcn_backend=backend))
    with pytest.raises(RuntimeError, match=f"'{backend}'.*({how_to})"):
        model(pixels())


def test_unknown_backend_is_a_value_error(backend_env):
    model = seeded(InternImageModel, tiny_config())
    backend_env.setenv(dcnv3_ops.BACKEND_ENV_VAR, "tensorrt")
    with pytest.raises(ValueError, match="tensorrt"):
        model(pixels())


def test_backend_choice_is_logged_once(backend_env, caplog):
    model = seeded(InternImageModel, tiny_config())
    with caplog.at_level(logging.INFO, logger=dcnv3_ops.logger.name), torch.no_grad():
        model(pixels())
        model(pixels())
    messages = [record.getMessage() for record in caplog.records if record.name == dcnv3_ops.logger.name]
    assert messages == ["InternImage DCNv3 backend: pytorch on cpu"]
