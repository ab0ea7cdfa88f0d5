"""InternImage in the ecosystem: AutoBackbone/UperNet, pipelines, torch.compile, ONNX, sharded low-memory loading,
half precision, and the README snippets of those sections (run in a subprocess, offline, with a temporary HF_HOME).

The fixture models (`tests/fixtures/models/tiny_t`, `tiny_l`, official weights) are converted in memory with
`convert_checkpoints.rename_official_key` and `config_from_official_kwargs`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configuration_internimage import AUTO_MAP, InternImageConfig  # noqa: E402
from convert_checkpoints import config_from_official_kwargs, model_code_files, rename_official_key  # noqa: E402
from internimage_auto import register_internimage  # noqa: E402
from modeling_internimage import InternImageBackbone, InternImageForImageClassification  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "models"
CODE_FILES = model_code_files()
FOLDER_PLACEHOLDER = "path/to/converted/folder"
IMAGE_PLACEHOLDER = "path/to/image.jpg"


def fixture_classifier(name: str) -> tuple[InternImageForImageClassification, torch.Tensor, dict]:
    """The official fixture model converted in memory, its input and the official outputs."""
    folder = FIXTURES / name
    kwargs = json.loads((folder / "official_args.json").read_text())["kwargs"]
    official = torch.load(folder / "checkpoint.pth", weights_only=True)["model"]
    model = InternImageForImageClassification(config_from_official_kwargs(kwargs, drop_path_rate=0.0)).eval()
    model.load_state_dict({rename_official_key(k): v for k, v in official.items()}, strict=True)
    return model, torch.load(folder / "input.pt", weights_only=True), torch.load(folder / "expected.pt")


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
# Backbone
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_t", "tiny_l"])
def test_backbone_loads_classifier_folder_and_matches_official_stages(name, tmp_path):
    classifier, pixel_values, expected = fixture_classifier(name)
    classifier.save_pretrained(tmp_path)
    backbone, info = InternImageBackbone.from_pretrained(
        tmp_path, out_features=["stem", "stage1", "stage2", "stage3", "stage4"], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not info["unexpected_keys"]  # the pooler and classifier are ignored on purpose
    assert not any(name.startswith("pooler") for name, _ in backbone.named_parameters())
    with torch.no_grad():
        outputs = backbone.eval()(pixel_values)
    references = [expected["stem"]] + [expected[f"stage_{i}"] for i in range(4)]
    assert backbone.channels == [reference.shape[1] for reference in references]
    for mine, reference in zip(outputs.feature_maps, references, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hidden_states = classifier.internimage(pixel_values).hidden_states
    for mine, reference in zip(outputs.feature_maps[1:], hidden_states, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_backbone_out_features_and_config_round_trip(tmp_path):
    config = InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], out_indices=[-1])
    assert config.out_features == ["stage4"]
    config.save_pretrained(tmp_path)
    reloaded = InternImageConfig.from_pretrained(tmp_path)
    assert reloaded.out_features == ["stage4"] and reloaded.stage_names == config.stage_names
    backbone = InternImageBackbone(InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16]))
    feature_maps = backbone(torch.randn(1, 3, 32, 64)).feature_maps
    assert [tuple(f.shape) for f in feature_maps] == [(1, 8, 8, 16), (1, 16, 4, 8), (1, 32, 2, 4), (1, 64, 1, 2)]
    with pytest.raises(ValueError, match="out_features must be a subset"):
        InternImageConfig(out_features=["stage5"])
    with pytest.raises(ValueError, match="frozen_stages"):
        InternImageConfig(frozen_stages=5)


def test_frozen_stages_follow_the_official_detection_backbone(tmp_path):
    config = InternImageConfig(
        channels=8, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], frozen_stages=2, drop_path_rate=0.0
    )
    InternImageBackbone(config).save_pretrained(tmp_path)
    backbone = InternImageBackbone.from_pretrained(tmp_path).train()
    for index, stage in enumerate(backbone.encoder.stages):
        frozen = index < 2
        assert all(p.requires_grad != frozen for p in stage.parameters()), index
        assert all(module.training != frozen for module in stage.modules()), index
    assert all(p.requires_grad for p in backbone.embeddings.parameters())  # the official code leaves the stem
    # A plain sum of a LayerNorm output does not depend on its input (zero gradient): weight the maps randomly.
    feature_maps = backbone(torch.randn(1, 3, 32, 32)).feature_maps
    sum((f * torch.randn_like(f)).sum() for f in feature_maps).backward()
    assert backbone.encoder.stages[0].layers[0].dcn.input_proj.weight.grad is None
    assert backbone.encoder.stages[2].layers[0].dcn.input_proj.weight.grad.abs().sum() > 0


def test_upernet_on_internimage_forward_backward_and_round_trip(tmp_path):
    from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation
    from transformers.backbone_utils import load_backbone

    register_internimage()
    register_internimage()  # idempotent
    backbone_config = InternImageConfig(channels=8, depths=[1, 1, 2, 1], groups=[2, 4, 8, 16], drop_path_rate=0.0)
    assert type(AutoBackbone.from_config(backbone_config)) is InternImageBackbone
    config = UperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_in_channels=32, num_labels=3)
    assert type(load_backbone(config)) is InternImageBackbone
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    outputs = model(pixel_values=pixel_values, labels=labels)
    assert outputs.logits.shape == (2, 3, 64, 64) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.embeddings.conv1.weight.grad.abs().sum() > 0
    assert model.backbone.encoder.stages[3].layers[0].dcn.output_proj.weight.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path / "upernet")
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    assert type(reloaded.backbone) is InternImageBackbone
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, ONNX, half precision, loading
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


def test_onnx_export_cli_matches_pytorch(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    from export_onnx import main

    model, pixel_values, expected = fixture_classifier("tiny_l")
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "model.onnx"
    assert main([str(tmp_path / "model"), str(output), "--height", "64", "--width", "96"]) == 0
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        eager = model(pixel_values).logits
    torch.testing.assert_close(torch.from_numpy(logits), eager, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(logits), expected["logits"], rtol=1e-4, atol=1e-4)
    for batch in (1, 3):  # the batch size is dynamic
        images = pixel_values[:1].repeat(batch, 1, 1, 1) + 0.1 * torch.randn(batch, *pixel_values.shape[1:])
        (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
        with torch.no_grad():
            eager = model(images).logits
        torch.testing.assert_close(torch.from_numpy(logits), eager, rtol=0, atol=1e-4)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "x.onnx")])
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny_t", "tiny_l"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_from_pretrained_matches_float32(name, dtype, tolerance, tmp_path):
    model, pixel_values, expected = fixture_classifier(name)
    model.save_pretrained(tmp_path)
    half = InternImageForImageClassification.from_pretrained(tmp_path, dtype=dtype).eval()
    assert half.classifier.weight.dtype == dtype
    with torch.no_grad():
        logits = half(pixel_values.to(dtype)).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), expected["logits"], rtol=0, atol=tolerance)
    assert torch.equal(logits.float().argmax(-1), expected["logits"].argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu_matches_float32(dtype, tmp_path):
    model, pixel_values, expected = fixture_classifier("tiny_t")
    model.save_pretrained(tmp_path)
    half = InternImageForImageClassification.from_pretrained(tmp_path, dtype=dtype).eval().cuda()
    with torch.no_grad():
        logits = half(pixel_values.to("cuda", dtype)).logits.float().cpu()
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0.1)
    assert torch.equal(logits.argmax(-1), expected["logits"].argmax(-1))


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
text = open(readme).read()
from transformers import AutoBackbone, AutoConfig
# transformers 5.23's AutoBackbone.from_pretrained treats a local folder as a Hub repo id; from_config resolves auto_map
remote_config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
remote_backbone = AutoBackbone.from_config(remote_config, trust_remote_code=True)
results = {"remote_backbone": [type(remote_backbone).__module__, type(remote_backbone).__name__,
                               [list(f.shape) for f in remote_backbone(torch.zeros(1, 3, 64, 64)).feature_maps]]}
# The backbone section runs last: after its `register_internimage()`, the Auto classes use the local classes.
for heading in ("Usage", "Pipelines", "Large variants and low-memory loading", "Half precision", "torch.compile",
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
        if heading == "Usage":
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
    command = [sys.executable, "runner.py", str(ROOT / "README.md"), str(folder), str(image), "results.json", str(ROOT)]
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


def test_readme_onnx_command_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from export_onnx import main

    section = (ROOT / "README.md").read_text().split("## ONNX export\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1)
    model, _, _ = fixture_classifier("tiny_t")
    model.save_pretrained(tmp_path / "model")
    command = command.replace(FOLDER_PLACEHOLDER, str(tmp_path / "model")).replace("224", "64")
    arguments = shlex.split(command)
    assert arguments[:2] == ["python", "export_onnx.py"] and "--check" in arguments
    monkeypatch.chdir(tmp_path)
    assert main(arguments[2:]) == 0
    assert (tmp_path / "internimage.onnx").stat().st_size > 0
