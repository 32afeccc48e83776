"""The README stays a short user's guide and each bundle's docs/README.md a model card: measurement history belongs in
docs/ (``docs/benchmarks.md``, ``bundles/*/docs/experiments.md``), and a size limit keeps it from creeping back."""

import glob
import os

from helpers import BUNDLES, REPO

README_LIMIT = 15_000  # bytes
CARD_LIMIT = 10_000


def test_readme_is_short_and_keeps_the_two_set_up_commands():
    path = os.path.join(REPO, "README.md")
    with open(path) as f:
        text = f.read()
    assert os.path.getsize(path) < README_LIMIT
    assert "pip install -r requirements.txt" in text and "python tools/infer.py bundles/" in text
    assert ". .venv/bin/activate && python -m pytest -q" in text


def test_every_model_card_is_under_the_limit():
    cards = sorted(glob.glob(os.path.join(BUNDLES, "*", "docs", "README.md")))
    assert len(cards) == len(os.listdir(BUNDLES))
    too_long = {os.path.relpath(c, REPO): os.path.getsize(c) for c in cards if os.path.getsize(c) >= CARD_LIMIT}
    assert not too_long, too_long
