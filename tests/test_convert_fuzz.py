"""Any file given to the converter: property-based fuzzing of `convert_checkpoints.main(argv)`.

Every run must end either in a verified folder holding exactly the file's tensors, or with exit code 1, a last
stderr line starting with `error:`, no exception escaping `main`, nothing written and no code from the file run.
Inputs: uniformly random bytes, truncations and byte flips of a valid checkpoint in each container (zip, the
legacy pickle format, safetensors), valid containers with wrong contents, pickles that would run code, and
malformed `--official-config` files. The examples are derandomised (the same cases on every run) and kept small
enough for about a minute of CI in total.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from official_format import official_state_dict
from safetensors.torch import load_file, save

from convert_checkpoints import main, rename_official_key

FUZZ_SETTINGS = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# A small T-style model (conv pooler with BatchNorm buffers); flips then often hit the containers' structure.
KWARGS = {
    "core_op": "DCNv3", "channels": 4, "depths": [1, 1, 1, 1], "groups": [1, 1, 1, 1], "num_classes": 3,
    "layer_scale": None, "offset_scale": 1.0, "post_norm": False, "mlp_ratio": 4.0,
}
STATE_DICT = official_state_dict(KWARGS)
FORMATS = ("zip", "legacy", "safetensors")


def serialize(content, container: str) -> bytes:
    """`content` as a `torch.save` zip archive, a legacy-format pickle, or safetensors (`model.` keys)."""
    buffer = io.BytesIO()
    if container == "safetensors":
        return save({f"model.{key}": tensor for key, tensor in content["model"].items()})
    torch.save(content, buffer, _use_new_zipfile_serialization=container == "zip")
    return buffer.getvalue()


VALID = {container: serialize({"model": STATE_DICT}, container) for container in FORMATS}


def run_main(argv: list[str]) -> tuple[int, list[str]]:
    """`main(argv)` with its stderr captured: (exit code, stderr lines)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, stderr.getvalue().strip().splitlines()


def _source_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The official tensors in a file that converted, read here independently of the converter."""
    if path.suffix == ".safetensors":
        return {key.removeprefix("model."): tensor for key, tensor in load_file(path).items()}
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in loaded:
        return loaded["model"]
    return {key.removeprefix("backbone."): tensor for key, tensor in loaded["state_dict"].items()}


def convert_and_check(content: bytes, suffix: str = ".pth", official_config: dict | None = None) -> int:
    """Convert `content` with the CLI in a fresh folder and check the outcome; returns the exit code."""
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / f"input{suffix}"
        source.write_bytes(content)
        config = work / "kwargs.json"
        config.write_text(json.dumps(official_config or KWARGS))
        output = work / "out" / "model"
        code, stderr = run_main([str(source), str(output), "--official-config", str(config)])
        if code == 0:
            written = {key.removeprefix("internimage."): value
                       for key, value in load_file(output / "model.safetensors").items()}
            expected = {
                rename_official_key(key).removeprefix("internimage."): tensor.float() if tensor.is_floating_point()
                else tensor
                for key, tensor in _source_tensors(source).items()
            }
            assert sorted(written) == sorted(expected)
            for key, tensor in written.items():
                torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, equal_nan=True)
        else:
            assert code == 1 and stderr and stderr[-1].startswith("error: "), (code, stderr)
            assert sorted(path.name for path in work.iterdir()) == sorted([source.name, config.name]), "written"
        return code


# ---------------------------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=150)
@given(seed=st.integers(0, 2**64 - 1))
def test_random_4kb_files_give_one_error_line(seed):
    content = random.Random(seed).randbytes(4096)  # uniformly random bytes (st.binary favours small values)
    assert convert_and_check(content) == 1


def _position(size: int) -> st.SearchStrategy[int]:
    """Anywhere, or near either end (where the containers keep their structure: pickle, zip directory)."""
    return st.integers(0, size - 1) | st.integers(0, min(size, 4096) - 1) | st.integers(max(size - 4096, 0), size - 1)


@st.composite
def cuts(draw) -> tuple[str, int]:
    """A container and where to cut it."""
    container = draw(st.sampled_from(FORMATS))
    return container, draw(_position(len(VALID[container])))


@st.composite
def flips(draw) -> tuple[str, list[tuple[int, int]]]:
    """A container and 1-3 (position, xor mask) byte flips."""
    container = draw(st.sampled_from(FORMATS))
    size = len(VALID[container])
    return container, draw(st.lists(st.tuples(_position(size), st.integers(1, 255)), min_size=1, max_size=3))


def _suffix(container: str) -> str:
    return ".safetensors" if container == "safetensors" else ".pth"


@settings(FUZZ_SETTINGS, max_examples=40)
@given(case=cuts())
def test_truncated_checkpoints(case):
    container, cut = case
    assert convert_and_check(VALID[container][:cut], _suffix(container)) == 1


@settings(FUZZ_SETTINGS, max_examples=60)
@given(case=flips())
def test_byte_flips_give_the_files_tensors_or_one_error_line(case):
    container, changes = case
    content = bytearray(VALID[container])
    for position, mask in changes:
        content[position] ^= mask
    convert_and_check(bytes(content), _suffix(container))


@pytest.mark.parametrize("container", FORMATS)
def test_a_flip_inside_tensor_data_is_still_a_checkpoint(container):
    """The flipped value is converted as it is (the tensors are compared in `convert_and_check`)."""
    content = bytearray(VALID[container])
    data = STATE_DICT["head.weight"].numpy().tobytes()
    position = bytes(content).find(data)
    assert position > 0 and bytes(content).find(data, position + 1) == -1
    content[position + 4 * 7] ^= 0x55  # the low byte of element 7: still a finite float
    assert convert_and_check(bytes(content), _suffix(container)) == 0


# ---------------------------------------------------------------------------------------------------------------
# Valid containers, wrong contents
# ---------------------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64)


@st.composite
def tensors(draw, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    shape = shape if shape is not None else tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    return values.to(dtype) if dtype.is_complex else (values * 4).to(dtype)


LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | tensors()
VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
KEYS = st.sampled_from(sorted(STATE_DICT)) | st.text(max_size=12)


@st.composite
def mutated_state_dict(draw) -> dict:
    """The valid state dict with one thing changed: a tensor's dtype, shape or values, a key, or a wrong value."""
    state_dict = dict(STATE_DICT)
    key = draw(st.sampled_from(sorted(state_dict)))
    change = draw(st.sampled_from(
        ["dtype", "shape", "non_finite", "drop", "add", "rename", "value", "non_contiguous", "shared"]
    ))
    if change == "dtype":
        state_dict[key] = state_dict[key].to(draw(st.sampled_from(DTYPES)))
    elif change == "shape":
        state_dict[key] = draw(tensors())
    elif change == "non_finite" and state_dict[key].is_floating_point() and state_dict[key].numel():
        state_dict[key] = state_dict[key].clone().view(-1).index_fill(0, torch.tensor([0]), draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")]))).view(state_dict[key].shape)
    elif change == "drop":
        del state_dict[key]
    elif change == "add":
        state_dict[draw(KEYS)] = draw(tensors())
    elif change == "rename":
        state_dict[draw(KEYS)] = state_dict.pop(key)
    elif change == "value":
        state_dict[key] = draw(VALUES)
    elif change == "non_contiguous" and state_dict[key].ndim >= 2:
        state_dict[key] = state_dict[key].transpose(0, 1).contiguous().transpose(0, 1)
    elif change == "shared":  # two entries viewing one storage
        other = draw(st.sampled_from(sorted(state_dict)))
        if state_dict[other].shape == state_dict[key].shape and state_dict[other].dtype == state_dict[key].dtype:
            state_dict[other] = state_dict[key]
    return state_dict


CONTAINERS = st.one_of(
    mutated_state_dict().map(lambda state_dict: {"model": state_dict}),
    mutated_state_dict().map(lambda state_dict: {"model": state_dict, "model_ema": state_dict}),
    mutated_state_dict().map(lambda state_dict: {"state_dict": {f"backbone.{k}": v for k, v in state_dict.items()}}),
    st.dictionaries(KEYS, tensors() | VALUES, max_size=4).map(lambda state_dict: {"model": state_dict}),
    st.dictionaries(st.sampled_from(["model", "module", "model_ema", "state_dict", "epoch"]), VALUES, max_size=3),
    VALUES,
)


@settings(FUZZ_SETTINGS, max_examples=30)
@given(content=CONTAINERS, container=st.sampled_from(["zip", "legacy"]))
def test_valid_containers_with_wrong_contents(content, container):
    convert_and_check(serialize(content, container))


class CodeCarrier:
    """Unpickling this would create `path` (a stand-in for arbitrary code in a malicious checkpoint)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@settings(FUZZ_SETTINGS, max_examples=12)
@given(where=st.sampled_from(["top", "model", "tensor", "extra"]), container=st.sampled_from(["zip", "legacy"]))
def test_pickles_that_would_run_code_are_refused_unrun(where, container, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "MARKER"
    carrier = CodeCarrier(str(marker))
    content = {
        "top": carrier,
        "model": {"model": carrier},
        "tensor": {"model": {**STATE_DICT, "head.bias": carrier}},
        "extra": {"model": STATE_DICT, "config": carrier},
    }[where]
    assert convert_and_check(serialize(content, container)) == 1
    assert not marker.exists()


def test_the_code_carrier_is_real(tmp_path):
    """An unrestricted unpickler does run it: the refusal above is what keeps the marker from appearing."""
    buffer = io.BytesIO(serialize({"model": CodeCarrier(str(tmp_path / "MARKER"))}, "zip"))
    torch.load(buffer, weights_only=False)
    assert (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------------------------------------------------------
# --official-config files
# ---------------------------------------------------------------------------------------------------------------

OFFICIAL_CHECKPOINT = VALID["zip"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@st.composite
def json_kwargs(draw) -> str:
    """The valid constructor kwargs with one value replaced, a key added or removed, or broken JSON."""
    kwargs = dict(KWARGS)
    change = draw(st.sampled_from(["value", "add", "drop", "text", "wrap"]))
    if change == "value":
        kwargs[draw(st.sampled_from(sorted(KWARGS)))] = draw(JSON_VALUES)
    elif change == "add":
        kwargs[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    elif change == "drop":
        kwargs.pop(draw(st.sampled_from(sorted(KWARGS))))
    elif change == "wrap":
        return json.dumps(draw(JSON_VALUES))
    text = json.dumps(kwargs)
    if change == "text":
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.text(max_size=4)) + text[cut + draw(st.integers(0, 3)):]
    return text


YAML_KEYS = {
    "CHANNELS": "channels", "DEPTHS": "depths", "GROUPS": "groups", "LAYER_SCALE": "layer_scale",
    "OFFSET_SCALE": "offset_scale", "POST_NORM": "post_norm", "MLP_RATIO": "mlp_ratio",
}


def official_yaml(kwargs: dict, image_size: object = 64, extra: str = "") -> str:
    """An official training YAML (classification/configs/*.yaml layout) for `kwargs`."""
    lines = ["DATA:", f"  IMG_SIZE: {image_size}", "MODEL:", "  TYPE: intern_image",
             f"  NUM_CLASSES: {kwargs['num_classes']}", "  INTERN_IMAGE:", "    CORE_OP: 'DCNv3'"]
    lines += [f"    {key}: {kwargs[name]}" for key, name in YAML_KEYS.items()]
    return "\n".join(lines) + "\n" + extra


@st.composite
def yaml_texts(draw) -> str:
    """The valid YAML with a value replaced by any YAML scalar or text, or cut and patched."""
    text = official_yaml(KWARGS)
    lines = text.splitlines()
    index = draw(st.integers(0, len(lines) - 1))
    if draw(st.booleans()) and ":" in lines[index]:
        key = lines[index].split(":", 1)[0]
        replacement = draw(st.sampled_from(["[1, 1", "None", "abc", "1e999", "-4", "2001-13-45", "{a: 1}", "!!binary x",
                                            "*alias", "&a [1, *a]", "'((((((((((((((((((((((((((((((((((((((('", "[]"]))
        lines[index] = f"{key}: {replacement}"
    else:
        cut = draw(st.integers(0, len(lines[index])))
        lines[index] = lines[index][:cut] + draw(st.text(max_size=4))
    return "\n".join(lines) + "\n"


def _convert_with_config(text: str | bytes, suffix: str) -> int:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "input.pth").write_bytes(OFFICIAL_CHECKPOINT)
        (work / f"config{suffix}").write_bytes(text if isinstance(text, bytes) else text.encode())
        code, stderr = run_main([str(work / "input.pth"), str(work / "out"), "--official-config",
                                 str(work / f"config{suffix}"), "--no-verify"])
        if code != 0:
            assert code == 1 and stderr and stderr[-1].startswith("error: "), (code, stderr)
            assert sorted(path.name for path in work.iterdir()) == ["config" + suffix, "input.pth"], "written"
        return code


@settings(FUZZ_SETTINGS, max_examples=60)
@given(text=json_kwargs())
def test_malformed_json_kwargs(text):
    _convert_with_config(text, ".json")


@settings(FUZZ_SETTINGS, max_examples=40)
@given(text=yaml_texts())
def test_malformed_official_yaml(text):
    _convert_with_config(text, ".yaml")


@settings(FUZZ_SETTINGS, max_examples=20)
@given(content=st.binary(max_size=64) | st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(512)),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_binary_official_config_files(content, suffix):
    assert _convert_with_config(content, suffix) == 1


def test_unknown_json_kwargs_are_rejected(tmp_path, capsys):
    (tmp_path / "input.pth").write_bytes(OFFICIAL_CHECKPOINT)
    (tmp_path / "kwargs.json").write_text(json.dumps({**KWARGS, "post_norms": True}))
    assert main([str(tmp_path / "input.pth"), str(tmp_path / "out"), "--official-config",
                 str(tmp_path / "kwargs.json")]) == 1
    assert "unknown constructor argument 'post_norms'" in capsys.readouterr().err


def test_official_yaml_keys_outside_the_architecture_are_ignored(tmp_path):
    extra = ("TRAIN:\n  EPOCHS: 300\n  EMA:\n    ENABLE: true\n    DECAY: 0.9999\nAUG:\n  MIXUP: 0.8\n"
             "PRINT_FREQ: 10\n")
    text = official_yaml(KWARGS, extra=extra).replace("  TYPE: intern_image", "  TYPE: intern_image\n  DROP_RATE: 0.0"
                                                      "\n  PRETRAINED: pretrained/x.pth\n  LABEL_SMOOTHING: 0.1")
    (tmp_path / "input.pth").write_bytes(OFFICIAL_CHECKPOINT)
    (tmp_path / "config.yaml").write_text(text)
    assert main([str(tmp_path / "input.pth"), str(tmp_path / "out"), "--official-config",
                 str(tmp_path / "config.yaml"), "--no-verify"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["channels"] == 4 and config["image_size"] == 64 and len(config["id2label"]) == 3


# ---------------------------------------------------------------------------------------------------------------
# Real command lines
# ---------------------------------------------------------------------------------------------------------------


def _key_error_file() -> bytes:
    """A random 4 KB file on which the legacy unpickler used to raise `KeyError` (a missing memo entry)."""
    return random.Random(29_464_981_836_061_736).randbytes(4096)


@pytest.mark.parametrize("case", ["key_error_bytes", "truncated_legacy", "code_carrier"])
def test_command_line_runs_end_in_one_error_line(case, tmp_path, session_hf_home):
    content = {
        "key_error_bytes": _key_error_file(),
        "truncated_legacy": VALID["legacy"][: len(VALID["legacy"]) // 3],
        "code_carrier": serialize({"model": CodeCarrier(str(tmp_path / "MARKER"))}, "legacy"),
    }[case]
    (tmp_path / "input.pth").write_bytes(content)
    completed = run_python(["convert_checkpoints.py", tmp_path / "input.pth", tmp_path / "out"], session_hf_home,
                           cwd=ROOT)
    assert completed.returncode == 1, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("error: "), completed.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.pth"]
