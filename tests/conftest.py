import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.fixtures import FIXTURES, cached_fixture

# QWEN35_UPDATE_SNAPSHOTS=1 rewrites the snapshots (and the README's board guide) instead of checking
# them, so with it every snapshot test passes: CI refuses to run with it.
if os.environ.get("CI") and os.environ.get("QWEN35_UPDATE_SNAPSHOTS"):
    raise pytest.UsageError("QWEN35_UPDATE_SNAPSHOTS is set in CI: snapshots would be rewritten, not checked")

# The interactive chat keeps its conversations under $XDG_STATE_HOME: never the user's own in tests.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="qwen35-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], ignore_errors=True)
# Nor what the engine remembers of this machine and its models (AMX verdicts, step costs, a head's
# acceptance): a test must not read what another test, or the user, left there.
os.environ["QWEN35_REMEMBERED_DIR"] = tempfile.mkdtemp(prefix="qwen35-test-remembered-")
atexit.register(shutil.rmtree, os.environ["QWEN35_REMEMBERED_DIR"], ignore_errors=True)


def _fixture_cache_root() -> Path:
    # Outside the repository; fixtures are keyed by a hash of their builder, so a stale cache is
    # never reused. QWEN35_TEST_CACHE moves it (e.g. to a CI cache directory).
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35" / "test-fixtures"
    return Path(os.environ.get("QWEN35_TEST_CACHE", default))


@pytest.fixture(scope="session")
def qwen35_fixture():
    """qwen35_fixture(name) -> BuiltFixture: a tiny release-layout checkpoint with reference logits.

    Building needs torch and transformers (tests using it skip without them); each fixture is
    built at most once per cache key, and in a session only when a test asks for it.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root = _fixture_cache_root()
    return lambda name: cached_fixture(FIXTURES[name], root)


@pytest.fixture(scope="session")
def vision_fixture():
    """The tiny vision-language checkpoint of tests/vision_fixture.py (built by transformers, cached)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.vision_fixture import cached_vision_fixture

    return cached_vision_fixture(_fixture_cache_root())


@pytest.fixture(scope="session")
def moe_vision_fixture():
    """The same, with the MoE text model (Qwen3_5MoeForConditionalGeneration)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.vision_fixture import MOE_SPEC, cached_vision_fixture

    return cached_vision_fixture(_fixture_cache_root(), MOE_SPEC)
