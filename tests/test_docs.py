"""The documentation users read: README (the repository's model card) and the model card the converter writes."""

from __future__ import annotations

import re

from conftest import ROOT

from configuration_internimage import InternImageConfig
from convert_checkpoints import finalize_config, write_model_card

README = ROOT / "README.md"


def test_an_automodel_instance_is_called_encoder(tmp_path):
    """`InternImageBackbone` is another class: README and the model card call an `AutoModel` instance `encoder`."""
    write_model_card(tmp_path / "README.md", finalize_config(InternImageConfig()), None, [])
    for text in (README.read_text(), (tmp_path / "README.md").read_text()):
        assert set(re.findall(r"^(\w+) = AutoModel\.from_pretrained", text, flags=re.M)) == {"encoder"}
