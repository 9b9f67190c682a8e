"""`python -m valign_jax.evaluate`: a run's checkpoint gives the metrics the run itself logged,
plus plots, LN shifts and TensorBoard scalars; the same model exported as an HF CLIP gives the
same numbers through --hf; tfds (mock) data and class folders evaluate; missing things are named.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import valign_jax
from valign_jax import evaluate, hf, train
from valign_jax.data import synthetic
from valign_jax.evaluation.templates import CLIP80

from conftest import REPO
from train_helpers import tiny_config

RETRIEVAL = [f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
GEOMETRY = ["geometry/gap", "geometry/gap_sq_per_dim", "geometry/alignment",
            "geometry/uniformity"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip_run")
    train.train_and_evaluate(tiny_config("clip", steps=4), workdir)
    return workdir


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "valign_jax.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def last_logged(workdir):
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])


def test_cli_reports_what_the_run_logged_with_plots_and_ln_shift(clip_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli(f"--workdir={clip_run}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    metrics, logged = result["metrics"], last_logged(clip_run)
    assert result["step"] == logged["step"] == 4
    for key in RETRIEVAL + GEOMETRY + ["zeroshot/synthetic/top1", "zeroshot/synthetic/top5"]:
        assert metrics[key] == pytest.approx(logged[key], abs=1e-6), key
    for d in ("i2t", "t2i"):
        assert metrics[f"retrieval/{d}_r1"] <= metrics[f"retrieval/{d}_r5"] <= metrics[
            f"retrieval/{d}_r10"]
    assert 0 <= metrics["zeroshot/synthetic/mean_per_class_recall"] <= 1
    # Four Adam steps moved every LayerNorm of both towers' two layers.
    for tower in ("image", "text"):
        shift = result["ln_shift"][tower]
        assert shift["layers"] == [0, 1] and all(v > 0 for v in shift["l1"])
        assert metrics[f"ln_shift/{tower}/layer_1_l1"] == pytest.approx(shift["l1"][1])
    for name in ("pca", "ln_shift"):
        png = tmp_path / f"eval_{name}.png"
        assert result["plots"][name] == str(png)
        assert Image.open(png).size[0] > 100
    assert list((tmp_path / "eval_tensorboard").glob("events.out.tfevents.*"))
    assert str(out) in proc.stdout and "retrieval/t2i_r1" in proc.stdout


def test_an_exported_hf_clip_evaluates_to_the_same_numbers(clip_run, tmp_path):
    """load_trained -> hf.save_dual_encoder + the demo vocabulary as an HF tokenizer -> --hf:
    the checkpoint path, the HF loader and the tokenizer agree with the workdir path."""
    model, params, config = valign_jax.load_trained(clip_run)
    export = tmp_path / "hf_clip"
    hf.save_dual_encoder(model, params, export)
    synthetic.save_hf_tokenizer(export)
    ours = evaluate.evaluate(workdir=clip_run, out=tmp_path / "run.json")
    theirs = evaluate.evaluate(hf_path=str(export), config=config, out=tmp_path / "hf.json")
    assert theirs["ln_shift"] is None and theirs["source"] == str(export)
    for key in RETRIEVAL + GEOMETRY + ["zeroshot/synthetic/top1"]:
        assert theirs["metrics"][key] == pytest.approx(ours["metrics"][key], abs=1e-5), key


def write_class_folders(root, names, per_class=4):
    """Rendered synthetic images of classes `names` as <root>/<name>/<i>.png."""
    data = synthetic.SyntheticImageText("eval", 400, 32, seed=3)
    counts = {n: 0 for n in names}
    for i in range(len(data)):
        record = data[i]
        name = synthetic.CLASS_NAMES[record["label"]]
        if name in counts and counts[name] < per_class:
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(record["image"]).save(root / name / f"{counts[name]}.png")
            counts[name] += 1
    assert all(c == per_class for c in counts.values()), counts
    return root


def reference_top1(workdir, folder, names):
    """Brute force with the model itself: every image against the 80-template class means."""
    model, params, config = valign_jax.load_trained(workdir)
    tok = synthetic.WordTokenizer(config.model.text.max_length)
    images, labels = [], []
    for label, name in enumerate(sorted(names)):
        for png in sorted((folder / name).glob("*.png")):
            images.append(np.asarray(Image.open(png).convert("RGB")))
            labels.append(label)
    pixels = (np.stack(images).astype(np.float32) / 255 - 0.5) / 0.5
    img = np.asarray(model.apply({"params": params}, pixels, method=model.encode_image))
    classes = []
    for name in sorted(names):
        t = tok([tpl.format(name) for tpl in CLIP80])
        f = np.asarray(model.apply({"params": params}, t["input_ids"], t["attention_mask"],
                                   method=model.encode_text), np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        classes.append(f.mean(0) / np.linalg.norm(f.mean(0)))
    sims = img @ np.stack(classes).T
    return float(np.mean(np.argmax(sims, axis=1) == np.asarray(labels)))


def test_tfds_mock_data_and_class_folders(clip_run, tmp_path):
    import tensorflow_datasets as tfds
    names = ["red circle", "blue square", "green triangle"]
    folder = write_class_folders(tmp_path / "shapes_folders", names)
    with tfds.testing.mock_data(num_examples=12):
        result = evaluate.evaluate(workdir=clip_run, out=tmp_path / "e.json", overrides={
            "eval_data": "tfds:coco_captions/test",
            "zeroshot": f"tfds:cifar10/test,{folder}"})
    m = result["metrics"]
    assert all(0 <= m[key] <= 1 for key in RETRIEVAL) and all(np.isfinite(m[k]) for k in GEOMETRY)
    assert {"zeroshot/cifar10/top1", "zeroshot/shapes_folders/top1"} <= set(m)
    assert m["zeroshot/shapes_folders/top1"] == pytest.approx(
        reference_top1(clip_run, folder, names), abs=1e-9)


def test_missing_things_are_named(clip_run, tmp_path):
    import tensorflow_datasets as tfds
    with pytest.raises(ValueError, match="another recipe"):
        evaluate.evaluate(workdir=clip_run, config=tiny_config("lilt"))
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        evaluate.evaluate(workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; have \[4\]"):
        evaluate.evaluate(workdir=clip_run, step=3)
    empty = tiny_config("clip")
    empty.data.num_eval = 0
    with pytest.raises(ValueError, match=r"evaluation set is empty \(config.data.num_eval"):
        evaluate.evaluate(workdir=clip_run, config=empty, out=tmp_path / "x.json")
    with tfds.testing.mock_data(num_examples=4), pytest.raises(
            ValueError, match="coco_captions/test: not a classification source"):
        evaluate.evaluate(workdir=clip_run, out=tmp_path / "x.json",
                          overrides={"zeroshot": "tfds:coco_captions/test"})
    # ImageNet-style folders named by WordNet id: the names a prompt needs are missing.
    wordnet = tmp_path / "wnids"
    for i, wnid in enumerate(["n01440764", "n01443537"]):
        (wordnet / wnid).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(wordnet / wnid / "a.png")
    with pytest.raises(ValueError, match="WordNet ids.*config.eval.class_names"):
        evaluate.evaluate(workdir=clip_run, out=tmp_path / "x.json",
                          overrides={"zeroshot": str(wordnet)})
    names = tmp_path / "names.txt"
    names.write_text("tench\n")
    with pytest.raises(ValueError, match="names.txt: 1 class names, but .* has 2 classes"):
        evaluate.evaluate(workdir=clip_run, out=tmp_path / "x.json",
                          overrides={"zeroshot": str(wordnet), "class_names": str(names)})
    names.write_text("tench\ngoldfish\n")
    result = evaluate.evaluate(workdir=clip_run, out=tmp_path / "x.json",
                               overrides={"zeroshot": str(wordnet), "class_names": str(names)})
    assert "zeroshot/wnids/top1" in result["metrics"]


def test_cli_errors_are_one_fatal_line(clip_run):
    proc = run_cli(f"--workdir={clip_run}", "--step=3")
    assert proc.returncode == 1 and "FATAL:" in proc.stderr and "have [4]" in proc.stderr
    proc = run_cli("--out=/tmp/x.json")
    assert proc.returncode == 1 and "pass --workdir=DIR" in proc.stderr
