import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LITEMED_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))


def shared_data(*parts: str) -> str:
    """Path to a real sample under ../shared/data; skips outside CI when absent, fails in CI."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path}: sample data missing in CI")
        pytest.skip(f"{path}: sample data not present")
    return path
