"""The documentation keeps one source per concern: README's usage examples are those of the model card the converter
writes (`convert_checkpoints.USAGE_EXAMPLE` and friends), every measured figure is in benchmarks/RESULTS.md and
README / docs/ quote it verbatim (as `>` blocks) instead of retyping it, and every relative link resolves.
The snippets of README and docs/usage.md run in tests/test_ecosystem.py and tests/test_dense_prediction.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

from configuration_internimage import InternImageConfig
from convert_checkpoints import (
    CLASSIFIER_EXAMPLE,
    DENSE_PREDICTION_EXAMPLE,
    USAGE_EXAMPLE,
    finalize_config,
    write_model_card,
)

README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"  # README's Classify section in detail
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, RESULTS, *DOCS]
# A figure with a unit of time or memory, as a measurement is written.
MEASUREMENT = re.compile(r"\b\d+(\.\d+)?\s?(s|ms|minutes?|MiB|GiB|img/s)\b")


def markdown_section(text: str, heading: str) -> str:
    """The body of `## heading`, up to the next `## ` heading."""
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside code blocks and `>` quotes."""
    lines, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and not line.startswith(">"):
            lines.append(line)
    return lines


def quoted_lines(text: str) -> list[str]:
    """The non-empty lines of the `>` quotes of a Markdown text, without the `> `."""
    quoted = (line.removeprefix(">").removeprefix(" ") for line in text.splitlines() if line.startswith(">"))
    return [line for line in quoted if line.strip()]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown text's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("pooler_type", ["conv", None], ids=["classifier", "backbone_only"])
def test_readme_and_the_model_card_show_the_same_examples(tmp_path, pooler_type):
    readme = README.read_text()
    assert python_blocks(markdown_section(readme, "Classify")) == [USAGE_EXAMPLE + CLASSIFIER_EXAMPLE]
    usage = USAGE.read_text()
    assert python_blocks(markdown_section(usage, "Dense prediction backbone"))[0] == DENSE_PREDICTION_EXAMPLE
    write_model_card(tmp_path / "README.md", finalize_config(InternImageConfig(pooler_type=pooler_type)), None, [])
    card = (tmp_path / "README.md").read_text()
    usage = USAGE_EXAMPLE + (CLASSIFIER_EXAMPLE if pooler_type else "")
    assert python_blocks(card) == [usage, DENSE_PREDICTION_EXAMPLE]


def test_an_automodel_instance_is_called_encoder(tmp_path):
    """`InternImageBackbone` is another class: README, docs/usage.md and the model card call an `AutoModel` instance
    `encoder`."""
    write_model_card(tmp_path / "README.md", finalize_config(InternImageConfig()), None, [])
    for text in (README.read_text(), USAGE.read_text(), (tmp_path / "README.md").read_text()):
        assert set(re.findall(r"^(\w+) = AutoModel\.from_pretrained", text, flags=re.M)) == {"encoder"}


def test_readme_quotes_the_figures_of_results_md():
    """README and docs/ quote RESULTS.md's lines verbatim; README's prose states no measured figure of its own."""
    results = set(RESULTS.read_text().splitlines())
    readme = README.read_text()
    assert len(quoted_lines(readme)) >= 10  # the default run, loading and CPU inference
    for document in (README, *DOCS):
        for line in quoted_lines(document.read_text()):
            assert line in results, f"{document.name} quotes a line that benchmarks/RESULTS.md lacks: {line!r}"
    retyped = [line for line in prose_lines(readme) if MEASUREMENT.search(line)]
    assert not retyped, f"README states figures that belong in benchmarks/RESULTS.md: {retyped}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document: Path):
    text = document.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        assert path.exists(), f"{document.name}: {link} points at nothing"
        if anchor:
            assert anchor in heading_anchors(path.read_text()), f"{document.name}: no heading for {link}"
