"""benchmarks.run end to end in its tiny mode (no timing is asserted anywhere), the FLOP counter
MFU rests on, and BENCHMARKS.md naming every figure the run writes."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, run, step_time

from conftest import REPO

FIGURES = [name for names in run.GROUPS.values() for name in names]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Lower LLVM optimisation: the smoke run compiles ~12 tiny programs; speed is not checked.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--tiny", f"--out={out}",
                           "--peak_flops=1e11"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_tiny_run_writes_every_figure_finite(tiny_run):
    """`python -m benchmarks.run --tiny --out=FILE` exits 0 and writes every figure of every
    group with a finite, positive value (none skipped: transformers, grain and tf.data are
    installed here), its sizes, and the machine it ran on; the printed table lists them."""
    result, stdout = tiny_run
    assert result["mode"] == "tiny"
    assert result["machine"]["backend"] == "cpu" and result["machine"]["date"]
    missing = set(FIGURES) - set(result["figures"])
    assert not missing, missing
    for name in FIGURES:
        figure = result["figures"][name]
        assert not figure.get("skipped"), (name, figure.get("skipped"))
        assert math.isfinite(figure["value"]) and figure["value"] > 0, (name, figure["value"])
        assert figure.get("sizes"), name
        assert f"`{name}`" in stdout
    # A figure with a goal says whether the goal is met, consistently with its value.
    ratio = result["figures"]["train_step_time_ratio_vs_hf_flax"]
    assert ratio["met"] == (ratio["value"] <= 1.0)


def test_hf_reference_has_our_parameter_count(tiny_run):
    """The HF Flax reference the step-time ratio divides by has exactly as many parameters as
    our dual encoder: the same sizes (the run refuses otherwise)."""
    figure = tiny_run[0]["figures"]["train_step_time_ratio_vs_hf_flax"]
    sizes = common.ClipSizes(**figure["sizes"])
    model = common.clip_model(sizes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs()))
    ours = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert figure["parameters"] == {"ours": ours, "hf_flax": ours}


def test_matmul_flops_counts_products_once_per_layer():
    """common.matmul_flops: a dense layer is 2·B·in·out, a convolution 2·outputs·window·in,
    a product inside a scan of length 5 counts 5 times, and the backward pass of a dense layer
    adds its two products (input and weight gradients)."""
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert common.matmul_flops(lambda x, w: x @ w, x, w) == 2 * 4 * 8 * 16
    image, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((4, 4, 3, 5))  # NHWC, HWIO, stride 4
    conv = lambda i, k: jax.lax.conv_general_dilated(i, k, (4, 4), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert common.matmul_flops(conv, image, kernel) == 2 * (2 * 2 * 2 * 5) * (4 * 4 * 3)
    square = jnp.ones((8, 8))
    scanned = lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]
    assert common.matmul_flops(scanned, x, square) == 5 * 2 * 4 * 8 * 8
    grad = jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1))
    assert common.matmul_flops(grad, x, w) == 3 * 2 * 4 * 8 * 16


def test_matmul_flops_of_a_train_step_agree_with_xla():
    """On CPU, where XLA's cost analysis counts every product of the compiled step, the traced
    count of a tiny CLIP train step (layers unrolled) is at most XLA's (which adds elementwise
    work) and within 15% of it; a scanned step traces the same products."""
    sizes = common.ClipSizes("vit_tiny", "bert_tiny", 32, 16, 8, projection_dim=64)
    batch = common.abstract(common.clip_batch(sizes))
    counts = {}
    for scan in (False, True):
        compiled, _, extra = common.compiled_train_step(common.clip_model(sizes, scan_layers=scan),
                                                        "full", batch)
        counts[scan] = (extra["matmul_flops"], common.program_flops(compiled))
    traced, xla = counts[False]
    assert 0.85 * xla <= traced <= xla
    assert counts[True][0] == traced


def test_peak_flops_by_device_kind():
    """MFU's denominator: dense bf16 peaks by device kind, an override wins, unknown is 0."""
    assert step_time.peak_flops("NVIDIA H200") == step_time.peak_flops("NVIDIA H100 80GB HBM3")
    assert step_time.peak_flops("NVIDIA H200") == pytest.approx(989e12)
    assert step_time.peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert step_time.peak_flops("cpu") == 0.0
    assert step_time.peak_flops("cpu", override=1e12) == 1e12


def test_benchmarks_md_names_every_figure():
    """BENCHMARKS.md reports every figure benchmarks.run writes, by its name."""
    text = (REPO / "BENCHMARKS.md").read_text()
    missing = [name for name in FIGURES if name not in text]
    assert not missing, missing


def test_random_params_fill_by_role():
    """Host-filled benchmark parameters: LayerNorm scales 1, biases 0, weights N(0, 0.02)."""
    shapes = {"norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32),
                       "bias": jax.ShapeDtypeStruct((64,), jnp.float32)},
              "dense": {"kernel": jax.ShapeDtypeStruct((256, 256), jnp.float32)}}
    params = common.random_params(shapes)
    assert np.all(params["norm"]["scale"] == 1) and np.all(params["norm"]["bias"] == 0)
    assert abs(np.std(params["dense"]["kernel"]) - 0.02) < 1e-3
