"""The official InternImage training recipe: its values and its mechanics on top of the 🤗 `Trainer`.

Values: each recipe's defaults (`RECIPES`, `RecipeArguments`), which recipe applies (`choose_recipe`), explicit
arguments over defaults (`resolve_arguments`), the linear LR scaling. Mechanics: parameter groups (weight-decay
exemptions, layer-wise LR decay, the DCN offset LR multiplier), the per-step timm warmup + cosine schedule, the mixup /
label-smoothing losses, an EMA of the weights (evaluated, saved, restored on resume). Used by `train_classification.py`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------- the recipe's values

# Defaults of each recipe; an argument given explicitly wins (`resolve_arguments`). `in1k` and `22kto1k` are the
# official ImageNet recipes, from the official `classification/config.py`: epochs / warmup L91-92, weight decay L93,
# learning rates L94-96, gradient clipping L98, AdamW L118-122, batch 128 L22, 8 workers L37-39, label smoothing L65,
# augmentation L30 and L149-157, mixup / cutmix L159-169; the released configs add EMA 0.9999 (e.g.
# `classification/configs/internimage_t_1k_224.yaml` L13-16), and the 22kto1k ones (e.g.
# `internimage_l_22kto1k_384.yaml`) 20 / 2 epochs (L26-27), learning rates 2e-5 / 0 / 0, label smoothing 0.3 (L11),
# no mixup, no random erasing, layer decay 0.9 with the DCN offset LR x 0.1, and gradient checkpointing, with 16
# images per GPU (`classification/README.md` L277-366). Learning rates are for a total batch of 512 and scaled
# linearly to the actual total batch (`classification/main.py` L636-651). `digits` is this repository's quick CPU run.
_OFFICIAL = {
    "weight_decay": 0.05, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 5.0,
    "auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "hflip": 0.5, "crop_scale_min": 0.08,
    "model_ema_decay": 0.9999, "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 2,
    "logging_steps": 50, "dataloader_num_workers": 8, "per_device_eval_batch_size": 128,
    "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
}
RECIPES = {
    "in1k": {
        **_OFFICIAL, "architecture": "internimage_t_1k_224", "num_train_epochs": 300, "warmup_epochs": 20,
        "learning_rate": 5e-4, "warmup_lr": 5e-7, "min_lr": 5e-6, "per_device_train_batch_size": 128,
        "label_smoothing_factor": 0.1, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25,
        "output_dir": "outputs/internimage-in1k",
    },
    "22kto1k": {
        **_OFFICIAL, "num_train_epochs": 20, "warmup_epochs": 2, "learning_rate": 2e-5, "warmup_lr": 0.0,
        "min_lr": 0.0, "per_device_train_batch_size": 16, "label_smoothing_factor": 0.3, "mixup": 0.0,
        "cutmix": 0.0, "reprob": 0.0, "layer_decay": 0.9, "dcn_lr_multiplier": 0.1, "gradient_checkpointing": True,
        "output_dir": "outputs/internimage-finetuned",
    },
    "digits": {
        **_OFFICIAL, "architecture": "internimage_digits", "num_train_epochs": 20, "warmup_epochs": 2,
        "learning_rate": 1.6e-2, "warmup_lr": 1e-5, "min_lr": 1e-5, "per_device_train_batch_size": 128,
        "label_smoothing_factor": 0.1, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "auto_augment": "none",
        "color_jitter": 0.0, "hflip": 0.0, "crop_scale_min": 0.6, "model_ema_decay": 0.998, "model_ema_warmup": True,
        "eval_strategy": "no", "save_strategy": "epoch", "save_total_limit": 1, "logging_steps": 20,
        "dataloader_num_workers": 0, "per_device_eval_batch_size": 256, "cpu_threads": 1,
        "output_dir": "outputs/internimage-digits",
    },
}


@dataclass
class RecipeArguments:
    """The official recipe; `None` fields take the value of `--recipe`."""

    recipe: str = field(default="auto", metadata={"help": f"Defaults to start from: auto, {', '.join(RECIPES)}."})
    lr_reference_batch_size: int = field(
        default=512,
        metadata={"help": "learning_rate, warmup_lr, min_lr are for this total batch; they scale linearly (0: off)."},
    )
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear warmup length in epochs (per-step)."})
    warmup_lr: float = field(default=0.0, metadata={"help": "LR at the start of the warmup (not a share of the peak)."})
    min_lr: float = field(default=0.0, metadata={"help": "Floor of the cosine schedule (not a share of the peak)."})
    layer_decay: float | None = field(default=None, metadata={"help": "Layer-wise LR decay ratio (1.0: off)."})
    dcn_lr_multiplier: float = field(default=1.0, metadata={"help": "LR multiplier of DCNv3 offset/scale params."})
    auto_augment: str = field(default="none", metadata={"help": "timm auto-augment policy ('none': off)."})
    color_jitter: float = field(default=0.0, metadata={"help": "Colour jitter strength (used without auto-augment)."})
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "Smallest area share of RandomResizedCrop."})
    reprob: float = field(default=0.0, metadata={"help": "Random erasing probability (pixel mode)."})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (0: off)."})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix when both are on."})
    model_ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0: no EMA)."})
    model_ema_warmup: bool = field(default=False, metadata={"help": "Ramp the EMA decay up over the first steps."})
    cpu_threads: int = field(
        default=0,
        metadata={
            "help": "torch intra-op threads on CPU (0: torch's default). The digits recipe uses 1: its small matrices "
            "gain little from threads, and threads stall badly when other processes share the cores."
        },
    )
    freeze_batchnorm: bool = field(
        default=False,
        metadata={
            "help": "Normalise with the running statistics of the BatchNorm layers (the conv pooler's) and keep them "
            "fixed while training, so results do not depend on how a batch is split across processes."
        },
    )
    ignore_checkpoints: bool = field(
        default=False, metadata={"help": "Start afresh even if output_dir holds checkpoint-* folders."}
    )


class UsageError(ValueError):
    """Arguments or data the script cannot use; the command line reports it as one `error:` line, before training."""


# An explicit `--save_steps` (or eval/logging) implies its strategy "steps", unless that strategy is given too.
STEP_STRATEGIES = {"save_steps": "save_strategy", "eval_steps": "eval_strategy", "logging_steps": "logging_strategy"}


def choose_recipe(recipe: str, dataset_name: str | None, data_path: str | None, model_name_or_path: str | None) -> str:
    """Resolve `--recipe auto`: digits without data, `22kto1k` when fine-tuning a checkpoint, `in1k` otherwise."""
    if recipe != "auto":
        if recipe not in RECIPES:
            raise UsageError(f"--recipe {recipe!r} is unknown; choose auto or one of {sorted(RECIPES)}")
        return recipe
    if dataset_name is None and data_path is None:
        return "digits"
    return "22kto1k" if model_name_or_path else "in1k"


def resolve_arguments(recipe: str, explicit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The values to use and where each comes from: explicit arguments, what they imply, then the recipe's defaults.

    An explicit `--save_steps` / `--eval_steps` / `--logging_steps` sets its strategy to "steps" unless the
    strategy is explicit too. This is the only place where explicit arguments and recipe defaults meet.
    """
    implied = {strategy: "steps" for steps, strategy in STEP_STRATEGIES.items() if steps in explicit}
    values = {**RECIPES[recipe], **implied, **explicit}
    sources = {
        **dict.fromkeys(RECIPES[recipe], f"the {recipe} recipe's default"),
        **{strategy: f"implied by --{steps}" for steps, strategy in STEP_STRATEGIES.items() if strategy in implied},
        **dict.fromkeys(explicit, "given"),
    }
    return values, sources


def scale_learning_rates(
    training_args: TrainingArguments, recipe_args: RecipeArguments, train_size: int | None
) -> tuple[float, int | None]:
    """Apply the official linear scaling to `learning_rate` (in place); returns the factor and the warmup steps.

    Every LR of the recipe is for a total batch of `lr_reference_batch_size`. The warmup is `--warmup_epochs` in
    steps, or `None` when `--warmup_steps` is given (the Trainer's meaning: steps, or a share of all steps below 1);
    `train_size=None` (streaming) needs `--warmup_steps`.
    """
    total_batch = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    lr_scale = total_batch / recipe_args.lr_reference_batch_size if recipe_args.lr_reference_batch_size else 1.0
    training_args.learning_rate *= lr_scale
    if training_args.warmup_steps > 0:
        warmup_steps, warmup = None, f"--warmup_steps {training_args.warmup_steps:g}"
    elif train_size is None:
        warmup_steps, warmup = 0, "none"
        logger.warning("Streaming data has no epoch length: --warmup_epochs is ignored, use --warmup_steps")
    else:
        per_process = math.ceil(train_size / training_args.world_size)
        batches_per_epoch = per_process // training_args.per_device_train_batch_size
        warmup_steps = round(recipe_args.warmup_epochs * batches_per_epoch / training_args.gradient_accumulation_steps)
        warmup = f"{warmup_steps} steps"
    logger.info(
        f"Total batch {total_batch}: peak LR {training_args.learning_rate:.3g} (x{lr_scale:.4g}), warmup "
        f"{warmup} from {recipe_args.warmup_lr * lr_scale:.3g}, floor {recipe_args.min_lr * lr_scale:.3g}"
    )
    return lr_scale, warmup_steps


# ------------------------------------------------------------------------------------ the recipe's mechanics

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
    "RECIPES", "STEP_STRATEGIES", "EMACallback", "InternImageTrainer", "RecipeArguments", "UsageError",
    "build_cosine_schedule", "build_parameter_groups", "choose_recipe", "layer_decay_prefixes", "parameter_lr_scale",
    "resolve_arguments", "scale_learning_rates", "timm_cosine_factor",
]
