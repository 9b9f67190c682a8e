"""Suite-wide settings: a persistent XLA compilation cache (re-runs skip compiling the same tiny
towers) and the paths of the committed fixtures."""

import os
from pathlib import Path

import jax
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("VALIGN_TEST_JAX_CACHE", str(Path.home() / ".cache/valign_jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def torch_fixture():
    """Path of a committed PyTorch-layout checkpoint and its expected outputs."""
    import numpy as np

    def get(name):
        path = FIXTURES / "torch" / name
        return path, dict(np.load(path / "expected.npz"))
    return get
