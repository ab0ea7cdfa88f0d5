"""Transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`), obtained at
test time.

They live in the `tests/` folder of the transformers source distribution, not in the wheel, and are not copied into
this repository. `load_transformers_common_tests()` finds them, in this order:

1. `$INTERNIMAGE_TRANSFORMERS_SRC`: an extracted transformers source tree (a git checkout or an unpacked sdist);
2. the cache `${XDG_CACHE_HOME:-~/.cache}/internimage-tests/transformers-<installed version>/`;
3. `pip download --no-deps --no-binary :all: transformers==<installed version>` into that cache (the only network
   access of the test suite).

The sdist ships the top-level `tests/*.py` only; the three helper modules they import from sub-folders are
replaced by the stand-ins below:
- `exporters.test_export.ExportTesterMixin` (a base of `ModelTesterMixin`): its tests are in no distribution, so
  the stand-in reports each of them (`EXPORT_TESTS`) as skipped, with that reason;
- `generation.test_utils.GenerationTesterMixin`: only used by `ModelTesterMixin` to check that a model that cannot
  generate does not inherit it, which an empty class answers correctly (it holds no test);
- `utils.test_configuration_utils.config_common_kwargs`: the values `ConfigTester` round-trips (data, no test).

When the sources cannot be obtained, the returned mixins make every common test skip with the reason, except under
CI (`CI=true`, as GitHub Actions and `.ci/run` set): there they fail, so a CI run cannot go green without them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import transformers

SOURCE_ENV_VAR = "INTERNIMAGE_TRANSFORMERS_SRC"
PACKAGE = "transformers_upstream_tests"
PIP_TIMEOUT_S = 600
# The tests of transformers' `ExportTesterMixin` (tests/exporters/test_export.py, not in the source distribution).
EXPORT_TESTS = ("test_torch_export", "test_onnx_export", "test_executorch_export")
EXPORT_SKIP_REASON = (
    "transformers' ExportTesterMixin (tests/exporters/test_export.py) is not in the transformers source distribution;"
    " ONNX export is tested in tests/test_ecosystem.py"
)

# Non-default values of `PretrainedConfig`'s common arguments; `ConfigTester.check_config_arguments_init` checks that
# the config keeps each of them.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["InternImageForImageClassification"],
    "finetuning_task": "imagenet",
    "id2label": {0: "cat", 1: "dog"},
    "label2id": {"cat": 0, "dog": 1},
    "problem_type": "single_label_classification",
    "tokenizer_class": "BertTokenizer",
    "prefix": "prefix",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "task_specific_params": {"classification": {"top_k": 5}},
}


@dataclass
class CommonTests:
    """The mixins, or stand-ins that skip with `skip_reason` when transformers' test sources are unavailable."""

    ModelTesterMixin: type
    ConfigTester: type
    BackboneTesterMixin: type
    floats_tensor: object
    ids_tensor: object
    skip_reason: str | None = None


def running_under_ci() -> bool:
    """`CI` set to a true value, as GitHub Actions, GitLab and `.ci/run` do."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skipped(reason: str):
    def test(self) -> None:
        self.skipTest(reason)

    return test


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "internimage-tests" / f"transformers-{transformers.__version__}"


def _tests_dir_of(source_tree: Path) -> Path:
    tests_dir = source_tree / "tests"
    if not (tests_dir / "test_modeling_common.py").is_file():
        raise FileNotFoundError(f"{tests_dir} has no test_modeling_common.py")
    return tests_dir


def _download_sdist_tests(target: Path) -> Path:
    """pip-download the transformers sdist and unpack its `tests/` into `target` (atomically)."""
    version = transformers.__version__
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            f"transformers=={version}", "--dest", work,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        archives = list(Path(work).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}")
        unpacked = Path(work) / "unpacked"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(f"transformers-{version}/tests/")]
            archive.extractall(unpacked, members=members, filter="data")
        staged = Path(work) / "tree"
        (unpacked / f"transformers-{version}").rename(staged)
        if not target.exists():
            staged.rename(target)
    return _tests_dir_of(target)


def _find_tests_dir() -> Path:
    if os.environ.get(SOURCE_ENV_VAR):
        return _tests_dir_of(Path(os.environ[SOURCE_ENV_VAR]))
    cached = _cache_dir()
    if cached.exists():
        try:
            return _tests_dir_of(cached)
        except FileNotFoundError:
            shutil.rmtree(cached)
    return _download_sdist_tests(cached)


def _register_module(name: str, is_package: bool = False, **attributes) -> None:
    module = types.ModuleType(name)
    if is_package:
        module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _import_mixins(tests_dir: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE] = package
    _register_module(f"{PACKAGE}.exporters", is_package=True)
    export_mixin = type("ExportTesterMixin", (), {name: _skipped(EXPORT_SKIP_REASON) for name in EXPORT_TESTS})
    _register_module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=export_mixin)
    _register_module(f"{PACKAGE}.generation", is_package=True)
    _register_module(
        f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {})
    )
    _register_module(f"{PACKAGE}.utils", is_package=True)
    _register_module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    # test_configuration_common re-imports transformers from its own folder (a repository layout detail).
    # Their custom marks (flash_attn_test...) are registered by transformers' own conftest, which is not used here.
    with (
        mock.patch("transformers.utils.direct_transformers_import", lambda *args, **kwargs: transformers),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        modeling_common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        configuration_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
        backbone_common = importlib.import_module(f"{PACKAGE}.test_backbone_common")
    return modeling_common, configuration_common, backbone_common


def _stand_ins(reason: str) -> CommonTests:
    """Mixins whose tests skip with `reason`, or fail with it under CI."""
    exception = RuntimeError if running_under_ci() else unittest.SkipTest
    if running_under_ci():
        reason = f"{reason} (CI=true: the common tests are required)"

    class UnavailableMixin:
        @classmethod
        def setUpClass(cls) -> None:
            raise exception(reason)

    def unavailable(*args, **kwargs):
        raise exception(reason)

    return CommonTests(UnavailableMixin, unavailable, UnavailableMixin, unavailable, unavailable, skip_reason=reason)


def load_transformers_common_tests() -> CommonTests:
    """The common test mixins of the installed transformers version (see the module docstring)."""
    if importlib.util.find_spec("parameterized") is None:  # imported by test_modeling_common
        return _stand_ins("transformers' common tests need `parameterized`, which is not installed")
    try:
        modeling_common, configuration_common, backbone_common = _import_mixins(_find_tests_dir())
    except Exception as error:  # any failure to obtain them turns into a skip (a failure under CI) with its reason
        return _stand_ins(
            f"transformers' common tests unavailable ({type(error).__name__}: {error}); set {SOURCE_ENV_VAR} to an"
            " extracted transformers source tree or allow `pip download transformers`"
        )
    return CommonTests(
        modeling_common.ModelTesterMixin,
        configuration_common.ConfigTester,
        backbone_common.BackboneTesterMixin,
        modeling_common.floats_tensor,
        modeling_common.ids_tensor,
    )
