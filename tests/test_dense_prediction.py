"""Dense prediction from a converted folder alone: UperNet (and every model that builds its backbone with
`load_backbone`) on the InternImage backbone with its pretrained weights, by the README's lines, in a fresh
process whose working folder is outside the repository, with the repository off the import path, a private
HF_HOME and no network; from a local folder and from a Hub repo id (served from that HF_HOME's cache)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, ROOT
from official_format import fixture_kwargs

from configuration_internimage import InternImageConfig
from convert_checkpoints import DENSE_PREDICTION_EXAMPLE, finalize_config, main, write_model_card

PLACEHOLDER = "path/to/converted/folder"
REPO_ID = "me/internimage-tiny"

USER_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers.backbone_utils import load_backbone

snippet, folder, other_folder, repo_root, out = sys.argv[1:6]
assert repo_root not in sys.path and "modeling_internimage" not in sys.modules
results = {}
for name in ("REPO_ID", folder):
    namespace = {}
    exec(snippet.replace("PLACEHOLDER", name), namespace)  # the README's lines, as written
    segmenter, encoder = namespace["segmenter"], namespace["encoder"]
    backbone = segmenter.backbone
    weights = {k.removeprefix("internimage."): v for k, v in load_file(folder + "/model.safetensors").items()}
    results[name] = {
        "backbone": [type(backbone).__module__, type(backbone).__name__],
        "weights_equal": all(torch.equal(value, weights[key]) for key, value in backbone.state_dict().items()),
        "num_weights": len(backbone.state_dict()),
        "logits": list(namespace["segmentation_logits"].shape),
    }
# The local folder's segmenter: the backbone computes the encoder's maps, and trains.
pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
segmenter, encoder = namespace["segmenter"], namespace["encoder"]
with torch.no_grad():
    results["maps_equal"] = [torch.equal(a, b) for a, b in zip(segmenter.backbone.eval()(pixel_values).feature_maps,
                                                                 encoder.eval()(pixel_values).hidden_states)]
segmenter.train()
segmenter(pixel_values, labels=torch.randint(0, 150, (2, 64, 64))).loss.backward()
results["stem_grad"] = float(segmenter.backbone.embeddings.conv1.weight.grad.abs().sum())

# Any model that builds its backbone with `load_backbone`: the generic call, and Mask2Former.
results["load_backbone"] = type(load_backbone(encoder.config)).__name__
config = Mask2FormerConfig(backbone_config=encoder.config, feature_size=32, mask_feature_size=32, hidden_dim=32,
                           encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                           num_queries=5, num_labels=3)
mask2former = Mask2FormerForUniversalSegmentation(config).eval()
pixel_encoder = mask2former.model.pixel_level_module.encoder
pixel_encoder.load_state_dict(encoder.state_dict())
with torch.no_grad():
    outputs = mask2former(torch.randn(1, 3, 64, 64))
results["mask2former"] = [type(pixel_encoder).__name__, list(outputs.masks_queries_logits.shape)]

# No hijack: another folder's config (its own copy of the code) is not mapped to this folder's backbone, and
# without trust_remote_code nothing of it loads.
other_config = AutoConfig.from_pretrained(other_folder, trust_remote_code=True)
results["other_marker"] = getattr(sys.modules[type(other_config).__module__], "MARKER", None)
try:
    load_backbone(other_config)
    results["other_without_model"] = "loaded"
except ValueError as error:
    results["other_without_model"] = "trust_remote_code" in str(error)
try:
    AutoConfig.from_pretrained(other_folder)
    results["other_untrusted"] = "loaded"
except ValueError as error:
    results["other_untrusted"] = "trust_remote_code" in str(error)
other = AutoModel.from_pretrained(other_folder, trust_remote_code=True, pooler_type=None)
other_backbone = load_backbone(other.config)
results["other_backbone"] = [type(other_backbone).__module__ == type(other).__module__,
                             type(other_backbone).__module__ != type(backbone).__module__]
json.dump(results, open(out, "w"))
"""


def readme_snippet() -> str:
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text.split("## Dense prediction backbone\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return blocks[0]


def test_readme_lines_are_three():
    """At most three lines between the folder and a UperNet holding the pretrained backbone, and nothing from a
    clone of this repository."""
    assert not re.search(r"internimage_auto|modeling_internimage|configuration_internimage", readme_snippet())
    code = [line for line in readme_snippet().splitlines() if line.strip() and not line.startswith(("import", "from"))]
    start = next(i for i, line in enumerate(code) if PLACEHOLDER in line)
    end = next(i for i, line in enumerate(code) if "load_state_dict" in line)
    assert end - start <= 3, code[start : end + 1]


def test_model_card_gives_the_same_lines(tmp_path):
    write_model_card(tmp_path / "README.md", finalize_config(InternImageConfig()), None, [])
    card = (tmp_path / "README.md").read_text()
    assert f"```python\n{DENSE_PREDICTION_EXAMPLE}```" in card and readme_snippet() == DENSE_PREDICTION_EXAMPLE


def _hub_cache(hf_home: Path, folder: Path) -> None:
    """`folder` as the cached snapshot of the Hub repo REPO_ID (what a download leaves in HF_HOME)."""
    repo = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


def test_upernet_from_a_converted_folder_alone(tmp_path):
    (tmp_path / "kwargs.json").write_text(json.dumps(fixture_kwargs("tiny_t")))
    folder, other = tmp_path / "internimage-tiny", tmp_path / "other-internimage"
    options = ["--official-config", str(tmp_path / "kwargs.json"), "--no-verify"]
    assert main([str(FIXTURES / "models" / "tiny_t" / "checkpoint.pth"), str(folder), *options]) == 0
    shutil.copytree(folder, other)
    with open(other / "configuration_internimage.py", "a") as handle:
        handle.write('\nMARKER = "other"\n')
    hf_home = tmp_path / "hf_home"
    _hub_cache(hf_home, folder)
    work = tmp_path / "user"
    work.mkdir()
    (work / "script.py").write_text(USER_SCRIPT.replace("REPO_ID", REPO_ID))
    snippet = readme_snippet().replace(PLACEHOLDER, "PLACEHOLDER").replace("224, 224", "64, 64")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "script.py", snippet, str(folder), str(other), str(ROOT), "results.json"]
    completed = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "LOAD REPORT" not in completed.stderr
    results = json.loads((work / "results.json").read_text())

    for name in (str(folder), REPO_ID):
        result = results[name]
        module, class_name = result["backbone"]
        assert module.startswith("transformers_modules.") and class_name == "InternImageBackbone"
        assert result["weights_equal"] and result["num_weights"] > 100  # every backbone tensor is the folder's
        assert result["logits"] == [1, 150, 64, 64]
    assert results["maps_equal"] == [True] * 4 and results["stem_grad"] > 0
    assert results["load_backbone"] == "InternImageBackbone"
    assert results["mask2former"] == ["InternImageBackbone", [1, 5, 16, 16]]
    assert results["other_marker"] == "other"
    assert results["other_without_model"] is True and results["other_untrusted"] is True
    assert results["other_backbone"] == [True, True]

