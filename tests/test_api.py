"""The Python API (valign_jax/api.py, figures.py) against the paths it stands for: a run's
checkpoint as the training loop logged it, transformers' own tokenizer for an HF checkpoint, the
model applied directly with NumPy pre- and post-processing, the image files themselves, and
ml_collections' command-line parsing of the flags a recipe prints."""

import json
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import valign_jax
from valign_jax import api, figures
from valign_jax.data import synthetic

from conftest import REPO
from train_helpers import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny CLIP demo trained for 2 steps (evaluated at its end on 16 held-out shapes)."""
    from valign_jax import train
    workdir = tmp_path_factory.mktemp("api_run")
    train.train_and_evaluate(tiny_config("clip", steps=2), workdir)
    return workdir


@pytest.fixture(scope="module")
def loaded(run_dir):
    return valign_jax.load(run_dir)


def reference_logits(model, params, pixels, mean, std, tokens_of, names, templates):
    """Zero-shot logits (scale * cosine + bias) computed apart from the API: the model applied
    to the whole array at once, NumPy normalisation and averaging."""
    x = (pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) \
        / np.asarray(std, np.float32)
    img = np.asarray(model.apply({"params": params}, x, method=model.encode_image), np.float64)
    tokens = tokens_of([t.format(n) for n in names for t in templates])
    txt = np.asarray(model.apply({"params": params}, tokens["input_ids"],
                                 tokens["attention_mask"], method=model.encode_text), np.float64)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    classes = txt.reshape(len(names), len(templates), -1).mean(axis=1)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    return np.exp(float(params["logit_scale"])) * img @ classes.T \
        + float(params.get("logit_bias", 0.0))


def reference_probs(*args):
    """The softmax over classes of reference_logits."""
    logits = reference_logits(*args)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# load


def test_load_reads_a_workdir_as_the_run_does(run_dir, loaded):
    """The checkpoint's parameters (those load_trained returns), the run's tokenizer (the demo's
    word vocabulary at its max_length) and pixel statistics, its image size and eval batch."""
    model, params, config = valign_jax.load_trained(run_dir)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    assert loaded.model == model and loaded.step == 2 and loaded.batch_size == 16
    assert loaded.image_size == 32 and loaded.mean == loaded.std == (0.5, 0.5, 0.5)
    texts = ["a photo of a red circle.", "two small blue squares"]
    own = synthetic.WordTokenizer(config.model.text.max_length)(texts)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(loaded.tokenizer(texts)[key], own[key])
    assert f"step 2 of {run_dir}: " in str(loaded) and "32 px images" in str(loaded)


def test_load_reads_an_hf_checkpoint_with_its_tokenizer_and_pixel_statistics(run_dir,
                                                                              tmp_path):
    """A CLIP saved in HF's layout with a tokenizer and a preprocessor_config.json: the
    parameters are hf.load_dual_encoder's, texts tokenise as transformers' AutoTokenizer pads
    them to the text tower's positions, the pixel statistics are the file's; zero-shot
    probabilities equal the reference computed with those."""
    from transformers import AutoTokenizer
    from valign_jax import hf

    model, params, _ = valign_jax.load_trained(run_dir)
    checkpoint = tmp_path / "hf_clip"
    hf.save_dual_encoder(model, params, checkpoint, formats=("safetensors",))
    synthetic.save_hf_tokenizer(checkpoint)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    (checkpoint / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(mean), "image_std": list(std), "crop_size": 32}))

    clip = valign_jax.load(str(checkpoint))
    hf_model, hf_params = hf.load_dual_encoder(checkpoint)
    jax.tree.map(np.testing.assert_array_equal, clip.params, jax.device_get(hf_params))
    assert (clip.mean, clip.std, clip.image_size, clip.step) == (mean, std, 32, None)
    length = hf_model.text_config.max_position_embeddings
    texts = ["a photo of a green triangle.", "a red circle"]
    expected = AutoTokenizer.from_pretrained(str(checkpoint))(
        texts, padding="max_length", max_length=length, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(clip.tokenizer(texts)[key], expected[key])

    data = valign_jax.load_images("synthetic:shapes", clip, limit=12)
    result = valign_jax.zero_shot(clip, data, templates=["a photo of a {}."])
    reference = reference_probs(hf_model, hf_params, data.images, mean, std, clip.tokenizer,
                                data.class_names, ["a photo of a {}."])
    np.testing.assert_allclose(result.probs, reference, rtol=1e-4, atol=1e-6)


def test_load_reads_a_siglip_checkpoint(tmp_path):
    """The HF branch is not CLIP's alone: transformers' tiny SigLIP (the committed fixture, with
    the demo vocabulary as its tokenizer) loads with texts padded to its 11 positions, and the
    logits carry its bias: exp(scale) * cosine + bias, as the reference computes them."""
    import shutil
    checkpoint = tmp_path / "siglip"
    shutil.copytree(REPO / "tests" / "fixtures" / "torch" / "siglip", checkpoint)
    synthetic.save_hf_tokenizer(checkpoint)
    siglip = valign_jax.load(str(checkpoint))
    assert siglip.tokenizer.max_length == 11 and siglip.image_size == 30
    assert "logit_bias" in siglip.params and siglip.mean == (0.5, 0.5, 0.5)
    data = valign_jax.load_images("synthetic:shapes", siglip, limit=5)
    result = valign_jax.zero_shot(siglip, data, templates=["a {}."])
    reference = reference_logits(siglip.model, siglip.params, data.images, siglip.mean,
                                 siglip.std, siglip.tokenizer, data.class_names, ["a {}."])
    np.testing.assert_allclose(result.logits, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(result.predicted, result.logits.argmax(axis=1))


def test_load_refuses_what_is_not_a_model(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="neither a training workdir .* nor a Hugging "
                                                "Face checkpoint directory"):
        valign_jax.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        valign_jax.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="a Hugging Face checkpoint has no steps"):
        valign_jax.load("openai/clip-vit-base-patch32", step=3)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        valign_jax.load(run_dir, step=7)  # a step the run never saved


# ---------------------------------------------------------------------------------------------
# load_images


def test_load_images_draws_the_held_out_shapes():
    data = valign_jax.load_images("synthetic:shapes", 40, limit=12, seed=3)
    source = synthetic.SyntheticImageText("eval", num_examples=12, image_size=40, seed=3)
    np.testing.assert_array_equal(data.images, np.stack([source[i]["image"] for i in range(12)]))
    np.testing.assert_array_equal(data.labels, [source[i]["label"] for i in range(12)])
    assert data.class_names == synthetic.CLASS_NAMES and data.images.dtype == np.uint8
    assert len(data) == 12 and data.skipped == 0 and "12 images of 40 px" in str(data)


def _class_folders(root, sizes=((24, 24), (24, 24), (24, 24), (24, 24))):
    """<root>/<class>/<i>.png: random pixels, 3 classes; returns {path: pixels}."""
    rng = np.random.default_rng(0)
    written = {}
    for name in ("cat", "dog", "golden retriever"):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            written[root / name / f"{i}.png"] = pixels
    return written


def test_load_images_reads_class_folders(tmp_path):
    """Images already at the model's size come back as the files hold them; larger ones as the
    eval transform makes them; a broken file is counted; `limit` takes a seeded random sample
    from across the classes; class names can be replaced (a list or a file)."""
    from valign_jax.data.transforms import EvalTransform
    written = _class_folders(tmp_path / "pets")
    data = valign_jax.load_images(str(tmp_path / "pets"), 24)
    assert data.class_names == ("cat", "dog", "golden retriever")
    np.testing.assert_array_equal(data.labels, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(data.images, np.stack(list(written.values())))

    (tmp_path / "pets" / "dog" / "9.png").write_bytes(b"not an image")
    big = _class_folders(tmp_path / "big", sizes=((50, 30), (31, 64)))
    data = valign_jax.load_images(str(tmp_path / "big"), 16)
    eval_transform = EvalTransform(16)
    np.testing.assert_array_equal(
        data.images, np.stack([eval_transform(path.read_bytes()) for path in big]))
    broken = valign_jax.load_images(str(tmp_path / "pets"), 24)
    assert broken.skipped == 1 and len(broken) == 12

    sample = valign_jax.load_images(str(tmp_path / "pets"), 24, limit=5, seed=1)
    assert len(sample) == 5 and len(set(sample.labels.tolist())) >= 2
    label_of = {bytes(pixels): label for pixels, label in
                zip(written.values(), np.repeat([0, 1, 2], 4))}
    assert all(label_of[bytes(img)] == label for img, label in zip(sample.images, sample.labels))
    again = valign_jax.load_images(str(tmp_path / "pets"), 24, limit=5, seed=1)
    np.testing.assert_array_equal(again.images, sample.images)

    named = valign_jax.load_images(str(tmp_path / "pets"), 24, class_names=["A", "B", "C"])
    assert named.class_names == ("A", "B", "C")
    names_file = tmp_path / "names.txt"
    names_file.write_text("kitten\npuppy\nretriever\n")
    assert valign_jax.load_images(str(tmp_path / "pets"), 24,
                                  class_names=str(names_file)).class_names[2] == "retriever"


def test_load_images_names_bad_input(tmp_path):
    _class_folders(tmp_path / "pets")
    with pytest.raises(ValueError, match=r"class_names: 2 names, but .* has 3 classes"):
        valign_jax.load_images(str(tmp_path / "pets"), 24, class_names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="class_names: .*names.txt does not exist"):
        valign_jax.load_images(str(tmp_path / "pets"), 24, class_names=str(tmp_path / "names.txt"))
    with pytest.raises(ValueError, match="limit=0"):
        valign_jax.load_images("synthetic:shapes", 32, limit=0)
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        valign_jax.load_images(str(tmp_path / "nowhere"), 24)
    with pytest.raises(ValueError, match="unknown synthetic dataset 'shape'"):
        valign_jax.load_images("synthetic:shape", 32)


# ---------------------------------------------------------------------------------------------
# zero_shot


def test_zero_shot_on_a_run_is_what_the_run_logged(run_dir, loaded):
    """On the run's own 16 held-out shapes, the metrics equal the zero-shot figures the
    training loop logged at its last step, exactly (the same evaluator code, batch and
    parameters); the probabilities equal the reference computed apart from the API; the
    predictions are the argmax and count as the logged top-1 does."""
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    data = valign_jax.load_images("synthetic:shapes", loaded, limit=16)
    result = valign_jax.zero_shot(loaded, data)
    assert logged["step"] == 2
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert result.metrics[key] == logged[f"zeroshot/synthetic/{key}"], key
    assert result.templates == synthetic.ZEROSHOT_TEMPLATES  # "auto" for the shapes
    reference = reference_probs(loaded.model, loaded.params, data.images, loaded.mean,
                                loaded.std, loaded.tokenizer, data.class_names,
                                result.templates)
    np.testing.assert_allclose(result.probs, reference, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.predicted, result.probs.argmax(axis=1))
    assert np.mean(result.predicted == data.labels) == result.metrics["top1"]
    assert result.probs.shape == (16, 24) and "16 images, 24 classes, 5 templates" in str(result)


def test_zero_shot_on_pixels_with_own_names_and_templates(loaded):
    """Raw pixels and a class list (no labels: no metrics) give the reference probabilities;
    features are the model's (encode_images / encode_texts against a direct apply)."""
    data = valign_jax.load_images("synthetic:shapes", 32, limit=6)
    names = ["red circle", "blue square", "green triangle"]
    result = valign_jax.zero_shot(loaded, data.images, names, templates=["a {}."])
    reference = reference_probs(loaded.model, loaded.params, data.images, loaded.mean,
                                loaded.std, loaded.tokenizer, names, ["a {}."])
    np.testing.assert_allclose(result.probs, reference, rtol=1e-4, atol=1e-6)
    assert result.metrics == {} and result.labels is None
    direct = loaded.model.apply({"params": loaded.params}, loaded.tokenizer(names)["input_ids"],
                                loaded.tokenizer(names)["attention_mask"],
                                method=loaded.model.encode_text)
    np.testing.assert_allclose(loaded.encode_texts(names), direct, rtol=1e-5, atol=1e-6)


def test_zero_shot_names_bad_input(loaded):
    data = valign_jax.load_images("synthetic:shapes", 40, limit=4)
    with pytest.raises(ValueError, match=r"expected \(N, 32, 32, 3\) pixels, got shape "
                                         r"\(4, 40, 40, 3\); load_images"):
        valign_jax.zero_shot(loaded, data)
    small = valign_jax.load_images("synthetic:shapes", 32, limit=4)
    with pytest.raises(ValueError, match="templates: each template needs exactly one"):
        valign_jax.zero_shot(loaded, small, templates=["a photo"])
    with pytest.raises(ValueError, match="class_names: give the list"):
        valign_jax.zero_shot(loaded, small.images)
    with pytest.raises(ValueError, match=r"labels: expected 4 class indices"):
        valign_jax.zero_shot(loaded, small.images, ["a", "b"], labels=[0, 1])
    with pytest.raises(ValueError, match=r"texts: expected a non-empty list"):
        loaded.encode_texts("a photo")


# ---------------------------------------------------------------------------------------------
# recipe


def test_recipe_changes_keys_and_prints_flags_that_make_the_same_config(tmp_path,
                                                                       monkeypatch):
    """From another working directory the recipe is found in the repository; the changed keys
    hold their values (None keeps the recipe's); the printed command's flags, parsed by
    ml_collections' config flags as python -m valign_jax.main parses them, give the same
    config."""
    from valign_jax.recipes import load_config
    monkeypatch.chdir(tmp_path)
    demo = valign_jax.recipe("configs/clip.py:demo", {
        "data.num_eval": 32, "data.image_mean": (0.4, 0.5, 0.6), "eval.templates": "clip7",
        "data.lower_case": True, "batch_size": None}, total_steps=7)
    own = load_config(f"{REPO}/configs/clip.py:demo")
    assert (demo.config.total_steps, demo.config.data.num_eval) == (7, 32)
    assert demo.config.batch_size == own.batch_size and demo.config.eval.templates == "clip7"
    assert demo.flags == ["--config.data.num_eval=32", "--config.data.image_mean=(0.4,0.5,0.6)",
                          "--config.eval.templates=clip7", "--config.data.lower_case=True",
                          "--config.total_steps=7"]
    command = shlex.split(demo.command("/tmp/run"))
    assert command[:5] == ["python", "-m", "valign_jax.main", "--config=configs/clip.py:demo",
                           "--workdir=/tmp/run"]
    script = ("import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
              "config_flags.DEFINE_config_file('config')\nflags.FLAGS(['x'] + sys.argv[1:])\n"
              "print(flags.FLAGS.config.to_json_best_effort(sort_keys=True))")
    parsed = subprocess.run([sys.executable, "-c", script, *command[3:4], *command[5:]],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    assert json.loads(parsed.stdout) == json.loads(
        demo.config.to_json_best_effort(sort_keys=True))
    assert str(demo).splitlines()[2].strip() == (
        "towers: clip_tiny_vision + clip_tiny_text; objective softmax; batch 64; steps 7")


def test_recipe_names_bad_keys_values_and_files():
    with pytest.raises(KeyError, match=r"unknown config key 'config.data.num_evl' \(from "
                                       r"override data.num_evl\); valid keys of config.data"):
        valign_jax.recipe("configs/clip.py:demo", {"data.num_evl": 3})
    with pytest.raises(ValueError, match="recipe override total_steps='many'"):
        valign_jax.recipe("configs/clip.py:demo", total_steps="many")
    with pytest.raises(FileNotFoundError, match="config file 'configs/clipp.py' not found"):
        valign_jax.recipe("configs/clipp.py:demo")


# ---------------------------------------------------------------------------------------------
# figures and the package's namespace


def test_plot_predictions_titles_each_image_with_its_prediction(loaded):
    data = valign_jax.load_images("synthetic:shapes", 32, limit=10)
    result = valign_jax.zero_shot(loaded, data)
    fig = valign_jax.plot_predictions(data, result, count=6, columns=4)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 8 and len(shown) == 6
    for i, ax in enumerate(shown):
        np.testing.assert_array_equal(ax.images[0].get_array(), data.images[i])
        guess = result.predicted[i]
        assert ax.get_title().startswith(data.class_names[guess])
        right = guess == data.labels[i]
        assert ax.title.get_color() == (figures.RIGHT if right else figures.WRONG)
    assert fig._repr_png_().startswith(b"\x89PNG")  # what a notebook shows
    with pytest.raises(ValueError, match="pass the images given to zero_shot"):
        valign_jax.plot_predictions(data.images[:3], result)


def test_plot_metrics_draws_the_logged_values(run_dir, tmp_path):
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert valign_jax.logged_metrics(run_dir) == logged
    fig = valign_jax.plot_metrics(run_dir)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    assert set(lines) == {"retrieval/i2t_r1", "retrieval/t2i_r1", "zeroshot/synthetic/top1",
                          "geometry/gap"}
    for key, line in lines.items():
        np.testing.assert_array_equal(line.get_xdata(), [m["step"] for m in logged])
        np.testing.assert_array_equal(line.get_ydata(), [m[key] for m in logged])
    one = valign_jax.plot_metrics(run_dir, ["train/loss"])
    assert [l.get_label() for l in one.axes[0].lines] == ["train/loss"]
    with pytest.raises(ValueError, match=r"keys \['retrieval/r1'\]: none was logged"):
        valign_jax.plot_metrics(run_dir, ["retrieval/r1"])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        valign_jax.plot_metrics(tmp_path)


def test_the_api_loads_only_when_used():
    """`import valign_jax` loads neither the API nor matplotlib or the data stack; the API's
    names and the submodules resolve on first use."""
    script = ("import sys, valign_jax\n"
              "heavy = [m for m in ('valign_jax.api', 'valign_jax.figures', 'matplotlib', "
              "'grain', 'tensorflow', 'ml_collections') if m in sys.modules]\n"
              "assert not heavy, heavy\n"
              "import valign_jax.api, valign_jax.evaluate\n"
              "assert valign_jax.zero_shot is valign_jax.api.zero_shot\n"
              "assert valign_jax.evaluate.evaluate and valign_jax.train.train_and_evaluate\n"
              "assert 'recipe' in dir(valign_jax)\n"
              "print('ok')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
