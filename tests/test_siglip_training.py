"""The SigLIP checkpoint recipes (configs/siglip.py): `finetune,demo` starts from a (tiny, random)
SigLIP checkpoint's own weights, logit scale and bias, trains offline and lifts retrieval R@1
far above step 0's; the trained model exported as a SiglipModel evaluates through
`python -m valign_jax.evaluate --hf` to the numbers the run logged; LiT and LiLT on SigLIP
towers train exactly what their recipes say (the dry-run table, then the weights a short run
moved); the text length must be the checkpoint's."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import valign_jax
from valign_jax import evaluate, hf, peft, recipes, sharding, train
from valign_jax.main import dry_run
from valign_jax.models.layout import abstract_params
from valign_jax.recipes import load_config
from valign_jax.run_setup import build_model, check_text_length, initial_params

from conftest import REPO
from train_helpers import shrink

RETRIEVAL_R1 = ("retrieval/i2t_r1", "retrieval/t2i_r1")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo checkpoints in a fresh directory, made by the configs as a new clone would."""
    root = tmp_path_factory.mktemp("demo_checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VALIGN_JAX_DEMO_DIR", str(root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield root


def start_params(config, model):
    """The parameters a run of `config` starts from, on one device, as host arrays."""
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    shardings = sharding.tree_shardings(abstract_params(model), mesh, config.mesh.min_fsdp_size)
    return jax.device_get(initial_params(config, model, shardings))


def without_evaluators(config):
    config.evals = ml_collections.ConfigDict()  # these tests look at the weights only
    return config


def siglip_config(arg):
    return load_config(f"{REPO}/configs/siglip.py:{arg}")


@pytest.fixture(scope="module")
def finetune_run(demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("siglip_finetune")
    train.train_and_evaluate(siglip_config("finetune,demo"), workdir)
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, [l for l in lines if "retrieval/i2t_r1" in l]


def test_finetune_starts_from_the_checkpoints_weights_scale_and_bias(demo_dir):
    config = siglip_config("finetune,demo")
    assert config.model.init_from == config.model.image.checkpoint == recipes.demo_checkpoint()
    model = build_model(config)
    params = start_params(config, model)
    _, pretrained = hf.load_dual_encoder(config.model.init_from)
    flat, ref = (traverse_util.flatten_dict(t) for t in (params, pretrained))
    assert set(flat) == set(ref)   # identity heads: the towers' own heads, nothing new
    assert all(np.array_equal(flat[k], ref[k]) for k in ref)
    assert float(params["logit_bias"]) == float(pretrained["logit_bias"])


def test_finetune_demo_learns_offline(finetune_run):
    _, evals = finetune_run
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 300
    for key in RETRIEVAL_R1:
        assert start[key] < 0.05 and end[key] >= 0.3 and end[key] >= 5 * start[key], (
            key, start[key], end[key])


def test_a_fine_tuned_siglip_exported_evaluates_the_same_through_hf(finetune_run, tmp_path):
    """load_trained -> hf.save_dual_encoder (a SiglipModel) + the demo's tokenizer ->
    evaluate --hf=DIR (what `python -m valign_jax.evaluate --hf` runs): the numbers the run
    logged at its last step."""
    workdir, evals = finetune_run
    model, params, _ = valign_jax.load_trained(workdir)
    export = tmp_path / "siglip_export"
    hf.save_dual_encoder(model, params, export)
    from valign_jax.data import synthetic
    synthetic.save_hf_tokenizer(export)
    assert json.loads((export / "config.json").read_text())["architectures"] == ["SiglipModel"]
    result = evaluate.evaluate(hf_path=str(export), config=siglip_config("finetune,demo"),
                               out=tmp_path / "eval.json")
    assert result["source"] == str(export)
    metrics = result["metrics"]
    for key in RETRIEVAL_R1 + ("zeroshot/synthetic/top1",):
        assert metrics[key] == pytest.approx(evals[-1][key], abs=1e-6), key


def report_rows(report):
    rows = {}
    for line in report.splitlines()[1:-1]:
        name, total, trainable, _ = line.rsplit(None, 3)
        rows[name.strip()] = (int(total.replace(",", "")), int(trainable.replace(",", "")))
    return rows


def test_lit_on_siglip_locks_the_whole_vision_tower(demo_dir):
    rows = report_rows(dry_run(siglip_config("lit,demo")))
    for name, (total, trainable) in rows.items():
        expected = 0 if name.startswith("vision_model") else total
        assert trainable == expected, (name, total, trainable)


def test_lilt_on_siglip_trains_only_adapters_norms_heads_and_logits(demo_dir, tmp_path):
    """The dry-run table: adapters, LayerNorms, the towers' heads and the scale and bias train,
    nothing else. Then two real steps: exactly those parameters moved."""
    config = siglip_config("lilt,demo")
    rows = report_rows(dry_run(config))
    width = 64  # the tiny towers' width: each LayerNorm holds 2 × 64
    layer_norms = 2 * 2 * 2 * width  # 2 layers × (layer_norm1, layer_norm2) × (scale, bias)
    for name, (total, trainable) in rows.items():
        if "adapters" in name or name.endswith(("/head", "layernorm", "layer_norm")) \
                or name.startswith("logit"):
            assert trainable == total, name
        elif name.endswith("/encoder"):
            assert trainable == layer_norms, (name, trainable)
        else:
            assert trainable == 0, (name, trainable)

    config = without_evaluators(shrink(config, steps=2))
    train.train_and_evaluate(config, tmp_path)
    model, trained, _ = valign_jax.load_trained(tmp_path)
    start = start_params(config, build_model(config))
    labels = peft.make_labels(abstract_params(model), config.peft.recipe, config.peft.overrides)
    flat_labels = traverse_util.flatten_dict(labels)
    before, after = (traverse_util.flatten_dict(jax.device_get(t)) for t in (start, trained))
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    frozen = {k for k, label in flat_labels.items() if label == peft.FROZEN}
    assert not moved & frozen, sorted(moved & frozen)[:3]
    assert any("adapter_1" in k for k in map("/".join, moved))


def test_the_text_length_must_be_the_checkpoints(demo_dir):
    config = siglip_config("finetune,demo")
    model = build_model(config)
    check_text_length(16, model.text_config)
    with pytest.raises(ValueError, match=r"config.model.text.max_length=64.*"
                                         r"max_position_embeddings=16.*set "
                                         r"config.model.text.max_length=16"):
        check_text_length(64, model.text_config)


def test_naflex_finetune_demo_takes_square_images_through_the_pipeline(demo_dir, tmp_path):
    """A SigLIP 2 NaFlex checkpoint trains on the ordinary pipeline's 32-px images (its 4×4
    position grid) and takes NaFlex patch batches too."""
    config = without_evaluators(shrink(siglip_config("finetune_naflex,demo"), steps=2))
    train.train_and_evaluate(config, tmp_path)
    model, params, _ = valign_jax.load_trained(tmp_path)
    assert type(model.image_config).__name__ == "Siglip2VisionConfig"
    from valign_jax.data.naflex import naflex_batch
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((32, 32), (16, 48))]
    batch = naflex_batch(images, patch_size=8, max_patches=16)
    square = model.apply({"params": params}, images[0][None].astype(np.float32) / 127.5 - 1,
                         method=model.encode_image)
    naflex = model.apply({"params": params}, batch, method=model.encode_image)
    assert naflex.shape == (2, 64) and np.all(np.isfinite(naflex))
    np.testing.assert_allclose(naflex[0], square[0], atol=1e-5)  # same image, same grid
