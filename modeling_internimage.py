"""PyTorch InternImage: large-scale vision foundation models with deformable convolutions (DCNv3).

Paper: "InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions" (CVPR 2023).
All blocks work on channels-last (batch, height, width, channels) tensors; the outputs are channels-first.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers import AutoBackbone
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging

try:
    from .configuration_internimage import InternImageConfig
    from .dcnv3_ops import dcnv3_core, dcnv3_core_pytorch, resolve_dcn_backend
except ImportError:
    from configuration_internimage import InternImageConfig
    from dcnv3_ops import dcnv3_core, dcnv3_core_pytorch, resolve_dcn_backend

logger = logging.get_logger(__name__)


def _to_channels_first(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states.permute(0, 3, 1, 2)


def _to_channels_last(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states.permute(0, 2, 3, 1)


def _softmax_last_dim(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension. On CPU, `torch.softmax` is slow for the short rows (P = 9) of the DCNv3
    masks, so there it runs as a few whole-tensor passes (the max is a constant shift and needs no gradient), in
    float32 for half-precision logits (whose passes are about 2x slower) and in place without autograd."""
    if logits.device.type != "cpu":
        return logits.softmax(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shifted = logits - logits.amax(-1, keepdim=True).detach()
    if torch.is_grad_enabled() and logits.requires_grad:
        exponentials = shifted.exp()
        return exponentials / exponentials.sum(-1, keepdim=True)
    exponentials = shifted.exp_()
    return exponentials.div_(exponentials.sum(-1, keepdim=True))


# oneDNN matrix products with the bias, a GELU or a residual add fused in (what inductor uses on CPU), when the
# build has them: for CPU inference they save the passes over the outputs that `F.linear` (bias copied into the output
# first), a separate GELU and a separate residual add make. bfloat16 only with AVX-512 (with AVX-512 BF16 or AMX its
# products are 3-6x faster than float32 ones; without AVX-512 oneDNN has no bfloat16 products and `F.linear` is kept).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_DTYPES = (
    (torch.float32, torch.bfloat16) if torch.backends.cpu.get_cpu_capability() == "AVX512" else (torch.float32,)
)
# The custom operators registered by this copy of the file, kept alive for the life of the process.
_DEFINITIONS: list = []


def _onednn_product(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gelu: bool,
) -> torch.Tensor:
    """`hidden_states @ weight.T + bias` in one oneDNN call, followed inside it by `residual +` or the exact GELU."""
    if residual is not None:
        return _ONEDNN_LINEAR.binary(hidden_states, residual, weight, bias, "add")
    if gelu:
        return _ONEDNN_LINEAR(hidden_states, weight, bias, "gelu", [], "none")
    return _ONEDNN_LINEAR(hidden_states, weight, bias, "none", [], "")


def _onednn_operator():
    """`_onednn_product` as the custom operator `internimage::onednn_linear`, which torch.compile keeps as one call
    (oneDNN's own operators have no fake implementation to trace them with). Registered once per process, like the
    DCNv3 operators."""
    if not hasattr(torch.ops.internimage, "onednn_linear"):
        operator = torch.library.custom_op("internimage::onednn_linear", _onednn_product, mutates_args=())
        operator.register_fake(
            lambda hidden_states, weight, *_: hidden_states.new_empty(*hidden_states.shape[:-1], weight.shape[0])
        )
        _DEFINITIONS.append(operator)
    return torch.ops.internimage.onednn_linear


if _ONEDNN_LINEAR is not None:
    _ONEDNN_OPERATOR = _onednn_operator()


def _onednn_dtype(hidden_states: torch.Tensor) -> bool:
    """Whether oneDNN's products suit this computation: CPU, not traced by torch.export (ONNX), and a dtype in
    `_ONEDNN_DTYPES` (the autocast dtype under CPU autocast)."""
    if _ONEDNN_LINEAR is None or hidden_states.device.type != "cpu" or torch.compiler.is_exporting():
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden_states.dtype
    return dtype in _ONEDNN_DTYPES


def _is_plain_linear(linear: nn.Module) -> bool:
    """An `nn.Linear` itself (not a replacement such as a LoRA or quantised layer) without forward hooks: computing
    its product from its parameters skips nothing the module would do."""
    hooks = (linear._forward_hooks, linear._forward_pre_hooks, _global_forward_hooks, _global_forward_pre_hooks)
    return type(linear) is nn.Linear and not any(hooks)


def _fuses_linears(hidden_states: torch.Tensor, *linears: nn.Linear) -> bool:
    """Whether `linears` may run as oneDNN products with fused post-operations (`_fused_linear`): no autograd."""
    needs_grad = hidden_states.requires_grad or any(linear.weight.requires_grad for linear in linears)
    if needs_grad and torch.is_grad_enabled():
        return False
    return _onednn_dtype(hidden_states) and all(_is_plain_linear(linear) for linear in linears)


class _BiasFusedLinear(torch.autograd.Function):
    """`F.linear` with autograd whose forward is one oneDNN product with the bias fused in (`F.linear` copies the
    bias into the whole output before the product on CPU); the backward is `F.linear`'s."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(hidden_states, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(hidden_states, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_states, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ hidden_states.reshape(-1, hidden_states.shape[-1])
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias


def _linear(
    hidden_states: torch.Tensor, linear: nn.Linear, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear(hidden_states)`, plus `residual` when given: the counterpart of `_fused_linear` with autograd. On CPU
    in float32 (no autocast) the bias is fused into the oneDNN product (about 5% of a training step)."""
    fuses_bias = (
        hidden_states.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and _onednn_dtype(hidden_states)
        and _is_plain_linear(linear)
    )
    if fuses_bias:
        output = _BiasFusedLinear.apply(hidden_states, linear.weight, linear.bias)
    else:
        output = linear(hidden_states)
    return output if residual is None else residual + output


def _fused_linear(
    hidden_states: torch.Tensor, linear: nn.Linear, gelu: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear(hidden_states)` as one oneDNN product (see `_fuses_linears`), followed inside it by the exact GELU or
    by `residual +`; under torch.compile as the custom operator. Under CPU autocast the operands are cast to the
    autocast dtype first, as `F.linear` would be, and a residual of another dtype (the float32 residual stream) is
    added after the product, in the promoted dtype."""
    weight, bias = linear.weight, linear.bias
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    product = _ONEDNN_OPERATOR if torch.compiler.is_compiling() else _onednn_product
    if residual is not None and residual.dtype != hidden_states.dtype:
        return residual + product(hidden_states, weight, bias, None, gelu)
    return product(hidden_states, weight, bias, residual, gelu)


class InternImageDropPath(nn.Module):
    """Stochastic depth per sample on the residual branch; identity in eval mode or with rate 0."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def sample_scale(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, ..., 1): 0 for the dropped samples and 1 / keep probability for the others; `None` when nothing
        is dropped."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        return hidden_states.new_empty(shape).bernoulli_(keep_prob).div_(keep_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale = self.sample_scale(hidden_states)
        return hidden_states if scale is None else hidden_states * scale

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class InternImageStem(nn.Module):
    """Two stride-2 3x3 convolutions with LayerNorms: (B, 3, H, W) -> (B, H/4, W/4, C) channels-last."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        half = config.channels // 2
        self.conv1 = nn.Conv2d(config.num_channels, half, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(half, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(half, config.channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(config.channels, eps=config.layer_norm_eps)
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.num_channels}, height, width), got {tuple(pixel_values.shape)};"
                " make sure the channel dimension of the pixel values matches `num_channels` in the configuration"
            )
        # A float16/bfloat16 model takes the image processor's float32 pixel values, as ViT and CLIP do.
        pixel_values = pixel_values.to(self.conv1.weight.dtype)
        hidden_states = self.norm1(_to_channels_last(self.conv1(pixel_values)))
        hidden_states = self.act(_to_channels_first(hidden_states))
        return self.norm2(_to_channels_last(self.conv2(hidden_states)))


class InternImageDownsample(nn.Module):
    """Stride-2 3x3 convolution doubling the width, then LayerNorm: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, config: InternImageConfig, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * channels, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_channels_last(self.conv(_to_channels_first(hidden_states))))


class InternImageDCNv3(nn.Module):
    """DCNv3: deformable convolution with shared projection weights and softmax-normalised modulation.

    Offsets and masks are predicted from a depth-wise convolution of the input; the values are sampled from the
    input projection. (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(self, config: InternImageConfig, channels: int, groups: int) -> None:
        super().__init__()
        self.channels = channels
        self.groups = groups
        self.group_channels = channels // groups
        self.kernel_size = config.dcn_kernel_size
        self.offset_scale = config.offset_scale
        self.remove_center = int(config.remove_center)
        self.num_points = self.kernel_size**2 - self.remove_center
        self.backend = config.dcn_backend

        self.input_proj = nn.Linear(channels, channels)
        self.dw_conv = nn.Conv2d(
            channels, channels, config.dw_kernel_size, padding=(config.dw_kernel_size - 1) // 2, groups=channels
        )
        self.dw_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.dw_act = ACT2FN[config.hidden_act]
        self.offset = nn.Linear(channels, groups * self.num_points * 2)
        self.mask = nn.Linear(channels, groups * self.num_points)
        self.output_proj = nn.Linear(channels, channels)
        self.center_feature_scale_proj = nn.Linear(channels, groups) if config.center_feature_scale else None

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); plus `residual` when given (added inside the output product on CPU)."""
        batch, height, width, _ = hidden_states.shape
        fused = _fuses_linears(hidden_states, self.input_proj, self.offset, self.mask, self.output_proj)
        project = _fused_linear if fused else _linear
        values = project(hidden_states, self.input_proj)
        features = _to_channels_last(self.dw_conv(_to_channels_first(hidden_states)))
        features = self.dw_act(self.dw_norm(features))
        offset = project(features, self.offset)
        mask = _softmax_last_dim(project(features, self.mask).view(batch, height, width, self.groups, self.num_points))
        mask = mask.view(batch, height, width, -1).to(values.dtype)
        pad = (self.kernel_size - 1) // 2
        output = dcnv3_core(
            values, offset, mask, kernel_h=self.kernel_size, kernel_w=self.kernel_size, stride_h=1, stride_w=1,
            pad_h=pad, pad_w=pad, dilation_h=1, dilation_w=1, group=self.groups, group_channels=self.group_channels,
            offset_scale=self.offset_scale, remove_center=self.remove_center, backend=self.backend,
        )
        if self.center_feature_scale_proj is not None:
            # Per group: output * (1 - scale) + values * scale.
            scale = self.center_feature_scale_proj(features).sigmoid().unsqueeze(-1)
            grouped = (batch, height, width, self.groups, self.group_channels)
            output = torch.lerp(output.view(grouped), values.view(grouped), scale.to(values.dtype)).flatten(-2)
        return project(output, self.output_proj, residual=residual)


class InternImageMLP(nn.Module):
    """Two-layer feed-forward network on channels-last tensors."""

    def __init__(self, config: InternImageConfig, channels: int) -> None:
        super().__init__()
        hidden = int(channels * config.mlp_ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, channels)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.exact_gelu = config.hidden_act == "gelu"  # the activation oneDNN can fuse into fc1

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); plus `residual` when given (added inside the second product on CPU)."""
        dropout_active = self.training and self.dropout.p > 0
        if self.exact_gelu and not dropout_active and _fuses_linears(hidden_states, self.fc1, self.fc2):
            hidden_states = _fused_linear(hidden_states, self.fc1, gelu=True)
            return _fused_linear(hidden_states, self.fc2, residual=residual)
        hidden_states = self.dropout(self.act(_linear(hidden_states, self.fc1)))
        hidden_states = self.dropout(_linear(hidden_states, self.fc2))
        return hidden_states if residual is None else residual + hidden_states


class InternImageLayer(GradientCheckpointingLayer):
    """One InternImage block: a DCNv3 branch and an MLP branch, each residual.

    Normalisation placement follows the config: pre-norm (`x + f(norm(x))`), post-norm (`x + norm(f(x))`) or
    res-post-norm (`x + norm'(f(norm(x)))`), with optional per-channel layer scales on the branches.
    """

    def __init__(self, config: InternImageConfig, channels: int, groups: int, drop_path: float) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.norm1 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.dcn = InternImageDCNv3(config, channels, groups)
        self.norm2 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.mlp = InternImageMLP(config, channels)
        self.drop_path = InternImageDropPath(drop_path)
        if config.layer_scale_init_value is not None:
            self.layer_scale1 = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))
            self.layer_scale2 = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))
        else:
            self.layer_scale1 = self.layer_scale2 = None
        if config.res_post_norm:
            self.res_post_norm1 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
            self.res_post_norm2 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        else:
            self.res_post_norm1 = self.res_post_norm2 = None

    def _residual(
        self,
        hidden_states: torch.Tensor,
        branch: nn.Module,
        norm: nn.Module,
        res_post_norm: nn.Module | None,
        layer_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.post_norm:
            update = norm(branch(hidden_states))
        else:
            update = branch(norm(hidden_states))
            if res_post_norm is not None:
                update = res_post_norm(update)
        # x + update * (layer scale * stochastic-depth scale), in one pass.
        scale = self.drop_path.sample_scale(update)
        if layer_scale is not None:
            scale = layer_scale if scale is None else layer_scale * scale
        return hidden_states + update if scale is None else torch.addcmul(hidden_states, update, scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        plain_pre_norm = not self.post_norm and self.layer_scale1 is None and self.res_post_norm1 is None
        if plain_pre_norm and (self.drop_path.drop_prob == 0.0 or not self.training):
            # x + f(norm(x)), with the residual added inside f's last matrix product where that is fused.
            hidden_states = self.dcn(self.norm1(hidden_states), residual=hidden_states)
            return self.mlp(self.norm2(hidden_states), residual=hidden_states)
        hidden_states = self._residual(hidden_states, self.dcn, self.norm1, self.res_post_norm1, self.layer_scale1)
        return self._residual(hidden_states, self.mlp, self.norm2, self.res_post_norm2, self.layer_scale2)


class InternImageStage(nn.Module):
    """A stage: blocks, optional extra norms after given blocks, a final norm, then the downsampling.

    `forward` returns the stage map (before downsampling) channels-first and the input of the next stage
    channels-last.
    """

    def __init__(
        self,
        config: InternImageConfig,
        channels: int,
        depth: int,
        groups: int,
        drop_path_rates: list[float],
        post_norm_block_ids: list[int] | None,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [InternImageLayer(config, channels, groups, drop_path_rates[i]) for i in range(depth)]
        )
        self.post_norm_block_ids = list(post_norm_block_ids or [])
        self.post_norms = nn.ModuleList(
            [nn.LayerNorm(channels, eps=config.layer_norm_eps) for _ in self.post_norm_block_ids]
        )
        has_norm = not config.post_norm or config.center_feature_scale
        self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps) if has_norm else None
        self.downsample = InternImageDownsample(config, channels) if downsample else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> the stage map (B, C, H, W) and the next stage's input (B, H/2, W/2, 2C).

        The downsampling reads the returned map itself (through a channels-last view of it), so the map is on the
        gradient path of everything computed after it.
        """
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if index in self.post_norm_block_ids:
                hidden_states = self.post_norms[self.post_norm_block_ids.index(index)](hidden_states)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        stage_map = _to_channels_first(hidden_states)
        next_input = self.downsample(_to_channels_last(stage_map)) if self.downsample is not None else None
        return stage_map, next_input


class InternImageEncoder(nn.Module):
    """The stages; returns every stage map (channels-first, before downsampling), each the tensor the next stage
    and the poolers read."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        total = sum(config.depths)
        if config.drop_path_type == "uniform":
            rates = [config.drop_path_rate] * total
        else:
            rates = torch.linspace(0, config.drop_path_rate, total, device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for index, (depth, groups, channels) in enumerate(zip(config.depths, config.groups, config.stage_channels)):
            self.stages.append(
                InternImageStage(
                    config,
                    channels,
                    depth,
                    groups,
                    rates[start : start + depth],
                    config.stage3_post_norm_block_ids if index == 2 else None,
                    downsample=index < config.num_stages - 1,
                )
            )
            start += depth

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """(B, H/4, W/4, C) channels-last stem output -> the stage maps (B, C*2^i, H/2^(i+2), W/2^(i+2))."""
        stage_maps = []
        for stage in self.stages:
            stage_map, hidden_states = stage(hidden_states)
            stage_maps.append(stage_map)
        return stage_maps


class InternImageConvPooler(nn.Module):
    """1x1 convolution widening the last stage, BatchNorm, activation and global average pooling: (B, ratio*8C)."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        channels = config.stage_channels[-1]
        self.conv = nn.Conv2d(channels, config.pooler_output_size, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(config.pooler_output_size, eps=config.batch_norm_eps)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, stage_maps: list[torch.Tensor]) -> torch.Tensor:
        """The channels-first stage maps -> (B, ratio*8C)."""
        hidden_states = self.act(self.norm(self.conv(stage_maps[-1])))
        return hidden_states.mean(dim=(2, 3))


class InternImageMeanQueryAttention(nn.Module):
    """`InternImageAttentionPooler`'s single-query cross-attention: the mean token attends to all tokens."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        dim = config.attention_pooler_hidden_size
        self.num_heads = config.attention_pooler_num_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.norm_query = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm_key = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm_value = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, config.attention_pooler_output_size)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        return tokens.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, output_size)."""
        query = self._split_heads(self.query(self.norm_query(tokens.mean(dim=1, keepdim=True))))
        key = self._split_heads(self.key(self.norm_key(tokens)))
        value = self._split_heads(self.value(self.norm_value(tokens)))
        attention = ((query * self.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        pooled = (attention @ value).transpose(1, 2).flatten(1)
        return self.output_proj(pooled)


class InternImageAttentionPooler(nn.Module):
    """H/G pooler ("CLIP projector"): the last stage upsampled by pixel shuffle plus the third stage, as tokens,
    attention-pooled and normalised: (B, attention_pooler_output_size)."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        dim = config.attention_pooler_hidden_size
        last, third = config.stage_channels[-1], config.stage_channels[-2]
        self.upsample_proj = nn.Conv2d(last, dim * 4, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.lateral_proj = nn.Conv2d(third, dim, kernel_size=1)
        self.attention = InternImageMeanQueryAttention(config)
        self.norm = nn.LayerNorm(config.attention_pooler_output_size, eps=config.layer_norm_eps)

    def forward(self, stage_maps: list[torch.Tensor]) -> torch.Tensor:
        """The channels-first stage maps -> (B, attention_pooler_output_size)."""
        third, last = stage_maps[-2], stage_maps[-1]
        upsampled = self.pixel_shuffle(self.upsample_proj(last))
        if upsampled.shape[-2:] != third.shape[-2:]:
            raise ValueError(
                f"The attention pooler adds the last stage upsampled 2x {tuple(upsampled.shape[-2:])} to the third"
                f" stage {tuple(third.shape[-2:])}; these differ for this input size. Use an image height and width"
                " that are multiples of 32."
            )
        tokens = (upsampled + self.lateral_proj(third)).flatten(2).transpose(1, 2)
        return self.norm(self.attention(tokens))


class InternImagePreTrainedModel(PreTrainedModel):
    """Weight initialisation (the official one) and loading conventions shared by the InternImage models."""

    config_class = InternImageConfig
    base_model_prefix = "internimage"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternImageLayer", "InternImageStem", "InternImageDownsample"]
    _supports_sdpa = False

    def __init__(self, config: InternImageConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        # `load_backbone` (UperNet, Mask2Former, ...) looks the backbone up in `AutoBackbone` by config class, without
        # trusting remote code. A folder's config class (loaded by `AutoConfig`) is not this file's own copy of it,
        # so map the class of every config a model is built from; other folders' configs are other classes.
        AutoBackbone.register(type(config), InternImageBackbone, exist_ok=True)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # For custom code, transformers treats a module without parameters of its own as already initialised; the
        # DCNv3 module has none but must re-initialise its children (zero offsets/masks, Xavier projections).
        # Loaded tensors stay untouched either way: the `init` functions skip them.
        super()._initialize_weights(module, is_custom_code=is_custom_code and not isinstance(module, InternImageDCNv3))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Linear: truncated normal, LayerNorm: (1, 0), convolutions and BatchNorm: PyTorch defaults, DCNv3:
        zero offsets/masks and Xavier projections, layer scales: `layer_scale_init_value`."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, InternImageDCNv3):
            for linear in (module.offset, module.mask):
                init.zeros_(linear.weight)
                init.zeros_(linear.bias)
            for linear in (module.input_proj, module.output_proj):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)
            if module.center_feature_scale_proj is not None:
                init.zeros_(module.center_feature_scale_proj.weight)
                init.zeros_(module.center_feature_scale_proj.bias)
        elif isinstance(module, InternImageLayer) and module.layer_scale1 is not None:
            init.constant_(module.layer_scale1, self.config.layer_scale_init_value)
            init.constant_(module.layer_scale2, self.config.layer_scale_init_value)


class InternImageModel(InternImagePreTrainedModel):
    """InternImage trunk: stem, four stages and (unless `pooler_type` is `None`) the pooler.

    Outputs: `last_hidden_state` (B, 8C, H/32, W/32), `pooler_output` (B, pooler_output_size) or `None`, and
    `hidden_states`, the four stage maps (B, C*2^i, H/2^(i+2), W/2^(i+2)) after each stage's norm and before
    downsampling; they are the tensors the rest of the network reads, so gradients reach them.

    The base model returns `hidden_states` unless called with `output_hidden_states=False`; the classifier and the
    backbone return them only when asked (by the call or by `config.output_hidden_states`).
    """

    # The head of a classification folder (and its pooler, for a model built with `pooler_type=None`).
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)pooler\.", r"^classifier\."]

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.embeddings = InternImageStem(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = InternImageEncoder(config)
        if config.pooler_type == "conv":
            self.pooler = InternImageConvPooler(config)
        elif config.pooler_type == "attention":
            self.pooler = InternImageAttentionPooler(config)
        else:
            self.pooler = None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images (see `CLIPImageProcessor`).
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_hidden_states = True if output_hidden_states is None else output_hidden_states
        stage_maps = self.encoder(self.dropout(self.embeddings(pixel_values)))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=stage_maps[-1],
            pooler_output=self.pooler(stage_maps) if self.pooler is not None else None,
            hidden_states=tuple(stage_maps) if output_hidden_states else None,
        )


class InternImageForImageClassification(InternImagePreTrainedModel):
    """InternImage with a linear classifier on the pooled features.

    `loss` follows `config.problem_type` (single-label cross-entropy, multi-label BCE or regression MSE).
    """

    accepts_loss_kwargs = False

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        if config.pooler_type is None:
            raise ValueError(
                "InternImageForImageClassification needs a pooler: set `pooler_type` to 'conv' or 'attention'"
            )
        self.num_labels = config.num_labels
        self.internimage = InternImageModel(config)
        if config.num_labels > 0:
            self.classifier = nn.Linear(config.pooler_output_size, config.num_labels)
        else:
            self.classifier = nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutputWithNoAttention:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, num_labels)` (cross-entropy), float targets for multi-label classification, or
            regression targets when `num_labels == 1`.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        outputs = self.internimage(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class InternImageBackbone(BackboneMixin, InternImagePreTrainedModel):
    """InternImage as a dense-prediction backbone: the stem and the stages, without pooler.

    `feature_maps` holds, for each name in `config.out_features`, the stem output (B, C, H/4, W/4) for `"stem"` or
    stage `i`'s map (B, C*2^(i-1), H/2^(i+1), W/2^(i+1)) for `"stage{i}"`: after the stage norm and before the
    downsampling, the same tensors as `InternImageModel`'s `hidden_states`. Each map is the tensor the later
    stages read, so gradients of anything computed from a later map reach it. The module names match
    `InternImageModel`, so classification checkpoints load into it. `config.frozen_stages` stages stay frozen.
    """

    has_attentions = False
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)pooler\.", r"^classifier\."]  # heads of classification folders

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.embeddings = InternImageStem(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = InternImageEncoder(config)
        self.num_features = [config.channels] + config.stage_channels
        self.post_init()
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        for stage in self.encoder.stages[: max(self.config.frozen_stages, 0)]:
            stage.eval()
            stage.requires_grad_(False)

    def train(self, mode: bool = True) -> InternImageBackbone:
        """Set the training mode; the frozen stages stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images (see `CLIPImageProcessor`).
        output_hidden_states (`bool`, *optional*):
            Also return `hidden_states`: the stem and the four stage maps, NCHW.
        """
        if output_attentions:
            raise ValueError("InternImage is a convolutional network and has no attentions to return")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        stem = _to_channels_first(self.embeddings(pixel_values))
        stage_maps = self.encoder(self.dropout(_to_channels_last(stem)))
        hidden_states = (stem, *stage_maps)
        feature_maps = tuple(hidden_states[self.stage_names.index(name)] for name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states if output_hidden_states else None)


# This file's own config class too, for configs built directly from it (see `InternImagePreTrainedModel.__init__`).
AutoBackbone.register(InternImageConfig, InternImageBackbone, exist_ok=True)

__all__ = [
    "InternImagePreTrainedModel",
    "InternImageModel",
    "InternImageForImageClassification",
    "InternImageBackbone",
    "dcnv3_core",
    "dcnv3_core_pytorch",
    "resolve_dcn_backend",
]
