"""`train_classification.py` and `training_recipe.py`: the official recipe on the Trainer, offline on CPU.

End to end (subprocesses, offline, temporary HF_HOME): the embedded digits default (>= 90 % top-1, reload through
`AutoModelForImageClassification` reproducing the evaluated top-1 and top-5, EMA weights saved and evaluated), a run
killed while writing checkpoints and resumed by re-running the identical command (bf16 autocast, mixup, EMA), and 2
processes under torchrun ending with the weights of 1. In process: the top-k metric. The recipe's parts one by one:
tests/test_training_recipe.py; arguments: tests/test_train_arguments.py; data folders and list files:
tests/test_train_data.py.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("datasets")
pytest.importorskip("evaluate")

from training_helpers import ROOT, SCRIPT, TORCHRUN_2, offline_env, read_json, run_command, run_script  # noqa: E402

import train_classification  # noqa: E402

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


# ----------------------------------------------------------------------------------------------- metrics


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
