"""Frozen clean-room reference of the official InternImage classification model, for tests and benchmarks.

Written from the description of the official code (OpenGVLab/InternImage at 31c962d:
`classification/models/intern_image.py`, `classification/ops_dcnv3/modules/dcnv3.py` and
`classification/ops_dcnv3/functions/dcnv3_func.py`), not copied from it, and sharing no forward code with
`modeling_internimage.py`. It keeps the official module tree, so official state dicts (`checkpoint["model"]`) load
into it with `strict=True`, and the official formulation step by step: every norm is an `nn.Sequential` with its
permutes (`build_norm_layer`, intern_image.py L33-54), the DCNv3 module permutes around its depth-wise convolution
and runs the `grid_sample` core op (`dcnv3_oracle.oracle_dcnv3_core`), the conv head pools after its 1x1
convolution, and the H/G "CLIP projector" head attention-pools the last two stages.

This is the yardstick `benchmarks/bench_cpu.py` measures the model against: it must not get faster when the model
does, so it is never optimised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dcnv3_oracle import oracle_dcnv3_core
from torch import nn

LAYER_NORM_EPS = 1e-6  # build_norm_layer's default, used by every LayerNorm of the model (intern_image.py L33)


class ToChannelsFirst(nn.Module):
    """(B, H, W, C) -> (B, C, H, W)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """(B, C, H, W) -> (B, H, W, C)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.permute(0, 2, 3, 1)


def build_layer_norm(
    channels: int, in_format: str = "channels_last", out_format: str = "channels_last"
) -> nn.Sequential:
    """LayerNorm with the permutes its formats need, as in the official `build_norm_layer(dim, 'LN', ...)`: the
    LayerNorm sits at index 1 after a leading permute (keys `.1.weight`), else at index 0."""
    layers = [ToChannelsLast()] if in_format == "channels_first" else []
    layers.append(nn.LayerNorm(channels, eps=LAYER_NORM_EPS))
    if out_format == "channels_first":
        layers.append(ToChannelsFirst())
    return nn.Sequential(*layers)


class DropPath(nn.Module):
    """Per-sample stochastic depth on the residual branch (timm's `DropPath`, scaled by 1 / keep probability)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        keep = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1))
        return hidden_states * keep.bernoulli_(keep_prob) / keep_prob


class StemLayer(nn.Module):
    """conv1 (stride 2) -> LN -> GELU -> conv2 (stride 2) -> LN: (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = build_layer_norm(out_chans // 2, "channels_first", "channels_first")
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_layer_norm(out_chans, "channels_first", "channels_last")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act(self.norm1(self.conv1(pixel_values)))
        return self.norm2(self.conv2(hidden_states))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 convolution without bias, then LN: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_layer_norm(2 * channels, "channels_first", "channels_last")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(hidden_states.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, on channels-last tensors."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.drop(self.act(self.fc1(hidden_states)))
        return self.drop(self.fc2(hidden_states))


class DCNv3(nn.Module):
    """The official `DCNv3_pytorch` module: (B, H, W, C) -> (B, H, W, C), with the `grid_sample` core op.

    Offsets and masks come from the depth-wise convolution (+ LN + GELU) of the module input; the sampled values
    from `input_proj` of it. The centre feature scale, when enabled, blends the sampled output with the projected
    input per group, with its weights stored as the raw parameters `center_feature_scale_proj_{weight,bias}`.
    """

    def __init__(
        self,
        channels: int,
        group: int,
        offset_scale: float,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
        self.channels = channels
        self.group = group
        self.group_channels = channels // group
        self.kernel_size = kernel_size
        self.offset_scale = offset_scale
        self.remove_center = int(remove_center)
        self.num_points = kernel_size * kernel_size - self.remove_center
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels),
            build_layer_norm(channels, "channels_first", "channels_last"),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * self.num_points * 2)
        self.mask = nn.Linear(channels, group * self.num_points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.center_feature_scale = center_feature_scale
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero offsets and masks (uniform modulation, regular grid), Xavier projections."""
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = input.shape
        projected = self.input_proj(input)
        features = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(features)
        mask = self.mask(features).reshape(batch, height, width, self.group, -1)
        mask = F.softmax(mask, -1).reshape(batch, height, width, -1).type(projected.dtype)
        pad = (self.kernel_size - 1) // 2
        output = oracle_dcnv3_core(
            projected, offset, mask, self.kernel_size, self.kernel_size, 1, 1, pad, pad, 1, 1, self.group,
            self.group_channels, self.offset_scale, self.remove_center,
        )
        if self.center_feature_scale:
            scale = F.linear(features, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias)
            scale = scale.sigmoid()[..., None].repeat(1, 1, 1, 1, self.group_channels).flatten(-2)
            output = output * (1 - scale) + projected * scale
        return self.output_proj(output)


class InternImageLayer(nn.Module):
    """One block: the DCNv3 branch and the MLP branch, residual, with the official norm placements.

    Without layer scale: post-norm `x + DP(norm(f(x)))`, res-post-norm `x + DP(rpn(f(norm(x))))` or pre-norm
    `x + DP(f(norm(x)))`. With layer scale (`gamma1`, `gamma2`): post-norm `x + DP(gamma * norm(f(x)))`, else
    `x + DP(gamma * f(norm(x)))` (res-post-norm is ignored then, as officially).
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        mlp_ratio: float,
        drop: float,
        drop_path: float,
        post_norm: bool,
        layer_scale: float | None,
        offset_scale: float,
        dw_kernel_size: int | None,
        res_post_norm: bool,
        center_feature_scale: bool,
        remove_center: bool,
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = build_layer_norm(channels)
        self.dcn = DCNv3(channels, groups, offset_scale, dw_kernel_size, center_feature_scale, remove_center)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = build_layer_norm(channels)
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))
        self.res_post_norm = res_post_norm
        if res_post_norm:
            self.res_post_norm1 = build_layer_norm(channels)
            self.res_post_norm2 = build_layer_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale:
            if self.post_norm:
                x = x + self.drop_path(self.gamma1 * self.norm1(self.dcn(x)))
                return x + self.drop_path(self.gamma2 * self.norm2(self.mlp(x)))
            x = x + self.drop_path(self.gamma1 * self.dcn(self.norm1(x)))
            return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self.dcn(x)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        if self.res_post_norm:
            x = x + self.drop_path(self.res_post_norm1(self.dcn(self.norm1(x))))
            return x + self.drop_path(self.res_post_norm2(self.mlp(self.norm2(x))))
        x = x + self.drop_path(self.dcn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class InternImageBlock(nn.Module):
    """One level: blocks, LNs after the listed blocks, the level norm (when pre-norm or centre feature scale) and
    the downsampling. Returns (next level's input, level output before downsampling), both channels-last."""

    def __init__(
        self,
        channels: int,
        depth: int,
        groups: int,
        downsample: bool,
        drop_path: list[float],
        post_norm: bool,
        post_norm_block_ids: list[int] | None,
        center_feature_scale: bool,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                InternImageLayer(
                    channels, groups, drop_path=drop_path[i], post_norm=post_norm,
                    center_feature_scale=center_feature_scale, **layer_kwargs,
                )
                for i in range(depth)
            ]
        )
        if not post_norm or center_feature_scale:
            self.norm = build_layer_norm(channels)
        self.post_norm_block_ids = post_norm_block_ids
        if post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList([build_layer_norm(channels) for _ in post_norm_block_ids])
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if self.post_norm_block_ids is not None and index in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(index)](x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        stage_output = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, stage_output


class CrossAttention(nn.Module):
    """Multi-head cross-attention with bias-free q/k/v linears plus separate `{q,k,v}_bias` parameters."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def _heads(self, tokens: torch.Tensor, linear: nn.Linear, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        projected = F.linear(tokens, linear.weight, bias)
        return projected.reshape(batch, length, self.num_heads, -1).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        query = self._heads(x, self.q, self.q_bias) * self.scale
        key = self._heads(k, self.k, self.k_bias)
        value = self._heads(v, self.v, self.v_bias)
        attention = (query @ key.transpose(-2, -1)).softmax(dim=-1)
        output = (attention @ value).transpose(1, 2).reshape(batch, length, -1)
        return self.proj(output)


class AttentionPoolingBlock(nn.Module):
    """The mean token attends to all tokens after per-input LNs; no residual and no MLP: (B, N, D) -> (B, out)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.norm1_q = build_layer_norm(dim)
        self.norm1_k = build_layer_norm(dim)
        self.norm1_v = build_layer_norm(dim)
        self.cross_dcn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = tokens.mean(1, keepdim=True)
        pooled = self.cross_dcn(self.norm1_q(query), self.norm1_k(tokens), self.norm1_v(tokens))
        return pooled.squeeze(1)


class InternImage(nn.Module):
    """The official classification model, built from the official constructor's keyword arguments.

    `forward` returns the logits; `forward_features_seq_out` the stem and the four level outputs (channels-last,
    before downsampling). The H/G head's widths are fixed officially (1024-wide tokens, 16 heads, 768 outputs);
    they are arguments here only so that tests can build a small one.
    """

    def __init__(
        self,
        channels: int = 64,
        depths: tuple[int, ...] = (3, 4, 18, 5),
        groups: tuple[int, ...] = (3, 6, 12, 24),
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        drop_path_type: str = "linear",
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        post_norm: bool = False,
        cls_scale: float = 1.5,
        dw_kernel_size: int | None = None,
        use_clip_projector: bool = False,
        level2_post_norm: bool = False,
        level2_post_norm_block_ids: list[int] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        pretrain_embed_dim: int = 1024,
        attnpool_num_heads: int = 16,
        clip_embed_dim: int = 768,
        **unused,  # core_op (always the grid_sample op here), with_cp, act_layer / norm_layer (GELU / LN)
    ) -> None:
        super().__init__()
        self.use_clip_projector = use_clip_projector
        num_levels = len(depths)
        num_features = int(channels * 2 ** (num_levels - 1))
        self.patch_embed = StemLayer(3, channels)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        if drop_path_type == "uniform":
            rates = [drop_path_rate] * sum(depths)
        self.levels = nn.ModuleList()
        for i in range(num_levels):
            self.levels.append(
                InternImageBlock(
                    int(channels * 2**i), depths[i], groups[i], downsample=i < num_levels - 1,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])], post_norm=post_norm,
                    post_norm_block_ids=level2_post_norm_block_ids if i == 2 and level2_post_norm else None,
                    center_feature_scale=center_feature_scale, mlp_ratio=mlp_ratio, drop=drop_rate,
                    layer_scale=layer_scale, offset_scale=offset_scale, dw_kernel_size=dw_kernel_size,
                    res_post_norm=res_post_norm, remove_center=remove_center,
                )
            )
        if use_clip_projector:
            self.dcnv3_head_x4 = nn.Sequential(
                nn.Conv2d(num_features, pretrain_embed_dim * 4, kernel_size=1), nn.PixelShuffle(2)
            )
            self.dcnv3_head_x3 = nn.Conv2d(num_features // 2, pretrain_embed_dim, kernel_size=1)
            self.clip_projector = AttentionPoolingBlock(pretrain_embed_dim, attnpool_num_heads, clip_embed_dim)
            self.fc_norm = build_layer_norm(clip_embed_dim)
            head_width = clip_embed_dim
        else:
            head_width = int(num_features * cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(num_features, head_width, kernel_size=1, bias=False),
                nn.Sequential(nn.BatchNorm2d(head_width)),
                nn.GELU(),
            )
        self.head = nn.Linear(head_width, num_classes) if num_classes > 0 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features_seq_out(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem output and the level outputs before downsampling, all (B, H, W, C)."""
        stem = self.patch_embed(pixel_values)
        x = self.pos_drop(stem)
        stage_outputs = []
        for level in self.levels:
            x, stage_output = level(x)
            stage_outputs.append(stage_output)
        return stem, stage_outputs

    def forward_head_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The input of `head`: the pooled conv head, or the normalised attention-pooled H/G features."""
        _, stage_outputs = self.forward_features_seq_out(pixel_values)
        if self.use_clip_projector:
            third, last = (stage.permute(0, 3, 1, 2) for stage in stage_outputs[-2:])
            tokens = (self.dcnv3_head_x4(last) + self.dcnv3_head_x3(third)).flatten(-2).transpose(1, 2)
            return self.fc_norm(self.clip_projector(tokens))
        pooled = self.avgpool(self.conv_head(stage_outputs[-1].permute(0, 3, 1, 2)))
        return torch.flatten(pooled, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_head_input(pixel_values))
