"""`train_classification.py` and `training_recipe.py`: the official recipe on the Trainer, offline on CPU.

End to end (subprocesses, offline, temporary HF_HOME): the embedded digits default (>= 90 % top-1, reload through
`AutoModelForImageClassification` reproducing the evaluated top-1 and top-5, EMA weights saved and evaluated), a run
killed while writing checkpoints and resumed by re-running the identical command (bf16 autocast, mixup, EMA), and 2
processes under torchrun ending with the weights of 1. In process: the layer-decay rule on T and H, weight-decay
exemptions, the schedule against timm's CosineLRScheduler, the mixup soft-target loss, frozen BatchNorm statistics,
the top-k metric. Arguments: tests/test_train_arguments.py; data folders and list files: tests/test_train_data.py.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("datasets")
pytest.importorskip("evaluate")

from training_helpers import ROOT, SCRIPT, TORCHRUN_2, offline_env, read_json, run_command, run_script  # noqa: E402

import train_classification  # noqa: E402
from configuration_internimage import InternImageConfig  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402
from training_recipe import (  # noqa: E402
    InternImageTrainer,
    build_cosine_schedule,
    build_parameter_groups,
)

# A few seconds per run: 192 digits, batch 16, one epoch of 12 steps, a checkpoint every 4 steps (`--save_steps`
# alone: it implies the "steps" strategy).
TINY_RUN = [
    "--max_train_samples", "192", "--max_eval_samples", "64", "--per_device_train_batch_size", "16",
    "--num_train_epochs", "1", "--save_steps", "4", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "3",
]


# ----------------------------------------------------------------------------------- the embedded default


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The README's main command (only the output folder changed)."""
    work = tmp_path_factory.mktemp("digits")
    run_script(work, "--output_dir", str(work / "out"))
    return work


def test_default_run_reaches_90_percent_and_writes_metrics(default_run):
    out = default_run / "out"
    results = read_json(out / "all_results.json")
    assert read_json(out / "eval_results.json")["eval_accuracy"] == results["eval_accuracy"]
    assert 0.9 <= results["eval_accuracy"] <= 1.0, results
    config = read_json(out / "config.json")
    assert config["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_internimage.InternImageForImageClassification"
    )
    assert config["id2label"] == {str(d): str(d) for d in range(10)}
    for name in ("model.safetensors", "preprocessor_config.json", "modeling_internimage.py", "dcnv3_ops.py"):
        assert (out / name).is_file(), name


def test_default_run_saves_and_evaluates_the_ema_weights(default_run):
    out = default_run / "out"
    (checkpoint,) = [path for path in out.iterdir() if path.name.startswith("checkpoint-")]
    saved, raw, ema = (load_file(path) for path in (
        out / "model.safetensors", checkpoint / "model.safetensors", checkpoint / "ema_model.safetensors"
    ))
    name = "classifier.weight"
    assert not torch.equal(saved[name], raw[name]), "EMA weights should differ from the raw weights"
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, ema[key], rtol=0, atol=0)


def test_default_model_reloads_with_identical_predictions(default_run):
    """AutoModelForImageClassification (remote code, offline) reproduces the evaluated top-1 and top-5 accuracy
    exactly (10 classes: top-5 can differ from 1) and the same predictions as this repository's class."""
    out = default_run / "out"
    probe = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from transformers import AutoModelForImageClassification, CLIPImageProcessor
from modeling_internimage import InternImageForImageClassification
from train_classification import load_digits_splits, load_rgb
remote = AutoModelForImageClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(remote).__module__.startswith("transformers_modules"), type(remote).__module__
local = InternImageForImageClassification.from_pretrained({str(out)!r}).eval()
processor = CLIPImageProcessor.from_pretrained({str(out)!r})
split = load_digits_splits(seed=42)["validation"]
pixels = processor(images=[load_rgb(image) for image in split["image"]], return_tensors="pt").pixel_values
with torch.no_grad():
    remote_logits, local_logits = remote(pixels).logits, local(pixels).logits
assert torch.equal(remote_logits.argmax(-1), local_logits.argmax(-1))
labels = torch.tensor(split["label"])
accuracy = (remote_logits.argmax(-1) == labels).double().mean().item()
top5 = (remote_logits.topk(5).indices == labels[:, None]).any(-1).double().mean().item()
max_diff = (remote_logits - local_logits).abs().max().item()
print(json.dumps({{"accuracy": accuracy, "top5": top5, "max_diff": max_diff}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=default_run, env=offline_env(default_run), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["max_diff"] == 0.0
    evaluated = read_json(out / "eval_results.json")
    assert reloaded["accuracy"] == pytest.approx(evaluated["eval_accuracy"], abs=1e-12)
    assert reloaded["top5"] == pytest.approx(evaluated["eval_top5_accuracy"], abs=1e-12)


# ------------------------------------------------------------------------------------------------ resume

# Runs the training script (argv[1:]) and SIGKILLs it at $KILL_POINT while checkpoint $KILL_STEP is being written.
KILL_WHILE_SAVING = '''
import os, runpy, signal, sys
from pathlib import Path

from transformers import Trainer
from transformers.trainer_callback import TrainerState

point, step = os.environ["KILL_POINT"], int(os.environ["KILL_STEP"])


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "model_half_written":  # killed while writing model.safetensors, the first file
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def cut_model(self, output_dir):
        if self.state.global_step == step:
            weights = Path(output_dir, "model.safetensors")
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            kill()
        save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = cut_model
elif point == "state_half_written":  # killed while writing trainer_state.json, the Trainer's last file
    save_state = TrainerState.save_to_json

    def cut_state(self, json_path):
        save_state(self, json_path)
        if self.global_step == step and "checkpoint-" in json_path:
            text = Path(json_path).read_text()
            Path(json_path).write_text(text[: len(text) // 2])
            kill()

    TrainerState.save_to_json = cut_state
elif point == "after_the_trainer_files":  # killed once the Trainer has written (and rotated) its files
    save_checkpoint = Trainer._save_checkpoint

    def stop_after(self, model, trial):
        save_checkpoint(self, model, trial)
        if self.state.global_step == step:
            kill()

    Trainer._save_checkpoint = stop_after
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    """bf16 autocast on CPU, mixup, EMA, one checkpoint kept. The run is killed (SIGKILL) at three points of writing
    a checkpoint; each time, re-running the identical command resumes from the last complete checkpoint, and the
    end is exactly an uninterrupted run: weights, EMA, optimizer state, logged losses.

    Failed before the fix at the first re-run ("Resuming from .../checkpoint-8" missing, it started over): the
    EMA file that makes a checkpoint complete was written by a callback after the Trainer had already deleted
    checkpoint-4, so a kill in between left no complete checkpoint."""
    args = [
        *TINY_RUN, "--save_total_limit", "1", "--model_ema_decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0",
        "--bf16", "true", "--use_cpu", "true",
    ]
    reference = tmp_path / "reference"
    run_script(tmp_path, *args, "--output_dir", str(reference))
    assert [path.name for path in reference.glob("checkpoint-*")] == ["checkpoint-12"]

    resumed = tmp_path / "resumed"
    launcher = tmp_path / "kill_while_saving.py"
    launcher.write_text(KILL_WHILE_SAVING)
    command = [sys.executable, str(launcher), SCRIPT, *args, "--output_dir", str(resumed)]
    runs = [  # (where the run is killed, at which checkpoint, the checkpoint it resumes from)
        ("after_the_trainer_files", 8, None),
        ("state_half_written", 12, "checkpoint-8"),
        ("model_half_written", 12, "checkpoint-8"),
        ("nowhere", 0, "checkpoint-8"),
    ]
    for point, step, resumes_from in runs:
        result = run_command(tmp_path, command, env={"KILL_POINT": point, "KILL_STEP": str(step)})
        log = result.stdout + result.stderr
        if resumes_from is None:
            assert "Resuming from" not in log
        else:
            assert f"Resuming from {resumed / resumes_from}\n" in log, f"{point}: {log[-3000:]}"
        assert result.returncode == (0 if point == "nowhere" else -signal.SIGKILL), f"{point}: {log[-3000:]}"

    for name in ("model.safetensors", "checkpoint-12/model.safetensors", "checkpoint-12/ema_model.safetensors"):
        expected, actual = load_file(reference / name), load_file(resumed / name)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{name}:{key}")
    expected = torch.load(reference / "checkpoint-12" / "optimizer.pt", weights_only=True)["state"]
    actual = torch.load(resumed / "checkpoint-12" / "optimizer.pt", weights_only=True)["state"]
    for index in expected:
        torch.testing.assert_close(actual[index]["exp_avg_sq"], expected[index]["exp_avg_sq"], rtol=0, atol=0)
    losses = [entry["loss"] for entry in read_json(resumed / "trainer_state.json")["log_history"] if "loss" in entry]
    reference_losses = [
        entry["loss"] for entry in read_json(reference / "trainer_state.json")["log_history"] if "loss" in entry
    ]
    assert losses == reference_losses and len(losses) == 12


# ------------------------------------------------------------------------------------------------ torchrun


def test_two_processes_end_with_the_weights_of_one(tmp_path):
    """DDP over gloo on CPU: 2 processes x 8 images per step end with the weights of 1 process x 16 images (same
    global batch, same data order), within 1e-5, after 4 steps; the logged loss is the mean over both processes.

    Nothing depends on how a batch is split: no augmentation (the digits recipe has no flip, auto-augment, erasing,
    mixup; crops keep the whole image), no stochastic depth or dropout, and the conv pooler's BatchNorm statistics
    are FROZEN (`--freeze_batchnorm true`; SyncBatchNorm needs CUDA). AdamW would hide a wrong gradient scale (its
    update ignores the scale), so `--adam_epsilon 1` makes the update proportional to the gradient: summed instead
    of averaged gradients, or both processes reading the same images, would show.
    """
    common = [
        "--max_train_samples", "64", "--max_eval_samples", "16", "--max_steps", "4", "--save_steps", "2",
        "--save_total_limit", "2",
        "--use_cpu", "true", "--freeze_batchnorm", "true", "--crop_scale_min", "1.0", "--model_ema_decay", "0",
        "--warmup_epochs", "0", "--learning_rate", "1.0", "--adam_epsilon", "1.0", "--logging_steps", "1",
        "--disable_tqdm", "true", "--seed", "3", "--report_to", "none",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(tmp_path, *common, "--per_device_train_batch_size", "16", "--output_dir", str(one))
    run_script(
        tmp_path, *common, "--per_device_train_batch_size", "8", "--output_dir", str(two), launcher=TORCHRUN_2
    )
    for step in (2, 4):
        expected = load_file(one / f"checkpoint-{step}" / "model.safetensors")
        actual = load_file(two / f"checkpoint-{step}" / "model.safetensors")
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5, msg=f"step {step}: {key}")
    first, last = (load_file(one / f"checkpoint-{step}" / "model.safetensors") for step in (2, 4))
    moved = max((last[key] - first[key]).abs().max().item() for key in first)
    assert moved > 1e-3, f"two steps moved the weights by only {moved}: the comparison could not tell"
    losses = [
        [entry["loss"] for entry in read_json(out / "trainer_state.json")["log_history"] if "loss" in entry]
        for out in (one, two)
    ]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=2e-4)
    assert abs(losses[0][0] - math.log(10)) < 0.3, losses  # a mean loss, not a sum over processes
    assert len(list(two.glob("*.safetensors"))) == 1

# --------------------------------------------------------------------------------------- recipe, in process


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


def test_top_k_metrics_rank_the_label():
    """Top-1 and top-5 from the logits the Trainer gathers: labels ranked 1st, 4th and 7th of 7 classes."""
    from transformers import EvalPrediction

    keep_top5, compute_metrics = train_classification.top_k_metrics()
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6]]).repeat(3, 1)  # class 6 ranked first, class 0 last
    labels = torch.tensor([6, 3, 0])
    ranked = keep_top5(logits, labels)
    assert ranked.tolist()[0] == [6, 5, 4, 3, 2]
    metrics = compute_metrics(EvalPrediction(predictions=ranked.numpy(), label_ids=labels.numpy()))
    assert metrics == {"accuracy": 1 / 3, "top5_accuracy": 2 / 3}
