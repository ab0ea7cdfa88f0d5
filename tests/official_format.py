"""Official-format InternImage state dicts of any architecture, written from the official key layout.

The layout is the one of `classification/models/intern_image.py` (the `InternImage` constructor kwargs, L554-578):
norms built as `nn.Sequential` (`norm1.0.weight`, `patch_embed.norm1.1.weight`), layer scales `gamma1/2`, the
centre-feature-scale projection as two bare parameters, the conv head (`conv_head.*`) or, for H/G, the CLIP
projector (`dcnv3_head_x4`, `dcnv3_head_x3`, `clip_projector.*`, `fc_norm`; widths 1024 and 768 are fixed
constants there, L654). `tests/test_half_precision.py` checks it against the manifests of the released models.
Also the fixture models in that format (`tests/fixtures/models/<name>`): their official kwargs, and converted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from convert_checkpoints import config_from_official_kwargs, rename_official_key
from modeling_internimage import InternImageForImageClassification

FIXTURE_MODELS = Path(__file__).resolve().parent / "fixtures" / "models"

CLIP_WIDTH, CLIP_OUTPUT, CLIP_UPSAMPLE = 1024, 768, 4
# Tiny models with every flag of the H and G releases (H: res-post-norm; G: post-norm; both: depth-wise kernel 5,
# extra stage-3 norms, centre feature scale, attention pooler).
TINY_H_KWARGS = {
    "core_op": "DCNv3", "channels": 16, "depths": [1, 1, 4, 1], "groups": [1, 2, 4, 8], "num_classes": 5,
    "layer_scale": None, "offset_scale": 1.0, "post_norm": False, "mlp_ratio": 4.0, "res_post_norm": True,
    "dw_kernel_size": 5, "use_clip_projector": True, "level2_post_norm": True, "level2_post_norm_block_ids": [1, 3],
    "center_feature_scale": True, "remove_center": False,
}
TINY_G_KWARGS = {**TINY_H_KWARGS, "post_norm": True, "res_post_norm": False, "depths": [1, 1, 3, 1],
                 "level2_post_norm_block_ids": [0, 2], "groups": [2, 4, 8, 16]}


def official_state_dict(
    kwargs: dict, make: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The state dict of the official `InternImage(**kwargs)`, with tensors from `make(key, shape)` (default:
    seeded random values of a sensible scale: norm weights near 1, linear weights ~ 1/sqrt(fan_in), positive
    running variances)."""
    make = make or _random_maker(seed)
    channels, depths, groups = kwargs["channels"], kwargs["depths"], kwargs["groups"]
    points = 9 - int(kwargs.get("remove_center", False))
    dw_kernel = kwargs.get("dw_kernel_size") or 3
    stage_norm = not kwargs.get("post_norm", False) or kwargs.get("center_feature_scale", False)
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, width: int) -> None:
        shapes.update({f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)})

    def linear(prefix: str, out_width: int, in_width: int, bias: bool = True) -> None:
        shapes[f"{prefix}.weight"] = (out_width, in_width)
        if bias:
            shapes[f"{prefix}.bias"] = (out_width,)

    shapes.update({"patch_embed.conv1.weight": (channels // 2, 3, 3, 3), "patch_embed.conv1.bias": (channels // 2,)})
    norm("patch_embed.norm1.1", channels // 2)
    shapes.update({"patch_embed.conv2.weight": (channels, channels // 2, 3, 3), "patch_embed.conv2.bias": (channels,)})
    norm("patch_embed.norm2.1", channels)
    for level, (depth, group) in enumerate(zip(depths, groups)):
        width = channels * 2**level
        for block in range(depth):
            prefix = f"levels.{level}.blocks.{block}"
            if kwargs.get("layer_scale") is not None:
                shapes.update({f"{prefix}.gamma1": (width,), f"{prefix}.gamma2": (width,)})
            norm(f"{prefix}.norm1.0", width)
            shapes[f"{prefix}.dcn.dw_conv.0.weight"] = (width, 1, dw_kernel, dw_kernel)
            shapes[f"{prefix}.dcn.dw_conv.0.bias"] = (width,)
            norm(f"{prefix}.dcn.dw_conv.1.1", width)
            linear(f"{prefix}.dcn.offset", group * points * 2, width)
            linear(f"{prefix}.dcn.mask", group * points, width)
            linear(f"{prefix}.dcn.input_proj", width, width)
            linear(f"{prefix}.dcn.output_proj", width, width)
            if kwargs.get("center_feature_scale", False):
                shapes[f"{prefix}.dcn.center_feature_scale_proj_weight"] = (group, width)
                shapes[f"{prefix}.dcn.center_feature_scale_proj_bias"] = (group,)
            norm(f"{prefix}.norm2.0", width)
            hidden = int(width * kwargs.get("mlp_ratio", 4.0))
            linear(f"{prefix}.mlp.fc1", hidden, width)
            linear(f"{prefix}.mlp.fc2", width, hidden)
            if kwargs.get("res_post_norm", False):
                norm(f"{prefix}.res_post_norm1.0", width)
                norm(f"{prefix}.res_post_norm2.0", width)
        if stage_norm:
            norm(f"levels.{level}.norm.0", width)
        if level == 2 and kwargs.get("level2_post_norm", False):
            for index in range(len(kwargs["level2_post_norm_block_ids"])):
                norm(f"levels.{level}.post_norms.{index}.0", width)
        if level < len(depths) - 1:
            shapes[f"levels.{level}.downsample.conv.weight"] = (2 * width, width, 3, 3)
            norm(f"levels.{level}.downsample.norm.1", 2 * width)
    features = channels * 2 ** (len(depths) - 1)
    if kwargs.get("use_clip_projector", False):
        shapes.update({
            "dcnv3_head_x4.0.weight": (CLIP_WIDTH * CLIP_UPSAMPLE, features, 1, 1),
            "dcnv3_head_x4.0.bias": (CLIP_WIDTH * CLIP_UPSAMPLE,),
            "dcnv3_head_x3.weight": (CLIP_WIDTH, features // 2, 1, 1), "dcnv3_head_x3.bias": (CLIP_WIDTH,),
        })
        for name in ("q", "k", "v"):
            norm(f"clip_projector.norm1_{name}.0", CLIP_WIDTH)
        for name in ("q", "k", "v"):
            linear(f"clip_projector.cross_dcn.{name}", CLIP_WIDTH, CLIP_WIDTH, bias=False)
            shapes[f"clip_projector.cross_dcn.{name}_bias"] = (CLIP_WIDTH,)
        linear("clip_projector.cross_dcn.proj", CLIP_OUTPUT, CLIP_WIDTH)
        norm("fc_norm.0", CLIP_OUTPUT)
        head_width = CLIP_OUTPUT
    else:
        head_width = int(features * 1.5)
        shapes["conv_head.0.weight"] = (head_width, features, 1, 1)
        norm("conv_head.1.0", head_width)
        shapes.update({
            "conv_head.1.0.running_mean": (head_width,), "conv_head.1.0.running_var": (head_width,),
            "conv_head.1.0.num_batches_tracked": (),
        })
    if kwargs.get("num_classes", 1000) > 0:
        linear("head", kwargs.get("num_classes", 1000), head_width)
    return {key: make(key, shape) for key, shape in shapes.items()}


def _random_maker(seed: int) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key.endswith("num_batches_tracked"):
            return torch.tensor(1000, dtype=torch.int64)
        if key.endswith("running_var"):
            return torch.rand(shape, generator=generator) + 0.5
        values = torch.randn(shape, generator=generator)
        is_norm = ".norm" in key or "norm1_" in key or key.startswith(("fc_norm", "conv_head.1")) or "dw_conv.1" in key
        if (is_norm and key.endswith("weight")) or key.endswith(("gamma1", "gamma2")):
            return 1 + 0.1 * values
        if len(shape) <= 1:
            return 0.1 * values
        fan_in = torch.Size(shape[1:]).numel()
        return values / fan_in**0.5

    return make


def meta_maker(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def fixture_kwargs(name: str) -> dict:
    """The official `InternImage(**kwargs)` of the fixture model `name` (`tiny_t`, `tiny_l`)."""
    return json.loads((FIXTURE_MODELS / name / "official_args.json").read_text())["kwargs"]


def fixture_classifier(name: str) -> tuple[InternImageForImageClassification, torch.Tensor, dict]:
    """The official fixture model converted in memory, its input and the official outputs."""
    folder = FIXTURE_MODELS / name
    official = torch.load(folder / "checkpoint.pth", weights_only=True)["model"]
    model = InternImageForImageClassification(config_from_official_kwargs(fixture_kwargs(name), drop_path_rate=0.0))
    model.eval().load_state_dict({rename_official_key(k): v for k, v in official.items()}, strict=True)
    return model, torch.load(folder / "input.pt", weights_only=True), torch.load(folder / "expected.pt")
