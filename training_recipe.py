"""The official InternImage training recipe on top of the 🤗 `Trainer`.

Parameter groups (weight-decay exemptions, layer-wise LR decay, the DCN offset LR multiplier), the per-step
warmup + cosine schedule with timm semantics, the mixup / label-smoothing losses, and an EMA of the weights that is
evaluated, saved, and restored on resume. Used by `train_classification.py`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

EMA_WEIGHTS_NAME = "ema_model.safetensors"
# Parameters whose name contains one of these get `dcn_lr_multiplier` (official: offsets and the
# centre-feature-scale projection; the mask projection is not included).
DCN_LR_KEYWORDS = ("dcn.offset.", "dcn.center_feature_scale_proj.")


def layer_decay_prefixes(depths: list[int], decay: float) -> dict[str, float]:
    """LR ratio of each parameter-name prefix under the official layer-wise decay rule.

    Blocks are numbered from the last block of the last stage (ratio 1) backwards to the first block of the first
    stage (ratio `decay ** (sum(depths) - 1)`). The stem shares the first block's ratio; the norm and downsampling
    that end stage `s` share the ratio of the first block of stage `s + 1`. Anything else (the last stage's norm, the
    extra stage-3 norms, pooler, classifier) keeps ratio 1.
    """
    prefixes = {}
    depth_index = 0
    for stage in reversed(range(len(depths))):
        for block in reversed(range(depths[stage])):
            prefixes[f"internimage.encoder.stages.{stage}.layers.{block}."] = decay**depth_index
            depth_index += 1
    prefixes["internimage.embeddings."] = prefixes["internimage.encoder.stages.0.layers.0."]
    for stage in range(len(depths) - 1):
        next_stage_ratio = prefixes[f"internimage.encoder.stages.{stage + 1}.layers.0."]
        prefixes[f"internimage.encoder.stages.{stage}.downsample."] = next_stage_ratio
        prefixes[f"internimage.encoder.stages.{stage}.norm."] = next_stage_ratio
    return prefixes


def parameter_lr_scale(name: str, prefixes: dict[str, float], dcn_lr_multiplier: float = 1.0) -> float:
    """LR multiplier of one parameter: the ratio of the first matching prefix (1.0 if none) times
    `dcn_lr_multiplier` for the DCNv3 offset / centre-feature-scale projections."""
    scale = next((ratio for prefix, ratio in prefixes.items() if name.startswith(prefix)), 1.0)
    if any(keyword in name for keyword in DCN_LR_KEYWORDS):
        scale *= dcn_lr_multiplier
    return scale


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Official rule: no weight decay for 1-D parameters (norms, layer scales) and biases."""
    return parameter.ndim > 1 and not name.endswith(".bias")


def build_parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    layer_decay: float | None = None,
    dcn_lr_multiplier: float = 1.0,
) -> list[dict]:
    """AdamW parameter groups, one per distinct (LR scale, weight decay); each group records its `lr_scale`."""
    depths = model.config.depths
    prefixes = layer_decay_prefixes(depths, layer_decay) if layer_decay not in (None, 1.0) else {}
    groups: dict[tuple[float, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = parameter_lr_scale(name, prefixes, dcn_lr_multiplier)
        decay = weight_decay if uses_weight_decay(name, parameter) else 0.0
        group = groups.setdefault(
            (scale, decay), {"params": [], "names": [], "lr": learning_rate * scale, "lr_scale": scale,
                             "weight_decay": decay}
        )
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


def timm_cosine_factor(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
) -> float:
    """Multiplier of `base_lr` at `step` for timm's per-step `CosineLRScheduler` (`warmup_prefix=False`).

    Linear warmup from `warmup_lr` to `base_lr` over `warmup_steps`, then
    `min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2` at the raw step, `min_lr` after the end.
    `warmup_lr` and `min_lr` are absolute (shared by every group).
    """
    if base_lr <= 0:
        return 0.0
    if step < warmup_steps:
        lr = warmup_lr + step * (base_lr - warmup_lr) / warmup_steps
    elif step >= total_steps:
        lr = min_lr
    else:
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * step / total_steps))
    return lr / base_lr


def build_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup + cosine schedule with the official (timm) semantics, one factor function per group."""
    factors = [
        functools.partial(
            timm_cosine_factor, base_lr=group["lr"], total_steps=total_steps, warmup_steps=warmup_steps,
            warmup_lr=warmup_lr, min_lr=min_lr,
        )
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class EMACallback(TrainerCallback):
    """Exponential moving average of the weights (timm `ModelEmaV3`), updated after every optimizer step.

    `InternImageTrainer` writes it into every checkpoint (`ema_model.safetensors`, before the trainer state that
    marks the checkpoint complete); it is read back when training resumes from `resume_from_checkpoint`.
    """

    def __init__(self, decay: float, warmup: bool = False, resume_from_checkpoint: str | None = None) -> None:
        self.decay = decay
        self.warmup = warmup
        self.resume_from_checkpoint = resume_from_checkpoint
        self.ema: ModelEmaV3 | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=self.warmup)
        if self.resume_from_checkpoint is not None:
            path = os.path.join(self.resume_from_checkpoint, EMA_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{self.resume_from_checkpoint} has no {EMA_WEIGHTS_NAME}: it was saved without EMA; resume "
                    "with --model_ema_decay 0 or from a checkpoint written with EMA"
                )
            device = next(model.parameters()).device
            self.ema.module.load_state_dict(load_file(path, device=str(device)))
            logger.info(f"Restored the EMA weights from {path}")

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        self.ema.update(model, step=state.global_step)

    def save(self, folder: str) -> None:
        """Write the EMA weights to `folder/ema_model.safetensors` (through a temporary file and a rename)."""
        target = os.path.join(folder, EMA_WEIGHTS_NAME)
        weights = {name: tensor.detach().contiguous().cpu() for name, tensor in self.ema.module.state_dict().items()}
        save_file(weights, target + ".tmp")
        os.replace(target + ".tmp", target)


class InternImageTrainer(Trainer):
    """`Trainer` with the official recipe: parameter groups, timm cosine schedule, mixup / smoothed losses, EMA.

    Args:
        layer_decay: Layer-wise LR decay ratio (`None` or 1.0: off).
        dcn_lr_multiplier: LR multiplier of the DCNv3 offset and centre-feature-scale projections.
        warmup_steps / warmup_lr / min_lr: Schedule (absolute warmup start and floor learning rates);
            `warmup_steps=None` takes the warmup from `args.warmup_steps` as the Trainer does.
        mixup: timm `Mixup` applied to training batches (targets become soft; loss: soft-target cross-entropy).
        ema_callback: When given, evaluation and the final save use its EMA weights, and every checkpoint holds them.
        freeze_batchnorm: BatchNorm layers normalise with their running statistics and do not update them.
    """

    def __init__(
        self,
        *args,
        layer_decay: float | None = None,
        dcn_lr_multiplier: float = 1.0,
        warmup_steps: int | None = 0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        mixup: Mixup | None = None,
        ema_callback: EMACallback | None = None,
        freeze_batchnorm: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.dcn_lr_multiplier = dcn_lr_multiplier
        self.recipe_warmup_steps = warmup_steps
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        self.mixup = mixup
        self.ema_callback = ema_callback
        self.freeze_batchnorm = freeze_batchnorm
        smoothing = self.args.label_smoothing_factor
        if mixup is not None:
            self.train_loss = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            groups = build_parameter_groups(
                self.model if model is None else model, self.args.learning_rate, self.args.weight_decay,
                self.layer_decay, self.dcn_lr_multiplier,
            )
            for group in groups:
                del group["names"]
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            warmup_steps = self.recipe_warmup_steps
            if warmup_steps is None:
                warmup_steps = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = build_cosine_schedule(
                self.optimizer if optimizer is None else optimizer, num_training_steps,
                min(warmup_steps, num_training_steps), self.warmup_lr, self.min_lr,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: mixup/cutmix + soft-target CE, else label-smoothing CE, else CE. Evaluation: plain CE."""
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training and self.freeze_batchnorm:  # `training_step` has just put every module in train mode
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if model.training and self.mixup is not None:
            if len(labels) % 2:  # timm mixes a batch with its reverse and needs an even size
                pixel_values, labels = pixel_values[:-1], labels[:-1]
            pixel_values, labels = self.mixup(pixel_values, labels)
        outputs = model(pixel_values=pixel_values)
        if model.training:
            loss = self.train_loss(outputs.logits, labels)
        else:
            loss = F.cross_entropy(outputs.logits.float(), labels)
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model; inside a checkpoint (`_internal_call`) also the EMA weights, before the trainer state that
        the Trainer writes afterwards and before it deletes older checkpoints."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call and self.ema_callback is not None and self.args.should_save:
            self.ema_callback.save(output_dir or self.args.output_dir)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (no-op without EMA)."""
        ema = self.ema_callback.ema if self.ema_callback is not None else None
        if ema is None:
            yield
            return
        model = self.accelerator.unwrap_model(self.model)
        raw_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        model.load_state_dict(ema.module.state_dict())
        try:
            yield
        finally:
            model.load_state_dict(raw_state)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        with self.ema_weights():
            return super().evaluate(*args, **kwargs)


__all__ = [
    "EMACallback",
    "InternImageTrainer",
    "build_cosine_schedule",
    "build_parameter_groups",
    "layer_decay_prefixes",
    "parameter_lr_scale",
    "timm_cosine_factor",
]
