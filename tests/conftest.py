import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CELEBA_SUBSET = ROOT.parent / "shared" / "data" / "celeba_subset"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer cases, left out of the default run (pytest -m slow)")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder: experiments/ is created relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
