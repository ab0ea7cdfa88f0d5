"""tests/transformers_common.py: transformers' common tests are run, skipped with their reason, or, under CI, failed.

The sources come from the transformers source distribution (fetched once, cached); these tests point
`INTERNIMAGE_TRANSFORMERS_SRC` at a folder that does not exist to see what happens when they cannot be obtained.
"""

from __future__ import annotations

import unittest

import pytest
from transformers_common import (
    EXPORT_SKIP_REASON,
    EXPORT_TESTS,
    SOURCE_ENV_VAR,
    load_transformers_common_tests,
    running_under_ci,
)


def run_test_case(case: type[unittest.TestCase]) -> unittest.TestResult:
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(case).run(result)
    return result


@pytest.fixture
def unavailable_sources(tmp_path, monkeypatch):
    monkeypatch.setenv(SOURCE_ENV_VAR, str(tmp_path / "nowhere"))


def test_unavailable_sources_skip_every_common_test_with_the_reason(unavailable_sources, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    common = load_transformers_common_tests()
    assert "transformers' common tests unavailable (FileNotFoundError" in common.skip_reason
    for mixin in (common.ModelTesterMixin, common.BackboneTesterMixin):
        case = type("CommonCase", (mixin, unittest.TestCase), {"test_something": lambda self: None})
        result = run_test_case(case)
        assert not result.errors and not result.failures
        assert [reason for _, reason in result.skipped] == [common.skip_reason]
    with pytest.raises(unittest.SkipTest, match="common tests unavailable"):
        common.ConfigTester(None, config_class=None)


def test_under_ci_unavailable_sources_fail_the_run(unavailable_sources, monkeypatch):
    monkeypatch.setenv("CI", "true")
    common = load_transformers_common_tests()
    assert common.skip_reason.endswith("(CI=true: the common tests are required)")
    case = type("CommonCase", (common.ModelTesterMixin, unittest.TestCase), {"test_something": lambda self: None})
    result = run_test_case(case)
    assert not result.skipped and len(result.errors) == 1
    assert "CI=true: the common tests are required" in result.errors[0][1]
    with pytest.raises(RuntimeError, match="common tests unavailable"):
        common.floats_tensor([1, 2])


def test_the_export_mixin_stand_in_reports_its_tests_as_skipped():
    """The export tests are in no distribution: each is reported as a skip with that reason, not silently absent."""
    common = load_transformers_common_tests()
    if common.skip_reason and running_under_ci():
        pytest.fail(common.skip_reason)
    if common.skip_reason:
        pytest.skip(common.skip_reason)
    case = type("CommonCase", (common.ModelTesterMixin, unittest.TestCase), {})
    result = unittest.TestResult()
    unittest.TestSuite(case(name) for name in EXPORT_TESTS).run(result)
    assert [(test.id().rsplit(".", 1)[1], reason) for test, reason in result.skipped] == [
        (name, EXPORT_SKIP_REASON) for name in EXPORT_TESTS
    ]
    assert not result.errors and not result.failures
