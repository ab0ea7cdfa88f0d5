"""`training_recipe.py`: the recipe's values and its parts one by one, in process.

The recipe table of docs/training.md is the rendering of every recipe's values; the layer-decay rule on T and H,
weight-decay exemptions, the schedule against timm's CosineLRScheduler, the mixup soft-target loss, frozen BatchNorm
statistics, the linear LR scaling and a warmup given as a share of all steps. The tests that go through the training
script's arguments skip without its `datasets` and `evaluate`. End to end: tests/test_train_classification.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from training_helpers import ROOT, parsed_values

from configuration_internimage import InternImageConfig
from modeling_internimage import InternImageForImageClassification
from training_recipe import (
    RECIPES,
    InternImageTrainer,
    build_cosine_schedule,
    build_parameter_groups,
    scale_learning_rates,
)


@pytest.fixture
def parse_arguments():
    """The training script's `parse_arguments` (the script needs datasets and evaluate)."""
    return pytest.importorskip("train_classification").parse_arguments


# --------------------------------------------------------------------------------- the recipe table of docs/training.md

# The columns of the table, and its rows: the arguments each row shows, " / "-separated.
TABLE_COLUMNS = {
    "in1k": "`in1k` (T/S/B from scratch)", "22kto1k": "`22kto1k` (L/XL/H/G fine-tuning)", "digits": "`digits`"
}
TABLE_ROWS = (
    ("architecture",),
    ("num_train_epochs", "warmup_epochs"),
    ("learning_rate", "warmup_lr", "min_lr"),
    ("lr_reference_batch_size",),
    ("per_device_train_batch_size", "per_device_eval_batch_size"),
    ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"),
    ("layer_decay", "dcn_lr_multiplier"),
    ("auto_augment", "color_jitter", "hflip", "crop_scale_min", "reprob"),
    ("mixup", "cutmix", "label_smoothing_factor"),
    ("model_ema_decay", "model_ema_warmup"),
    ("gradient_checkpointing",),
    ("eval_strategy", "save_strategy", "save_total_limit", "logging_steps"),
    ("dataloader_num_workers", "cpu_threads"),
    ("output_dir",),
)


def table_cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        return np.format_float_scientific(value, trim="-", exp_digits=1)
    return f"{value:g}" if isinstance(value, (int, float)) else f"`{value}`"


def render_recipe_table() -> str:
    """The recipe table of docs/training.md: each value as `--recipe NAME` alone gets it (the recipe over the argument
    defaults)."""
    values = {name: parsed_values(["--recipe", name]) for name in TABLE_COLUMNS}
    lines = ["| | " + " | ".join(TABLE_COLUMNS.values()) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for keys in TABLE_ROWS:
        cells = [" / ".join(table_cell(values[name][key]) for key in keys) for name in TABLE_COLUMNS]
        lines.append("| " + " / ".join(f"`{key}`" for key in keys) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_readme_recipe_table_is_the_rendering_of_the_recipes():
    """docs/training.md shows every value of every recipe, as rendered here: change a value and the page must follow
    (the failure prints the table to paste). `report_to`, the one value not in the table, depends on the environment."""
    assert set(TABLE_COLUMNS) == set(RECIPES)
    shown = {key for keys in TABLE_ROWS for key in keys}
    assert set().union(*RECIPES.values()) - shown == {"report_to"}, "show every recipe value: extend TABLE_ROWS"
    tensorboard = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    assert {recipe["report_to"] for recipe in RECIPES.values()} == {tensorboard}
    table = render_recipe_table()
    readme = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert "`report_to` is `tensorboard` when TensorBoard is installed, else `none`" in " ".join(readme.split())
    assert table in readme, "the recipe table of docs/training.md should read:\n" + table


# ------------------------------------------------------------------------------------------- learning rates


def test_linear_lr_scaling_applies_to_explicit_learning_rates(parse_arguments):
    """The documented transformation stays: learning_rate, warmup_lr and min_lr are for a total batch of 512."""
    _, _, recipe_args, training_args = parse_arguments(
        ["--learning_rate", "1e-3", "--warmup_lr", "1e-5", "--per_device_train_batch_size", "64",
         "--gradient_accumulation_steps", "2", "--use_cpu", "true"]
    )
    lr_scale, warmup_steps = scale_learning_rates(training_args, recipe_args, train_size=1000)
    assert lr_scale == 128 / 512
    assert training_args.learning_rate == pytest.approx(1e-3 * 128 / 512, rel=1e-12)
    assert warmup_steps == round(2 * (1000 // 64) / 2)  # the digits recipe's 2 warmup epochs in optimizer steps


def test_warmup_steps_below_one_is_a_share_of_all_steps(parse_arguments, tmp_path):
    """`--warmup_steps 0.1` means 10 % of the steps, as in the Trainer (it used to become 0 steps)."""
    _, _, recipe_args, training_args = parse_arguments(
        ["--warmup_steps", "0.1", "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    )
    lr_scale, warmup_steps = scale_learning_rates(training_args, recipe_args, train_size=1000)
    assert warmup_steps is None
    model = InternImageForImageClassification(InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16]))
    trainer = InternImageTrainer(model=model, args=training_args, warmup_steps=warmup_steps, warmup_lr=0.0, min_lr=0.0)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=100)
    peak = training_args.learning_rate
    rates = []
    for _ in range(11):
        rates.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(peak / 2, rel=1e-9)
    assert rates[10] == pytest.approx(peak * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.1)).item()), rel=1e-6)


def test_schedule_matches_timm_cosine_scheduler():
    """Per-step warmup + cosine (`warmup_prefix=False`) with absolute warmup/floor LRs, per group."""
    from timm.scheduler import CosineLRScheduler

    def optimizer():
        parameters = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        return torch.optim.SGD([{"params": [parameters[0]], "lr": 4e-3}, {"params": [parameters[1]], "lr": 1e-3}])

    ours_optimizer, timm_optimizer = optimizer(), optimizer()
    ours = build_cosine_schedule(ours_optimizer, total_steps=100, warmup_steps=10, warmup_lr=4e-6, min_lr=4e-5)
    reference = CosineLRScheduler(
        timm_optimizer, t_initial=100, lr_min=4e-5, warmup_t=10, warmup_lr_init=4e-6, t_in_epochs=False
    )
    for step in range(120):
        reference.step_update(step)
        expected = [group["lr"] for group in timm_optimizer.param_groups]
        assert [group["lr"] for group in ours_optimizer.param_groups] == pytest.approx(expected, rel=1e-9), step
        ours_optimizer.step()
        ours.step()


# ------------------------------------------------------------------------------------------ parameter groups


def lr_scales(model, layer_decay=0.9, dcn_lr_multiplier=0.1) -> tuple[dict[str, float], dict[str, float]]:
    groups = build_parameter_groups(model, 1.0, 0.05, layer_decay, dcn_lr_multiplier)
    scale, decay = {}, {}
    for group in groups:
        for name in group["names"]:
            assert name not in scale, f"{name} is in two groups"
            scale[name], decay[name] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == {name for name, _ in model.named_parameters()}
    return scale, decay


def test_layer_decay_follows_the_official_rule_on_t():
    """T (depths 4, 4, 18, 4): blocks numbered from the last one backwards get 0.9**index; the stem shares the
    first block's ratio, a stage's norm/downsampling the next stage's first block's; head and last norm 1."""
    config = InternImageConfig.from_variant("internimage_t_1k_224", num_labels=10)
    scale, decay = lr_scales(InternImageForImageClassification(config))
    stages = "internimage.encoder.stages"
    expected = {
        f"{stages}.3.layers.3.mlp.fc1.weight": 1.0,
        f"{stages}.3.layers.0.norm1.weight": 0.9**3,
        f"{stages}.2.layers.17.dcn.input_proj.weight": 0.9**4,
        f"{stages}.2.layers.0.dcn.mask.weight": 0.9**21,  # the mask projection has no DCN multiplier
        f"{stages}.1.layers.0.mlp.fc2.bias": 0.9**25,
        f"{stages}.0.layers.0.dcn.output_proj.weight": 0.9**29,
        f"{stages}.0.layers.3.dcn.offset.weight": 0.9**26 * 0.1,
        f"{stages}.3.layers.3.dcn.offset.bias": 0.1,
        "internimage.embeddings.conv1.weight": 0.9**29,
        f"{stages}.0.downsample.conv.weight": 0.9**25,
        f"{stages}.0.norm.weight": 0.9**25,
        f"{stages}.1.downsample.norm.bias": 0.9**21,
        f"{stages}.2.downsample.conv.weight": 0.9**3,
        f"{stages}.2.norm.bias": 0.9**3,
        f"{stages}.3.norm.weight": 1.0,
        "internimage.pooler.conv.weight": 1.0,
        "classifier.weight": 1.0,
    }
    for name, ratio in expected.items():
        assert scale[name] == pytest.approx(ratio, rel=1e-12), name
    assert decay["classifier.weight"] == decay[f"{stages}.0.layers.0.dcn.offset.weight"] == 0.05
    assert decay["classifier.bias"] == decay[f"{stages}.0.layers.0.norm1.weight"] == 0.0
    assert decay["internimage.pooler.norm.weight"] == 0.0


def test_layer_decay_follows_the_official_rule_on_h():
    """H's structure (depths 6, 6, 32, 6, res-post-norm, extra stage-3 norms, centre feature scale, attention
    pooler) at a small width."""
    config = InternImageConfig.from_variant(
        "internimage_h_22kto1k_640", channels=16, groups=[1, 2, 4, 8], attention_pooler_hidden_size=32,
        attention_pooler_num_heads=2, attention_pooler_output_size=32, num_labels=10,
    )
    scale, decay = lr_scales(InternImageForImageClassification(config))
    stages = "internimage.encoder.stages"
    expected = {
        f"{stages}.3.layers.5.res_post_norm2.weight": 1.0,
        f"{stages}.2.layers.31.mlp.fc1.weight": 0.9**6,
        f"{stages}.0.layers.0.norm1.weight": 0.9**49,
        "internimage.embeddings.norm1.weight": 0.9**49,
        f"{stages}.0.norm.weight": 0.9**43,
        f"{stages}.2.downsample.conv.weight": 0.9**5,
        f"{stages}.2.post_norms.4.weight": 1.0,
        f"{stages}.3.norm.weight": 1.0,
        f"{stages}.1.layers.2.dcn.center_feature_scale_proj.weight": 0.9**41 * 0.1,
        "internimage.pooler.attention.query.weight": 1.0,
    }
    for name, ratio in expected.items():
        assert scale[name] == pytest.approx(ratio, rel=1e-12), name
    assert decay[f"{stages}.1.layers.2.dcn.center_feature_scale_proj.weight"] == 0.05
    assert decay[f"{stages}.1.layers.2.dcn.center_feature_scale_proj.bias"] == 0.0


def test_without_layer_decay_only_the_dcn_multiplier_remains():
    config = InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=3)
    scale, _ = lr_scales(InternImageForImageClassification(config), layer_decay=None, dcn_lr_multiplier=0.1)
    assert {value for value in scale.values()} == {1.0, 0.1}
    assert scale["internimage.encoder.stages.2.layers.1.dcn.offset.weight"] == 0.1


# ------------------------------------------------------------------------------------------ losses, BatchNorm


def test_mixup_batches_use_the_soft_target_loss(tmp_path):
    """The loss of a mixed batch is -sum(soft_target * log_softmax(logits)), with timm's mixed, smoothed targets
    (transformers' default loss would switch to multi-label BCE for float labels)."""
    from timm.data import Mixup
    from transformers import TrainingArguments

    torch.manual_seed(0)
    config = InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_labels=5, drop_path_rate=0)
    model = InternImageForImageClassification(config).train()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", label_smoothing_factor=0.1)
    trainer = InternImageTrainer(model=model, args=args, mixup=mixup)
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 4])

    np.random.seed(7)
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values.clone(), "labels": labels})  # mixed in place
    np.random.seed(7)
    mixed, soft_targets = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)(
        pixel_values.clone(), labels
    )
    assert not torch.equal(mixed, pixel_values) and soft_targets.shape == (4, 5)
    logits = model(pixel_values=mixed).logits
    manual = (-soft_targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(loss, manual)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft_targets)
    assert not torch.allclose(loss, bce)


def test_frozen_batchnorm_uses_and_keeps_the_running_statistics(tmp_path):
    """`--freeze_batchnorm`: in training, the conv pooler's BatchNorm normalises with its running statistics (the
    loss equals the eval-mode loss, which no split of the batch can change) and leaves them as they were."""
    from transformers import TrainingArguments

    torch.manual_seed(0)
    config = InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], num_labels=5, drop_path_rate=0)
    model = InternImageForImageClassification(config)
    norm = model.internimage.pooler.norm
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    statistics = norm.running_mean.clone(), norm.running_var.clone()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 4])}
    with torch.no_grad():
        eval_loss = torch.nn.functional.cross_entropy(model.eval()(inputs["pixel_values"]).logits, inputs["labels"])
        frozen = InternImageTrainer(model=model, args=args, freeze_batchnorm=True)
        frozen_loss = frozen.compute_loss(model.train(), inputs)
        assert not norm.training and model.internimage.encoder.training
        assert torch.equal(norm.running_mean, statistics[0]) and torch.equal(norm.running_var, statistics[1])
        torch.testing.assert_close(frozen_loss, eval_loss, rtol=1e-6, atol=1e-6)
        batch_statistics_loss = InternImageTrainer(model=model, args=args).compute_loss(model.train(), inputs)
    assert not torch.equal(norm.running_mean, statistics[0])
    assert (batch_statistics_loss - eval_loss).abs() > 1e-3
