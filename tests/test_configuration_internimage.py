"""InternImageConfig: transformers' ConfigTester, validation errors, the released variants, serialisation."""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
import unittest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from transformers_common import load_transformers_common_tests  # noqa: E402

from configuration_internimage import DCN_BACKENDS, VARIANTS, InternImageConfig, evaluation_transform  # noqa: E402

COMMON = load_transformers_common_tests()

# The architectures of the official release, written out from the official training configs
# (`classification/configs/internimage_*.yaml`, e.g. `internimage_t_1k_224.yaml` L5-12, over the defaults of
# `classification/config.py` L57-83) rather than derived from the configuration module's own table.
OFFICIAL_ARCHITECTURES = {
    "t": {
        "channels": 64, "depths": [4, 4, 18, 4], "groups": [4, 8, 16, 32], "layer_scale_init_value": None,
        "offset_scale": 1.0, "post_norm": False, "res_post_norm": False, "dw_kernel_size": 3,
        "stage3_post_norm_block_ids": None, "center_feature_scale": False, "pooler_type": "conv",
        "drop_path_rate": 0.1,
    },
    "s": {
        "channels": 80, "depths": [4, 4, 21, 4], "groups": [5, 10, 20, 40], "layer_scale_init_value": 1e-5,
        "offset_scale": 1.0, "post_norm": True, "res_post_norm": False, "dw_kernel_size": 3,
        "stage3_post_norm_block_ids": None, "center_feature_scale": False, "pooler_type": "conv",
        "drop_path_rate": 0.4,
    },
    "b": {
        "channels": 112, "depths": [4, 4, 21, 4], "groups": [7, 14, 28, 56], "layer_scale_init_value": 1e-5,
        "offset_scale": 1.0, "post_norm": True, "res_post_norm": False, "dw_kernel_size": 3,
        "stage3_post_norm_block_ids": None, "center_feature_scale": False, "pooler_type": "conv",
        "drop_path_rate": 0.5,
    },
    "l": {
        "channels": 160, "depths": [5, 5, 22, 5], "groups": [10, 20, 40, 80], "layer_scale_init_value": 1e-5,
        "offset_scale": 2.0, "post_norm": True, "res_post_norm": False, "dw_kernel_size": 3,
        "stage3_post_norm_block_ids": None, "center_feature_scale": False, "pooler_type": "conv",
        "drop_path_rate": 0.1,
    },
    "xl": {
        "channels": 192, "depths": [5, 5, 24, 5], "groups": [12, 24, 48, 96], "layer_scale_init_value": 1e-5,
        "offset_scale": 2.0, "post_norm": True, "res_post_norm": False, "dw_kernel_size": 3,
        "stage3_post_norm_block_ids": None, "center_feature_scale": False, "pooler_type": "conv",
        "drop_path_rate": 0.2,
    },
    "h": {
        "channels": 320, "depths": [6, 6, 32, 6], "groups": [10, 20, 40, 80], "layer_scale_init_value": None,
        "offset_scale": 1.0, "post_norm": False, "res_post_norm": True, "dw_kernel_size": 5,
        "stage3_post_norm_block_ids": [5, 11, 17, 23, 29], "center_feature_scale": True,
        "pooler_type": "attention", "drop_path_rate": 0.2,
    },
    "g": {
        "channels": 512, "depths": [2, 2, 48, 4], "groups": [16, 32, 64, 128], "layer_scale_init_value": None,
        "offset_scale": 1.0, "post_norm": True, "res_post_norm": False, "dw_kernel_size": 5,
        "stage3_post_norm_block_ids": [5, 11, 17, 23, 29, 35, 41, 47], "center_feature_scale": True,
        "pooler_type": "attention", "drop_path_rate": 0.4,
    },
}

# Release name -> (architecture, number of labels, evaluation resolution).
RELEASES = {
    "internimage_t_1k_224": ("t", 1000, 224),
    "internimage_s_1k_224": ("s", 1000, 224),
    "internimage_b_1k_224": ("b", 1000, 224),
    "internimage_l_22kto1k_384": ("l", 1000, 384),
    "internimage_xl_22kto1k_384": ("xl", 1000, 384),
    "internimage_h_22kto1k_384": ("h", 1000, 384),
    "internimage_h_22kto1k_640": ("h", 1000, 640),
    "internimage_g_22kto1k_512": ("g", 1000, 512),
    "internimage_l_22k_384": ("l", 21841, 384),
    "internimage_xl_22k_384": ("xl", 21841, 384),
    "internimage_h_jointto22k_384": ("h", 21841, 384),
    "internimage_g_jointto22k_384": ("g", 21841, 384),
}

# Shared by every release: `classification/models/build.py` L14-33 never passes the activation, the norm or the
# conv-head ratio, so the defaults of `classification/models/intern_image.py` L554-578 hold (GELU, LayerNorm with
# `build_norm_layer`'s eps 1e-6 (L33-54), conv-head ratio 1.5); every block builds its DCNv3 with kernel 3 (L373-386);
# MLP ratio 4 and no remove_center are the `classification/config.py` defaults (L57-83) no release changes.
SHARED_FIELDS = {
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "mlp_ratio": 4.0, "dcn_kernel_size": 3, "remove_center": False,
    "conv_pooler_ratio": 1.5, "num_channels": 3,
}


class InternImageConfigTest(unittest.TestCase):
    """transformers' `ConfigTester` on the default (T), a small custom and an H-style configuration."""

    @classmethod
    def setUpClass(cls) -> None:
        if COMMON.skip_reason:
            raise unittest.SkipTest(COMMON.skip_reason)

    def test_config_common_tests(self) -> None:
        for fields in (
            {},
            {"channels": 16, "depths": [1, 1, 2, 1], "groups": [2, 4, 8, 16], "image_size": 64},
            {
                "channels": 32, "depths": [1, 1, 2, 1], "groups": [2, 4, 8, 16], "res_post_norm": True,
                "dw_kernel_size": 5, "stage3_post_norm_block_ids": [1], "center_feature_scale": True,
                "pooler_type": "attention",
            },
        ):
            with self.subTest(**{key: str(value) for key, value in fields.items()}):
                tester = COMMON.ConfigTester(
                    self,
                    config_class=InternImageConfig,
                    has_text_modality=False,
                    common_properties=["num_channels", "channels", "depths", "groups", "num_hidden_layers"],
                    **fields,
                )
                tester.run_common_tests()


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field_named"),
    [
        ({"depths": [2, 2, 2], "groups": [4, 8, 16, 32]}, "groups"),
        ({"channels": 66}, "groups"),
        ({"groups": [3, 8, 16, 32]}, r"groups\[0\]"),
        ({"dcn_backend": "tensorrt"}, "dcn_backend"),
        ({"pooler_type": "mean"}, "pooler_type"),
        ({"dcn_kernel_size": 4}, "kernel_size"),
        ({"dw_kernel_size": 2}, "kernel_size"),
        ({"res_post_norm": True, "post_norm": True}, "res_post_norm"),
        ({"res_post_norm": True, "layer_scale_init_value": 1e-5}, "res_post_norm"),
        ({"drop_path_type": "cosine"}, "drop_path_type"),
        ({"stage3_post_norm_block_ids": [18]}, "stage3_post_norm_block_ids"),
        ({"pooler_type": "attention", "attention_pooler_num_heads": 5}, "attention_pooler_num_heads"),
    ],
)
def test_invalid_values_name_the_field(fields, field_named):
    with pytest.raises(ValueError, match=field_named):
        InternImageConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Released variants
# ---------------------------------------------------------------------------------------------------------------


def test_every_release_name_is_known():
    assert sorted(VARIANTS) == sorted(RELEASES)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_from_variant_matches_the_official_configs(name):
    architecture, num_labels, image_size = RELEASES[name]
    config = InternImageConfig.from_variant(name)
    assert config.num_labels == num_labels and len(config.id2label) == num_labels
    assert config.image_size == image_size
    assert config.label_set == ("imagenet-1k" if num_labels == 1000 else "imagenet-22k")
    expected = {**SHARED_FIELDS, **OFFICIAL_ARCHITECTURES[architecture]}
    assert {field: getattr(config, field) for field in expected} == expected


def test_variant_flags_that_set_the_families_apart():
    configs = {name: InternImageConfig.from_variant(name) for name in RELEASES}
    by_flag = {
        "offset_scale 2": {name for name, c in configs.items() if c.offset_scale == 2.0},
        "dw kernel 5": {name for name, c in configs.items() if c.dw_kernel_size == 5},
        "res_post_norm": {name for name, c in configs.items() if c.res_post_norm},
        "post_norm": {name for name, c in configs.items() if c.post_norm},
        "layer scale": {name for name, c in configs.items() if c.layer_scale_init_value is not None},
        "attention pooler": {name for name, c in configs.items() if c.pooler_type == "attention"},
    }
    families = {name: RELEASES[name][0] for name in RELEASES}
    expected = {
        "offset_scale 2": {"l", "xl"},
        "dw kernel 5": {"h", "g"},
        "res_post_norm": {"h"},
        "post_norm": {"s", "b", "l", "xl", "g"},
        "layer scale": {"s", "b", "l", "xl"},
        "attention pooler": {"h", "g"},
    }
    for flag, names in by_flag.items():
        assert {families[name] for name in names} == expected[flag], flag
        assert names == {name for name, family in families.items() if family in expected[flag]}, flag


def test_from_variant_keyword_arguments_override_the_release():
    config = InternImageConfig.from_variant("internimage_t_1k_224", num_labels=10, drop_path_rate=0.0)
    assert config.num_labels == 10 and config.drop_path_rate == 0.0 and config.channels == 64


def test_from_variant_does_not_share_state_between_calls():
    first = InternImageConfig.from_variant("internimage_h_22kto1k_640")
    first.stage3_post_norm_block_ids.append(31)
    first.depths[0] = 1
    second = InternImageConfig.from_variant("internimage_h_22kto1k_640")
    assert second.stage3_post_norm_block_ids == [5, 11, 17, 23, 29] and second.depths == [6, 6, 32, 6]


def test_unknown_variant_lists_the_names():
    with pytest.raises(ValueError, match="internimage_h_22kto1k_640") as error:
        InternImageConfig.from_variant("internimage_m_1k_224")
    assert "internimage_m_1k_224" in str(error.value)
    assert all(name in str(error.value) for name in RELEASES)


# ---------------------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["internimage_t_1k_224", "internimage_h_22kto1k_640", "internimage_g_jointto22k_384"])
def test_to_dict_from_dict_round_trip(name):
    config = InternImageConfig.from_variant(name, problem_type="single_label_classification")
    as_dict = config.to_dict()
    restored = InternImageConfig.from_dict(as_dict)
    assert restored.to_dict() == as_dict
    assert restored.stage3_post_norm_block_ids == config.stage3_post_norm_block_ids
    assert restored.num_labels == config.num_labels and restored.problem_type == "single_label_classification"
    assert as_dict["model_type"] == "internimage" and isinstance(as_dict["depths"], list)


def test_save_pretrained_round_trip(tmp_path):
    config = InternImageConfig(
        channels=32, depths=[1, 1, 2, 1], groups=[2, 4, 8, 16], center_feature_scale=True, remove_center=True,
        offset_scale=2.0, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )
    config.save_pretrained(tmp_path)
    restored = InternImageConfig.from_pretrained(tmp_path)
    assert restored.to_dict() == config.to_dict()
    assert restored.id2label == {0: "cat", 1: "dog"} and restored.remove_center is True
    assert restored.stage_channels == [32, 64, 128, 256] and restored.pooler_output_size == 384


def test_docstring_gives_every_field_with_its_default():
    """Each `__init__` argument is documented as `name (`type`, defaults to VALUE): ...` with its real default."""
    documented = {
        name: ast.literal_eval(default.replace("`", ""))
        for name, default in re.findall(r"^ {8}(\w+) \(`[^`]+`, defaults to (.+?)\): ", InternImageConfig.__doc__, re.M)
    }
    parameters = inspect.signature(InternImageConfig.__init__).parameters
    expected = {
        name: list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
        for name, parameter in parameters.items()
        if name not in ("self", "kwargs", "out_features", "out_indices")  # these two share one entry
    }
    assert documented == expected
    assert "out_features (`list[str]`, *optional*) / out_indices (`list[int]`, *optional*)" in InternImageConfig.__doc__


def test_docstring_example_runs():
    """The configuration's docstring example, line by line as written: a randomly initialised InternImage-T."""
    lines = [line.strip()[4:] for line in InternImageConfig.__doc__.splitlines() if line.strip().startswith(">>> ")]
    namespace = {}
    exec("\n".join(lines), namespace)
    model = namespace["model"]
    assert type(model).__name__ == "InternImageModel" and model.config.to_dict() == namespace["config"].to_dict()
    assert model.config.depths == [4, 4, 18, 4] and model.config.label_set == "imagenet-1k"


def test_backend_names_and_the_evaluation_transform_are_defined_once():
    """The op dispatches over the config's backend names; the converter and the trainer read one evaluation
    transform (ImageNet mean/std, resize and crop)."""
    import convert_checkpoints
    import dcnv3_ops
    import train_classification

    assert dcnv3_ops.BACKENDS is DCN_BACKENDS
    with pytest.raises(ValueError, match="dcn_backend"):
        InternImageConfig(dcn_backend="tensorrt")
    expected = evaluation_transform(384)
    assert expected["image_mean"] == [0.485, 0.456, 0.406] and expected["image_std"] == [0.229, 0.224, 0.225]
    assert convert_checkpoints.preprocessor_config(384) == {"image_processor_type": "CLIPImageProcessor", **expected}
    processor = train_classification.default_image_processor(384).to_dict()
    assert json.loads(json.dumps({key: processor[key] for key in expected})) == expected
