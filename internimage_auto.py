"""Register InternImage with the Auto classes, so models that build their backbone from a config find it.

`UperNetForSemanticSegmentation`, Mask2Former and the other users of `load_backbone` create the backbone through
`AutoBackbone.from_config(config.backbone_config)`, which only knows built-in model types. Call
`register_internimage()` once before building or loading such a model with an `InternImageConfig` backbone.
"""

from __future__ import annotations

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

try:
    from .configuration_internimage import InternImageConfig
    from .modeling_internimage import InternImageBackbone, InternImageForImageClassification, InternImageModel
except ImportError:
    from configuration_internimage import InternImageConfig
    from modeling_internimage import InternImageBackbone, InternImageForImageClassification, InternImageModel


def register_internimage() -> None:
    """Register `InternImageConfig` ("internimage") with `AutoConfig` and its models with `AutoModel`,
    `AutoModelForImageClassification` and `AutoBackbone`. Calling it again does nothing."""
    AutoConfig.register(InternImageConfig.model_type, InternImageConfig, exist_ok=True)
    AutoModel.register(InternImageConfig, InternImageModel, exist_ok=True)
    AutoModelForImageClassification.register(InternImageConfig, InternImageForImageClassification, exist_ok=True)
    AutoBackbone.register(InternImageConfig, InternImageBackbone, exist_ok=True)


__all__ = ["register_internimage"]
