"""`train_classification.py` and `training_recipe.py`: the official recipe on the Trainer, offline on CPU.

End to end (subprocesses, offline, temporary HF_HOME): the embedded digits default (>= 90 % top-1, reload through
`AutoModelForImageClassification` with identical predictions, EMA weights saved and evaluated), a local ImageNet-layout
folder with list files and broken/odd images, a run killed after a checkpoint and resumed by re-running the
identical command, and a 2-process torchrun run. In process: the layer-decay rule on T and H, weight-decay
exemptions, the schedule against timm's CosineLRScheduler, the mixup soft-target loss, argument files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("datasets")  # train_classification's data pipeline; not installed on every GPU machine
pytest.importorskip("evaluate")
import train_classification  # noqa: E402
from configuration_internimage import InternImageConfig  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402
from training_recipe import (  # noqa: E402
    InternImageTrainer,
    build_cosine_schedule,
    build_parameter_groups,
)

SCRIPT = str(ROOT / "train_classification.py")
# A few seconds per run: 192 digits, batch 16, one epoch of 12 steps, checkpoints every 4 steps.
TINY_RUN = [
    "--max_train_samples", "192", "--max_eval_samples", "64", "--per_device_train_batch_size", "16",
    "--num_train_epochs", "1", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "5",
    "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "3",
]


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
        OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # the CPU recipe everywhere: bit-exact resumes, GPU atomics are not reproducible
    )
    return env


def run_script(tmp_path: Path, *args: str, launcher: list[str] | None = None) -> str:
    command = (launcher or [sys.executable]) + [SCRIPT, *args]
    result = subprocess.run(command, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


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
    assert results["eval_accuracy"] <= results["eval_top5_accuracy"] <= 1.0
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
    """AutoModelForImageClassification (remote code, offline) reproduces the evaluated accuracy exactly and the
    same predictions as this repository's class."""
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
accuracy = (remote_logits.argmax(-1) == torch.tensor(split["label"])).double().mean().item()
print(json.dumps({{"accuracy": accuracy, "max_diff": (remote_logits - local_logits).abs().max().item()}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=default_run, env=offline_env(default_run), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["max_diff"] == 0.0
    assert reloaded["accuracy"] == pytest.approx(read_json(out / "eval_results.json")["eval_accuracy"], abs=1e-12)


# ------------------------------------------------------------------------------- a local ImageNet folder

WNIDS = ["n01440764", "n01443537", "n01484850"]
LIST_LABELS = {"n01440764": 2, "n01443537": 0, "n01484850": 1}  # deliberately not the sorted-folder order


def photo_crops(count: int, size: int = 48) -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        top, left = (37 * index) % (photo.shape[0] - size), (53 * index) % (photo.shape[1] - size)
        crops.append(Image.fromarray(photo[top : top + size, left : left + size]))
    return crops


def make_imagenet_folder(root: Path) -> dict[str, int]:
    """ROOT/{train,val}/<wnid>/*.JPEG with list files; train also holds a corrupt file, grayscale, CMYK, RGBA and
    palette images, and its list names a missing file. Returns the val file -> label map of val_list.txt."""
    crops = iter(photo_crops(40))
    lines = {"train": [], "val": []}
    for split, per_class in (("train", 6), ("val", 2)):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for index in range(per_class):
                name = f"{wnid}/{wnid}_{split}_{index}.JPEG"
                next(crops).save(root / split / name, format="JPEG")
                lines[split].append(f"{name} {LIST_LABELS[wnid]}")
    odd = {
        "gray.JPEG": next(crops).convert("L"), "cmyk.JPEG": next(crops).convert("CMYK"),
        "rgba.png": next(crops).convert("RGBA"), "palette.png": next(crops).convert("P"),
    }
    for name, image in odd.items():
        image.save(root / "train" / WNIDS[0] / name)
        lines["train"].append(f"{WNIDS[0]}/{name} {LIST_LABELS[WNIDS[0]]}")
    (root / "train" / WNIDS[1] / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    lines["train"].append(f"{WNIDS[1]}/corrupt.JPEG {LIST_LABELS[WNIDS[1]]}")
    lines["train"].append(f"{WNIDS[2]}/missing.JPEG {LIST_LABELS[WNIDS[2]]}")
    for split in ("train", "val"):
        (root / f"{split}_list.txt").write_text("\n".join(lines[split]) + "\n")
    return {line.split()[0]: int(line.split()[1]) for line in lines["val"]}


def test_imagenet_folder_uses_list_labels_and_skips_bad_images(tmp_path, caplog):
    root = tmp_path / "imagenet"
    val_labels = make_imagenet_folder(root)
    splits = train_classification.load_image_folder(str(root), 20.0, check_images=True, seed=0)
    assert splits["train"].features["label"].names == ["n01443537", "n01484850", "n01440764"]
    assert len(splits["train"]) == 18 + 4  # the corrupt and the missing file are skipped
    assert "skipped 2 image(s)" in caplog.text
    for path, label in zip(splits["validation"]["image"], splits["validation"]["label"]):
        relative = "/".join(Path(path).parts[-2:])
        assert label == val_labels[relative]
    for path in splits["train"]["image"][-4:]:
        assert train_classification.load_rgb(path).mode == "RGB"


def test_imagenet_folder_trains_and_saves_folder_names(tmp_path):
    """The in1k recipe (RandAugment, random erasing, mixup/cutmix, EMA) for three steps in a worker process."""
    root = tmp_path / "imagenet"
    make_imagenet_folder(root)
    out = tmp_path / "out"
    log = run_script(
        tmp_path, "--data_path", str(root), "--architecture", "internimage_digits", "--image_size", "32",
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "1", "--save_strategy", "no",
        "--eval_strategy", "no", "--disable_tqdm", "true", "--cpu_threads", "1",
    )
    assert "skipped 2 image(s)" in log
    config = read_json(out / "config.json")
    assert config["id2label"] == {"0": "n01443537", "1": "n01484850", "2": "n01440764"}
    results = read_json(out / "eval_results.json")
    assert 0.0 <= results["eval_accuracy"] <= results["eval_top5_accuracy"] == 1.0  # 3 classes: top-5 is certain
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 3


def test_bad_data_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        train_classification.load_image_folder(str(tmp_path / "nowhere"), 20.0, True, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        train_classification.load_image_folder(str(tmp_path / "flat"), 20.0, True, 0)
    root = tmp_path / "lists"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train_list.txt").write_text("a/x.JPEG label\n")
    with pytest.raises(ValueError, match=r"train_list.txt:1: expected"):
        train_classification.load_image_folder(str(root), 20.0, True, 0)


def test_imagefolder_without_splits_gets_a_stratified_held_out_split(tmp_path, caplog):
    crops = iter(photo_crops(20))
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(10):
            next(crops).save(tmp_path / name / f"{index}.png")
    (tmp_path / "empty").mkdir()
    splits = train_classification.load_image_folder(str(tmp_path), 20.0, True, 0)
    assert splits["train"].features["label"].names == ["cat", "dog", "empty"]
    assert "'empty' has no images" in caplog.text
    assert sorted(splits["validation"]["label"]) == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------------ resume


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """Kill after the first checkpoint, re-run the identical command: it continues from the last complete
    checkpoint (model, optimizer, scheduler, EMA, RNG, data position) and ends with the weights of an
    uninterrupted run."""
    args = [*TINY_RUN, "--model_ema_decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0"]
    reference = tmp_path / "reference"
    run_script(tmp_path, *args, "--output_dir", str(reference))

    resumed = tmp_path / "resumed"
    command = [sys.executable, SCRIPT, *args, "--output_dir", str(resumed)]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=offline_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (resumed / "checkpoint-4" / "ema_model.safetensors").exists():
        assert process.poll() is None and time.time() < deadline, "the first run ended before its first checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "model.safetensors").exists(), "the run finished before it was killed"
    last_complete = train_classification.find_resume_checkpoint(str(resumed), needs_ema=True)
    assert last_complete is not None
    log = run_script(tmp_path, *args, "--output_dir", str(resumed))
    assert f"Resuming from {last_complete}" in log, log[:3000]

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
    assert losses == reference_losses


# ------------------------------------------------------------------------------------------------ torchrun


def test_torchrun_two_processes(tmp_path):
    """DDP over gloo: finishes, one output, and the logged loss is the mean loss (about ln 10 at the start), not
    the mean times the number of processes."""
    out = tmp_path / "out"
    run_script(
        tmp_path, *TINY_RUN, "--use_cpu", "true", "--max_steps", "3", "--save_strategy", "no",
        "--output_dir", str(out), launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    )
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 3
    first_loss = next(entry["loss"] for entry in state["log_history"] if "loss" in entry)
    assert abs(first_loss - math.log(10)) < 0.3, first_loss
    assert 0.0 <= read_json(out / "eval_results.json")["eval_accuracy"] <= 1.0
    assert len(list(out.glob("*.safetensors"))) == 1


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


def test_argument_file_and_command_line_take_precedence_over_the_recipe(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nnum_train_epochs: 3\nmin_lr: 0.5\nuse_cpu: true\n")
    model_args, data_args, recipe_args, training_args = train_classification.parse_arguments([str(path)])
    assert training_args.num_train_epochs == 3 and recipe_args.min_lr == 0.5
    assert model_args.architecture == "internimage_digits" and training_args.per_device_train_batch_size == 128
    model_args, _, recipe_args, training_args = train_classification.parse_arguments(
        ["--data_path", "somewhere", "--output_dir", str(tmp_path), "--mixup", "0.2", "--use_cpu", "true"]
    )
    assert recipe_args.mixup == 0.2 and recipe_args.cutmix == 1.0 and recipe_args.auto_augment.startswith("rand-m9")
    assert model_args.architecture == "internimage_t_1k_224" and training_args.max_grad_norm == 5.0
    with pytest.raises(ValueError, match="--recipe 'imagenet' is unknown"):
        train_classification.parse_arguments(["--recipe", "imagenet"])


def test_dataset_folder_through_datasets_decodes_late_and_drops_corrupt_images(tmp_path, caplog):
    """`--dataset_name <local folder>` goes through `datasets` (the Hub path): images stay encoded until the
    transform, which converts modes and drops an undecodable image with a warning instead of failing the batch;
    `--streaming` yields the same transformed examples."""
    crops = iter(photo_crops(12))
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(3):
                next(crops).convert("L" if index == 0 else "RGB").save(tmp_path / split / name / f"{index}.png")
    (tmp_path / "val" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data_args = train_classification.DataArguments(dataset_name=str(tmp_path))
    splits, class_names = train_classification.load_data(data_args, seed=0)
    assert class_names == ["cat", "dog"] and len(splits["validation"]) == 7
    assert isinstance(splits["validation"][0]["image"], dict)  # still encoded
    processor = train_classification.default_image_processor(32)
    transform = train_classification.make_batch_transform(
        lambda images, indices: list(processor(images=images, return_tensors="pt").pixel_values)
    )
    batch = transform(splits["validation"][:])
    assert len(batch["pixel_values"]) == len(batch["labels"]) == 6
    assert batch["pixel_values"][0].shape == (3, 32, 32)
    assert "Skipping an undecodable image" in caplog.text
    streamed, _ = train_classification.load_data(
        train_classification.DataArguments(dataset_name=str(tmp_path), streaming=True), seed=0
    )
    first = next(iter(streamed["train"].map(transform, batched=True, remove_columns=["image", "label"])))
    assert first["pixel_values"].shape == (3, 32, 32) and first["labels"] in (0, 1)
