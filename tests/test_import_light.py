"""The core imports without the data stack: tensorflow, tfds, grain and clu are blocked in a
fresh interpreter, and valign_jax, valign_jax.models and valign_jax.hf still import and run."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO


def test_core_imports_without_data_stack():
    script = textwrap.dedent("""
        import importlib.abc, sys
        BLOCKED = ("tensorflow", "tensorflow_datasets", "grain", "clu", "torch")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for this test: {name}")
        sys.meta_path.insert(0, Block())
        import valign_jax, valign_jax.models, valign_jax.hf, valign_jax.losses
        from valign_jax import hf
        tower, params = hf.load_tower(sys.argv[1])
        assert "pooled" in tower.apply({"params": params}, __import__("numpy").ones((1, 5), "int32"))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED + ("transformers",))
        print("LOADED", loaded)
    """)
    fixture = REPO / "tests" / "fixtures" / "torch" / "bert"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script, str(fixture)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout
