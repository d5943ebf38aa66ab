import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A folder of CelebA images in one of README's layouts (the whole of CelebA, or a subset such as
# RESULTS.md's), for the tests that read real images; they skip when it is unset or missing.
CELEBA_ENV = "CELEBGEN_CELEBA"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer cases, left out of the default run (pytest -m slow)")
    # The tests of a closed terminal send SIGHUP to the commands they start, which inherit what this
    # process does with it: under nohup (ignored) those would keep running, as nohup means them to.
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder: experiments/ is created relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def celeba_root():
    """$CELEBGEN_CELEBA as a Path; the test skips, saying why, when it is unset or not a folder."""
    value = os.environ.get(CELEBA_ENV)
    if not value:
        pytest.skip(f"set {CELEBA_ENV} to a folder of CelebA images (README, Data) to run this test")
    if not Path(value).is_dir():
        pytest.skip(f"{CELEBA_ENV}={value} is not a folder")
    return Path(value)
