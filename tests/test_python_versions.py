"""qwen35 runs on Python 3.10 to 3.13: the source needs nothing newer than setup.cfg promises.

A machine that has only Python 3.11 would never notice a 3.11-only module or syntax (tomllib,
`except*`, typing.Self…): vermin reads the source and names the minimum version each line needs.
"""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINIMUM = "3.10"


def test_setup_cfg_promises_the_minimum_we_check():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["options"]["python_requires"] == f">={MINIMUM}"
    # tomllib is 3.11+: below it, the same parser comes from the tomli package.
    assert 'tomli>=1.1; python_version < "3.11"' in cfg["options"]["install_requires"]


def test_the_source_needs_nothing_newer_than_the_minimum():
    pytest.importorskip("vermin")
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    sources = [str(p) for p in ("cli.py", "__init__.py", "convert", "models", "runtime", "bench", "tests")]
    done = subprocess.run([vermin, f"--target={MINIMUM}-", "--violations", "--no-tips",
                           "--eval-annotations", *sources], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
