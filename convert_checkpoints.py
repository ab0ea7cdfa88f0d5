"""Convert official InternImage checkpoints (.pth) into Hugging Face folders."""

from __future__ import annotations

import re

try:
    from .configuration_internimage import InternImageConfig
except ImportError:
    from configuration_internimage import InternImageConfig

# Official key pattern -> our key. Applied in order; the first match wins.
KEY_RULES: list[tuple[str, str]] = [
    (r"^patch_embed\.conv(\d)\.", r"internimage.embeddings.conv\1."),
    (r"^patch_embed\.norm(\d)\.1\.", r"internimage.embeddings.norm\1."),
    (
        r"^levels\.(\d+)\.blocks\.(\d+)\.(?:gamma|layer_scale)(\d)$",
        r"internimage.encoder.stages.\1.layers.\2.layer_scale\3",
    ),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.(norm\d|res_post_norm\d)\.0\.", r"internimage.encoder.stages.\1.layers.\2.\3."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.0\.", r"internimage.encoder.stages.\1.layers.\2.dcn.dw_conv."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.1\.1\.", r"internimage.encoder.stages.\1.layers.\2.dcn.dw_norm."),
    (
        r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.center_feature_scale_proj_(weight|bias)$",
        r"internimage.encoder.stages.\1.layers.\2.dcn.center_feature_scale_proj.\3",
    ),
    (
        r"^levels\.(\d+)\.blocks\.(\d+)\.(dcn\.(?:offset|mask|input_proj|output_proj)|mlp\.fc\d)\.",
        r"internimage.encoder.stages.\1.layers.\2.\3.",
    ),
    (r"^levels\.(\d+)\.norm\.0\.", r"internimage.encoder.stages.\1.norm."),
    (r"^levels\.(\d+)\.post_norms\.(\d+)\.0\.", r"internimage.encoder.stages.\1.post_norms.\2."),
    (r"^levels\.(\d+)\.downsample\.conv\.", r"internimage.encoder.stages.\1.downsample.conv."),
    (r"^levels\.(\d+)\.downsample\.norm\.1\.", r"internimage.encoder.stages.\1.downsample.norm."),
    (r"^conv_head\.0\.", r"internimage.pooler.conv."),
    (r"^conv_head\.1\.0\.", r"internimage.pooler.norm."),
    (r"^dcnv3_head_x4\.0\.", r"internimage.pooler.upsample_proj."),
    (r"^dcnv3_head_x3\.", r"internimage.pooler.lateral_proj."),
    (r"^clip_projector\.norm1_q\.0\.", r"internimage.pooler.attention.norm_query."),
    (r"^clip_projector\.norm1_k\.0\.", r"internimage.pooler.attention.norm_key."),
    (r"^clip_projector\.norm1_v\.0\.", r"internimage.pooler.attention.norm_value."),
    (r"^clip_projector\.cross_dcn\.q\.weight$", r"internimage.pooler.attention.query.weight"),
    (r"^clip_projector\.cross_dcn\.k\.weight$", r"internimage.pooler.attention.key.weight"),
    (r"^clip_projector\.cross_dcn\.v\.weight$", r"internimage.pooler.attention.value.weight"),
    (r"^clip_projector\.cross_dcn\.q_bias$", r"internimage.pooler.attention.query.bias"),
    (r"^clip_projector\.cross_dcn\.k_bias$", r"internimage.pooler.attention.key.bias"),
    (r"^clip_projector\.cross_dcn\.v_bias$", r"internimage.pooler.attention.value.bias"),
    (r"^clip_projector\.cross_dcn\.proj\.", r"internimage.pooler.attention.output_proj."),
    (r"^fc_norm\.0\.", r"internimage.pooler.norm."),
    (r"^head\.", r"classifier."),
]
_COMPILED_RULES = [(re.compile(pattern), replacement) for pattern, replacement in KEY_RULES]


def rename_official_key(key: str) -> str | None:
    """Our parameter name for an official state-dict key, or `None` if the key is not part of the model."""
    for pattern, replacement in _COMPILED_RULES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return None


def config_from_official_kwargs(kwargs: dict, **overrides) -> InternImageConfig:
    """Our config from the keyword arguments of the official `InternImage` constructor."""
    dw_kernel_size = kwargs.get("dw_kernel_size")
    use_clip = kwargs.get("use_clip_projector", False)
    fields = {
        "channels": kwargs.get("channels", 64),
        "depths": kwargs.get("depths", [3, 4, 18, 5]),
        "groups": kwargs.get("groups", [3, 6, 12, 24]),
        "mlp_ratio": kwargs.get("mlp_ratio", 4.0),
        "dw_kernel_size": dw_kernel_size if dw_kernel_size is not None else 3,
        "offset_scale": kwargs.get("offset_scale", 1.0),
        "remove_center": bool(kwargs.get("remove_center", False)),
        "center_feature_scale": kwargs.get("center_feature_scale", False),
        "layer_scale_init_value": kwargs.get("layer_scale"),
        "post_norm": kwargs.get("post_norm", False),
        "res_post_norm": kwargs.get("res_post_norm", False),
        "stage3_post_norm_block_ids": (
            kwargs.get("level2_post_norm_block_ids") if kwargs.get("level2_post_norm", False) else None
        ),
        "drop_path_rate": kwargs.get("drop_path_rate", 0.2),
        "drop_path_type": kwargs.get("drop_path_type", "linear"),
        "hidden_dropout_prob": kwargs.get("drop_rate", 0.0),
        "conv_pooler_ratio": kwargs.get("cls_scale", 1.5),
        "pooler_type": "attention" if use_clip else "conv",
        "num_labels": kwargs.get("num_classes", 1000),
    }
    fields.update(overrides)
    return InternImageConfig(**fields)
