"""InternImage in the ecosystem: pipelines, torch.compile, sharded low-memory loading, and the README snippets of
those sections (run in a subprocess, offline, with a temporary HF_HOME). The backbone tests are in
`test_modeling_internimage.py`, ONNX in `test_export_onnx.py`, half precision in `test_half_precision.py`.

The fixture models (`tests/fixtures/models/tiny_t`, `tiny_l`, official weights) are converted in memory with
`convert_checkpoints.rename_official_key` and `config_from_official_kwargs`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from official_format import fixture_classifier  # noqa: E402

from configuration_internimage import AUTO_MAP  # noqa: E402
from convert_checkpoints import model_code_files  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402

CODE_FILES = model_code_files()
FOLDER_PLACEHOLDER = "path/to/converted/folder"
IMAGE_PLACEHOLDER = "path/to/image.jpg"


def imagenet_names(count: int) -> dict[int, str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {index: info.index_to_description(index) for index in range(count)}


def save_remote_folder(model: InternImageForImageClassification, folder: Path, image_size: int = 64) -> Path:
    """A remote-code folder: weights, config with ImageNet label names and `auto_map`, preprocessor, code files."""
    from transformers import CLIPImageProcessor

    model.config.id2label = imagenet_names(model.config.num_labels)
    model.config.label2id = {name: index for index, name in model.config.id2label.items()}
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    for name in CODE_FILES:
        shutil.copy(ROOT / name, folder / name)
    return folder


def sample_image_path(folder: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    path = folder / "china.jpg"
    Image.fromarray(load_sample_images().images[0]).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "backend"), [("tiny_t", "inductor"), ("tiny_l", "aot_eager")])
def test_torch_compile_full_graph_matches_eager(name, backend):
    """fullgraph=True fails on any graph break. Inductor on one fixture (its C++ compile costs ~1 min on 2 cores)."""
    torch._dynamo.reset()
    model, pixel_values, expected = fixture_classifier(name)
    with torch.no_grad():
        eager = model(pixel_values).logits
        compiled = torch.compile(model, backend=backend, fullgraph=True)(pixel_values).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled, expected["logits"], rtol=1e-4, atol=1e-4)


def test_sharded_t_model_loads_with_device_map_auto_within_memory_budget(tmp_path, monkeypatch):
    """Host memory of a CPU load; the GPU is hidden from the loading process (`device_map="auto"` would pick it, and
    creating a CUDA context alone grows the RSS by hundreds of MiB). tests/test_gpu_model.py loads onto a GPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_loading import measure, save_sharded

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert save_sharded(tmp_path, "internimage_t_1k_224", "20MB") > 1
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    result = measure(tmp_path)
    assert result["device"] == "cpu"
    assert 100 < result["weights_mb"] < 130  # 29.9M float32 parameters
    assert result["peak_growth_mb"] < 1.5 * result["weights_mb"], result


# ---------------------------------------------------------------------------------------------------------------
# README snippets and pipelines (remote code, offline, fresh HF_HOME)
# ---------------------------------------------------------------------------------------------------------------

README_RUNNER = r"""
import json, re, sys, torch
readme, folder, image, out, root = sys.argv[1:6]
sys.path.insert(0, root)
text = "\n".join(open(path).read() for path in readme.split(","))  # README, then docs/usage.md
from transformers import AutoBackbone, AutoConfig
# transformers 5.23's AutoBackbone.from_pretrained treats a local folder as a Hub repo id; from_config resolves auto_map
remote_config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
remote_backbone = AutoBackbone.from_config(remote_config, trust_remote_code=True)
results = {"remote_backbone": [type(remote_backbone).__module__, type(remote_backbone).__name__,
                               [list(f.shape) for f in remote_backbone(torch.zeros(1, 3, 64, 64)).feature_maps]]}
# The backbone section runs last: after its `register_internimage()`, the Auto classes use the local classes.
for heading in ("Classify", "Pipelines", "Large variants and low-memory loading", "Half precision", "torch.compile",
                "Dense prediction backbone"):
    section = text.split("## " + heading + "\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        code = block.replace("path/to/converted/folder", folder).replace("path/to/image.jpg", image)
        code = code.replace("path/to/sharded/folder", out + ".sharded").replace("224, 224", "64, 64")
        code = code.replace('max_shard_size="20MB"', 'max_shard_size="500KB"')  # the tiny model is 2 MB
        if heading == "torch.compile":  # inductor is tested in-process; keep the snippet's compile cheap here
            code = code.replace("fullgraph=True", "fullgraph=True, backend='aot_eager'")
        namespace = {}
        exec(compile(code, heading, "exec"), namespace)
        results.update({k: v for k, v in namespace.items() if k in (
            "predictions", "last_stage_map", "pooled_features")})
        if heading == "Classify":
            results["usage_logits"] = namespace["logits"].tolist()
        for key in ("hidden_states", "feature_maps", "segmentation_logits", "half_logits", "compiled_logits"):
            if key in namespace:
                value = namespace[key]
                results[key] = [list(t.shape) for t in value] if isinstance(value, tuple) else list(value.shape)
        if "model" in namespace:
            results.setdefault("classes", []).append(type(namespace["model"]).__module__)
json.dump(results, open(out, "w"))
"""


def test_readme_snippets_and_pipelines(tmp_path):
    from transformers import CLIPImageProcessor

    model, _, _ = fixture_classifier("tiny_t")
    folder = save_remote_folder(model, tmp_path / "internimage-tiny")
    image = sample_image_path(tmp_path)
    (tmp_path / "runner.py").write_text(README_RUNNER)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # pipelines would pick a GPU; the CPU references below are compared closely
    documents = f"{ROOT / 'README.md'},{ROOT / 'docs' / 'usage.md'}"
    command = [sys.executable, "runner.py", documents, str(folder), str(image), "results.json", str(ROOT)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())

    from PIL import Image

    pixel_values = CLIPImageProcessor.from_pretrained(folder)(images=Image.open(image), return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values.pixel_values).logits[0]
    probabilities = logits.softmax(-1)
    top = probabilities.topk(5)
    names = imagenet_names(10)
    assert [p["label"] for p in results["predictions"]] == [names[i] for i in top.indices.tolist()]
    assert results["predictions"][0]["label"] == names[int(logits.argmax())]
    torch.testing.assert_close(
        torch.tensor([p["score"] for p in results["predictions"]]), top.values, rtol=1e-4, atol=1e-5
    )
    assert torch.tensor(results["last_stage_map"]).shape == (1, 128, 2, 2)
    with torch.no_grad():
        pooled = model.internimage(pixel_values.pixel_values).pooler_output
    torch.testing.assert_close(torch.tensor(results["pooled_features"]), pooled, rtol=1e-4, atol=1e-5)
    assert results["feature_maps"] == [[1, 16, 16, 16], [1, 32, 8, 8], [1, 64, 4, 4], [1, 128, 2, 2]]
    assert results["hidden_states"] == results["feature_maps"]  # "Usage", on the same image size
    torch.testing.assert_close(torch.tensor(results["usage_logits"])[0], logits, rtol=1e-4, atol=1e-5)
    assert results["segmentation_logits"] == [1, 150, 64, 64]
    assert results["half_logits"] == [1, 10] and results["compiled_logits"] == [1, 10]
    assert all(module.startswith("transformers_modules.") for module in results["classes"]), results["classes"]
    module, class_name, shapes = results["remote_backbone"]
    assert module.startswith("transformers_modules.") and class_name == "InternImageBackbone"
    assert shapes == results["feature_maps"]
    assert len(list((tmp_path / "results.json.sharded").glob("*.safetensors"))) > 1
