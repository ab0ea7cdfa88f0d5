"""InternImage model configuration and the table of released variants."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

DCN_BACKENDS = ("auto", "triton", "cuda", "pytorch")  # also the names `dcnv3_ops` dispatches over
POOLER_TYPES = ("conv", "attention", None)
DROP_PATH_TYPES = ("linear", "uniform")

_T = {"channels": 64, "depths": [4, 4, 18, 4], "groups": [4, 8, 16, 32], "drop_path_rate": 0.1}
_S = {
    "channels": 80, "depths": [4, 4, 21, 4], "groups": [5, 10, 20, 40], "layer_scale_init_value": 1e-5,
    "post_norm": True, "drop_path_rate": 0.4,
}
_B = {**_S, "channels": 112, "groups": [7, 14, 28, 56], "drop_path_rate": 0.5}
_L = {
    "channels": 160, "depths": [5, 5, 22, 5], "groups": [10, 20, 40, 80], "layer_scale_init_value": 1e-5,
    "offset_scale": 2.0, "post_norm": True, "drop_path_rate": 0.1,
}
_XL = {**_L, "channels": 192, "depths": [5, 5, 24, 5], "groups": [12, 24, 48, 96], "drop_path_rate": 0.2}
_H = {
    "channels": 320, "depths": [6, 6, 32, 6], "groups": [10, 20, 40, 80], "res_post_norm": True,
    "dw_kernel_size": 5, "stage3_post_norm_block_ids": [5, 11, 17, 23, 29], "center_feature_scale": True,
    "pooler_type": "attention", "drop_path_rate": 0.2,
}
_G = {
    "channels": 512, "depths": [2, 2, 48, 4], "groups": [16, 32, 64, 128], "post_norm": True, "dw_kernel_size": 5,
    "stage3_post_norm_block_ids": [5, 11, 17, 23, 29, 35, 41, 47], "center_feature_scale": True,
    "pooler_type": "attention", "drop_path_rate": 0.4,
}


def _release(arch: dict, labels: str, image_size: int, top1: float | None, params: str) -> dict[str, Any]:
    return {"arch": arch, "labels": labels, "image_size": image_size, "top1": top1, "params": params}


# Released checkpoints: architecture, label set, evaluation resolution and published ImageNet-1k top-1 / size.
VARIANTS: dict[str, dict[str, Any]] = {
    "internimage_t_1k_224": _release(_T, "imagenet-1k", 224, 83.5, "30M"),
    "internimage_s_1k_224": _release(_S, "imagenet-1k", 224, 84.2, "50M"),
    "internimage_b_1k_224": _release(_B, "imagenet-1k", 224, 84.9, "97M"),
    "internimage_l_22kto1k_384": _release(_L, "imagenet-1k", 384, 87.7, "223M"),
    "internimage_xl_22kto1k_384": _release(_XL, "imagenet-1k", 384, 88.0, "335M"),
    "internimage_h_22kto1k_384": _release(_H, "imagenet-1k", 384, None, "1.08B"),
    "internimage_h_22kto1k_640": _release(_H, "imagenet-1k", 640, 89.6, "1.08B"),
    "internimage_g_22kto1k_512": _release(_G, "imagenet-1k", 512, 90.1, "3B"),
    "internimage_l_22k_384": _release(_L, "imagenet-22k", 384, None, "263M"),
    "internimage_xl_22k_384": _release(_XL, "imagenet-22k", 384, None, "383M"),
    "internimage_h_jointto22k_384": _release(_H, "imagenet-22k", 384, None, "1.11B"),
    "internimage_g_jointto22k_384": _release(_G, "imagenet-22k", 384, None, "3.09B"),
}
NUM_LABELS = {"imagenet-1k": 1000, "imagenet-22k": 21841}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def evaluation_transform(image_size: int) -> dict[str, Any]:
    """`CLIPImageProcessor` arguments of the official evaluation transform (`classification/dataset/build.py`
    L274-296): the short side resized to `image_size` (bicubic, crop ratio 1.0), a centre crop, ImageNet mean/std."""
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


# The `auto_map` written into every saved config.json, so each Auto class loads the remote code.
AUTO_MAP = {
    "AutoConfig": "configuration_internimage.InternImageConfig",
    "AutoModel": "modeling_internimage.InternImageModel",
    "AutoModelForImageClassification": "modeling_internimage.InternImageForImageClassification",
    "AutoBackbone": "modeling_internimage.InternImageBackbone",
}


class InternImageConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of an InternImage model (CVPR 2023). The defaults give InternImage-T; `from_variant` gives each
    released architecture.

    Args:
        num_channels (`int`, defaults to 3): Channels of the input images.
        channels (`int`, defaults to 64): Width of the first stage; stage `i` has `channels * 2**i` channels.
        depths (`list[int]`, defaults to `[4, 4, 18, 4]`): Number of blocks in each stage.
        groups (`list[int]`, defaults to `[4, 8, 16, 32]`): DCNv3 groups in each stage; each must divide the width.
        mlp_ratio (`float`, defaults to 4.0): Hidden width of the block MLP relative to the stage width.
        dcn_kernel_size (`int`, defaults to 3): Kernel size of the deformable convolution (odd).
        dw_kernel_size (`int`, defaults to 3): Kernel of the depth-wise convolution that predicts offsets and masks.
        offset_scale (`float`, defaults to 1.0): Scale applied to the kernel grid and the learned offsets.
        remove_center (`bool`, defaults to `False`): Drop the centre sampling point of every DCNv3 group.
        center_feature_scale (`bool`, defaults to `False`): Blend the DCNv3 output with its projected input through
            a learned gate.
        layer_scale_init_value (`float`, defaults to `None`): Initial per-channel residual scales; `None`: no scales.
        post_norm (`bool`, defaults to `False`): Normalise each branch output instead of its input (S/B/L/XL/G).
        res_post_norm (`bool`, defaults to `False`): Pre-norm blocks with an extra norm on each branch output (H).
            Cannot be combined with `post_norm` or `layer_scale_init_value`.
        stage3_post_norm_block_ids (`list[int]`, defaults to `None`): Third-stage blocks followed by an extra LayerNorm
            (H/G).
        hidden_act (`str`, defaults to `"gelu"`): Activation of the stem, DCNv3 and MLP.
        layer_norm_eps (`float`, defaults to 1e-6): Epsilon of every LayerNorm.
        batch_norm_eps (`float`, defaults to 1e-5): Epsilon of the BatchNorm in the convolutional pooler.
        drop_path_rate (`float`, defaults to 0.1): Stochastic depth rate of the last block.
        drop_path_type (`str`, defaults to `"linear"`): `"linear"` (rate grows linearly over blocks) or `"uniform"`.
        hidden_dropout_prob (`float`, defaults to 0.0): Dropout after the stem and inside the MLPs.
        pooler_type (`str`, defaults to `"conv"`): `"conv"` (1x1 conv, BatchNorm, activation, average pooling: T..XL),
            `"attention"` (attention pooling of the last two stages: H/G) or `None` (no pooler: a backbone).
        conv_pooler_ratio (`float`, defaults to 1.5): Width of the convolutional pooler relative to the last stage.
        attention_pooler_hidden_size (`int`, defaults to 1024): Token width of the attention pooler.
        attention_pooler_num_heads (`int`, defaults to 16): Heads of the attention pooler.
        attention_pooler_output_size (`int`, defaults to 768): Width of the attention pooler output.
        dcn_backend (`str`, defaults to `"auto"`): DCNv3 implementation: `"auto"`, `"triton"`, `"cuda"` or
            `"pytorch"`. The environment variable `INTERNIMAGE_DCN_BACKEND` overrides it.
        image_size (`int`, defaults to 224): Resolution the weights were trained or fine-tuned at.
        initializer_range (`float`, defaults to 0.02): Std of the truncated normal initialiser of linear layers.
        label_set (`str`, defaults to `None`): Label set of the classification head (`"imagenet-1k"`...).
        out_features (`list[str]`, *optional*) / out_indices (`list[int]`, *optional*): Stages returned by
            `InternImageBackbone` (`"stem"`, `"stage1"`...`"stage4"`); defaults to the four stages.
        frozen_stages (`int`, defaults to -1): `InternImageBackbone` freezes its first `frozen_stages` stages (eval
            mode, `requires_grad=False`, downsampling included), as the official detection backbone; `-1` or `0`: none.

    Example:

    ```python
    >>> from configuration_internimage import InternImageConfig
    >>> from modeling_internimage import InternImageModel

    >>> config = InternImageConfig.from_variant("internimage_t_1k_224")  # or InternImageConfig(depths=[2, 2, 6, 2])
    >>> model = InternImageModel(config)  # random weights; `InternImageModel.from_pretrained(folder)` loads weights
    ```
    """

    model_type = "internimage"
    attribute_map = {"num_hidden_layers": "num_stages"}

    def __init__(
        self,
        num_channels: int = 3,
        channels: int = 64,
        depths: list[int] = (4, 4, 18, 4),
        groups: list[int] = (4, 8, 16, 32),
        mlp_ratio: float = 4.0,
        dcn_kernel_size: int = 3,
        dw_kernel_size: int = 3,
        offset_scale: float = 1.0,
        remove_center: bool = False,
        center_feature_scale: bool = False,
        layer_scale_init_value: float | None = None,
        post_norm: bool = False,
        res_post_norm: bool = False,
        stage3_post_norm_block_ids: list[int] | None = None,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        batch_norm_eps: float = 1e-5,
        drop_path_rate: float = 0.1,
        drop_path_type: str = "linear",
        hidden_dropout_prob: float = 0.0,
        pooler_type: str | None = "conv",
        conv_pooler_ratio: float = 1.5,
        attention_pooler_hidden_size: int = 1024,
        attention_pooler_num_heads: int = 16,
        attention_pooler_output_size: int = 768,
        dcn_backend: str = "auto",
        image_size: int = 224,
        initializer_range: float = 0.02,
        label_set: str | None = None,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        frozen_stages: int = -1,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.channels = channels
        self.depths = list(depths)
        self.groups = list(groups)
        self.mlp_ratio = mlp_ratio
        self.dcn_kernel_size = dcn_kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.offset_scale = offset_scale
        self.remove_center = bool(remove_center)
        self.center_feature_scale = center_feature_scale
        self.layer_scale_init_value = layer_scale_init_value
        self.post_norm = post_norm
        self.res_post_norm = res_post_norm
        self.stage3_post_norm_block_ids = list(stage3_post_norm_block_ids) if stage3_post_norm_block_ids else None
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.batch_norm_eps = batch_norm_eps
        self.drop_path_rate = drop_path_rate
        self.drop_path_type = drop_path_type
        self.hidden_dropout_prob = hidden_dropout_prob
        self.pooler_type = pooler_type
        self.conv_pooler_ratio = conv_pooler_ratio
        self.attention_pooler_hidden_size = attention_pooler_hidden_size
        self.attention_pooler_num_heads = attention_pooler_num_heads
        self.attention_pooler_output_size = attention_pooler_output_size
        self.dcn_backend = dcn_backend
        self.image_size = image_size
        self.initializer_range = initializer_range
        self.label_set = label_set
        self.frozen_stages = frozen_stages
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        super().__init__(**kwargs)
        self._validate()
        self._set_out_features(out_features, out_indices)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_channels(self) -> list[int]:
        """Width of each stage: `channels * 2**i`."""
        return [self.channels * 2**i for i in range(self.num_stages)]

    @property
    def pooler_output_size(self) -> int | None:
        """Width of `pooler_output` (the vector the classifier consumes), `None` without a pooler."""
        if self.pooler_type == "conv":
            return int(self.stage_channels[-1] * self.conv_pooler_ratio)
        if self.pooler_type == "attention":
            return self.attention_pooler_output_size
        return None

    def _validate(self) -> None:
        if len(self.groups) != len(self.depths):
            raise ValueError(f"`groups` has {len(self.groups)} entries but `depths` has {len(self.depths)}")
        for stage, (width, group) in enumerate(zip(self.stage_channels, self.groups)):
            if group < 1 or width % group != 0:
                raise ValueError(f"`groups[{stage}]`={group} does not divide the stage width {width} (`channels`)")
        if self.dcn_backend not in DCN_BACKENDS:
            raise ValueError(f"`dcn_backend` must be one of {DCN_BACKENDS}, got {self.dcn_backend!r}")
        if self.pooler_type not in POOLER_TYPES:
            raise ValueError(f"`pooler_type` must be one of {POOLER_TYPES}, got {self.pooler_type!r}")
        if self.drop_path_type not in DROP_PATH_TYPES:
            raise ValueError(f"`drop_path_type` must be one of {DROP_PATH_TYPES}, got {self.drop_path_type!r}")
        if self.dcn_kernel_size % 2 == 0 or self.dw_kernel_size % 2 == 0:
            raise ValueError("`dcn_kernel_size` and `dw_kernel_size` must be odd")
        if self.res_post_norm and (self.post_norm or self.layer_scale_init_value is not None):
            raise ValueError("`res_post_norm` cannot be combined with `post_norm` or `layer_scale_init_value`")
        if self.stage3_post_norm_block_ids is not None:
            if self.num_stages < 3 or any(not 0 <= i < self.depths[2] for i in self.stage3_post_norm_block_ids):
                raise ValueError(f"`stage3_post_norm_block_ids` {self.stage3_post_norm_block_ids} out of range")
        if self.pooler_type == "attention" and self.attention_pooler_hidden_size % self.attention_pooler_num_heads:
            raise ValueError("`attention_pooler_num_heads` must divide `attention_pooler_hidden_size`")
        if not isinstance(self.frozen_stages, int) or not -1 <= self.frozen_stages <= self.num_stages:
            raise ValueError(
                f"`frozen_stages` must be an integer from -1 (nothing frozen) to {self.num_stages}, got"
                f" {self.frozen_stages!r}"
            )

    def _set_out_features(self, out_features: list[str] | None, out_indices: list[int] | None) -> None:
        """Backbone outputs, by stage name or index (defaults: the four stages); stored by `BackboneConfigMixin`."""
        if out_features is None and out_indices is None:
            out_indices = list(range(1, len(self.stage_names)))
        self.set_output_features_output_indices(
            list(out_features) if out_features is not None else None,
            list(out_indices) if out_indices is not None else None,
        )

    @classmethod
    def from_variant(cls, name: str, **kwargs) -> InternImageConfig:
        """Configuration of a released checkpoint by its release name, e.g. `"internimage_t_1k_224"`.

        The label count, resolution and architecture follow the release; `kwargs` override any field.
        """
        if name not in VARIANTS:
            raise ValueError(f"Unknown InternImage variant {name!r}; choose one of {sorted(VARIANTS)}")
        variant = VARIANTS[name]
        fields = copy.deepcopy(variant["arch"])
        fields.update(
            image_size=variant["image_size"], label_set=variant["labels"], num_labels=NUM_LABELS[variant["labels"]]
        )
        fields.update(kwargs)
        return cls(**fields)


__all__ = ["AUTO_MAP", "InternImageConfig", "VARIANTS"]
