"""The Colab notebooks in notebooks/: each runs end to end in a real Jupyter kernel on its small
settings (VALIGN_NOTEBOOK_SMALL=1), in a temporary working directory, and what it computed or
wrote is checked against an independent path (the training loop's own metrics, transformers'
PyTorch CLIP); the committed notebooks have no outputs and are what make_notebooks.py writes.
"""

import json
import sys

import jax
import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import make_notebooks  # noqa: E402

REPORT_MARK = "NOTEBOOK_REPORT "


def run_notebook(name, workdir, parameters=None, report=()):
    """Executes notebooks/<name>.ipynb in a python3 kernel whose working directory is `workdir`,
    `parameters` set in a cell right after the one tagged "parameters" (papermill's
    convention). Returns (executed notebook, {expression: value} for the expressions in
    `report` ("result.probs"), evaluated in the kernel at the end and read back as JSON)."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first = next(i for i, c in enumerate(notebook.cells)
                 if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{k} = {v!r}" for k, v in (parameters or {}).items())
    notebook.cells.insert(first + 1, nbformat.v4.new_code_cell(injected))
    if report:
        notebook.cells.append(nbformat.v4.new_code_cell(
            "import json as _json\nimport numpy as _np\n"
            f"print({REPORT_MARK!r} + _json.dumps({{k: _np.asarray(eval(k)).tolist() "
            f"for k in {list(report)!r}}}))"))
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(workdir)}}).execute()
    values = {}
    if report:
        text = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
        values = json.loads(text.split(REPORT_MARK, 1)[1])
    return notebook, values


def displayed_images(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code"
               for o in c.outputs)


@pytest.fixture(autouse=True)
def small_kernel(monkeypatch):
    """Kernels inherit this environment: the small settings, and the suite's XLA cache."""
    monkeypatch.setenv("VALIGN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)


@pytest.fixture(scope="module")
def trained_notebook(tmp_path_factory):
    """train.ipynb executed once: (its working directory, the executed notebook)."""
    cwd = tmp_path_factory.mktemp("train_notebook")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VALIGN_NOTEBOOK_SMALL", "1")
        mp.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
        notebook, _ = run_notebook("train", cwd)
    return cwd, notebook


def test_notebooks_are_committed_without_outputs():
    """Every committed notebook: code cells have no outputs and no execution counts."""
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.stem for p in paths} == set(make_notebooks.NOTEBOOKS)
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (path, cell.id)


def test_notebooks_are_what_make_notebooks_writes(tmp_path):
    """Regenerating the notebooks reproduces the committed files byte for byte, and each has
    a first code cell tagged "parameters" holding the SMALL switch."""
    for path in make_notebooks.write_all(tmp_path):
        assert path.read_text() == (NOTEBOOKS / path.name).read_text(), (
            f"{path.name} is stale: run python notebooks/make_notebooks.py")
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert code[0].metadata["tags"] == ["parameters"]
        assert 'os.environ.get("VALIGN_NOTEBOOK_SMALL") == "1"' in code[0].source


def test_notebooks_use_only_the_public_api():
    """The notebooks' code imports no valign_jax module but the package, defines no function,
    and reaches valign_jax only through its public API (the names valign_jax/__init__.py lists
    and the train / evaluate entry points)."""
    import re

    import valign_jax
    public = set(valign_jax._API) | {"__version__", "train.train_and_evaluate",
                                     "evaluate.evaluate"}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "code")
        assert not re.search(r"^\s*def |\blambda\b", code, re.M), path.name
        assert not re.search(r"from valign_jax\b|import valign_jax\.", code), path.name
        used = set(re.findall(r"(?<![\w/])valign_jax\.((?:train|evaluate)\.\w+|\w+)", code))
        assert used and used <= public, (path.name, used - public)


def test_train_notebook_trains_logs_and_plots(trained_notebook):
    """train.ipynb trains configs/clip.py:demo on its small settings in the kernel's working
    directory: metrics.jsonl has the step-0 and final evaluations and retrieval improved
    between them; evaluate wrote the checkpoint's metrics (equal to what the run logged) and
    the PCA and LN-shift PNGs, which the notebook displays."""
    cwd, notebook = trained_notebook
    workdir = cwd / "workdirs" / "notebook_train"
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 0 and logged[-1]["step"] == 100
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r1"):
        assert logged[-1][key] > logged[0][key] + 0.1, key
    result = json.loads((workdir / "eval" / "step_100.json").read_text())
    for key in ("retrieval/t2i_r1", "geometry/gap", "zeroshot/synthetic/top1"):
        assert result["metrics"][key] == pytest.approx(logged[-1][key], abs=1e-5), key
    for name in ("pca", "ln_shift"):
        png = workdir / "eval" / f"step_100_{name}.png"
        assert result["plots"][name] == str(png) and Image.open(png).size[0] > 100
    assert list(workdir.glob("events.out.tfevents.*"))
    assert displayed_images(notebook) >= 3  # the curves and both plots


def test_zero_shot_notebook_on_a_trained_run_matches_its_logged_accuracy(trained_notebook):
    """zero_shot.ipynb on the workdir train.ipynb wrote, over the run's own held-out shapes:
    its predictions' accuracy (argmax of the probabilities it shows) equals the zero-shot
    top-1 the training loop logged for that checkpoint (within one image: its batches have
    another size, which may round a near tie the other way), and beats chance (1/24)
    threefold;
    every row of probabilities sums to 1 and the grid is displayed."""
    cwd, _ = trained_notebook
    workdir = cwd / "workdirs" / "notebook_train"
    num_eval = json.loads((workdir / "config.json").read_text())["data"]["num_eval"]
    logged = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    notebook, out = run_notebook("zero_shot", cwd, {"MODEL": str(workdir),
                                                    "NUM_IMAGES": num_eval},
                                 report=("result.probs", "result.predicted", "data.labels",
                                         "data.class_names"))
    probs, predicted, labels = (np.asarray(out[k]) for k in ("result.probs", "result.predicted",
                                                             "data.labels"))
    assert probs.shape == (num_eval, 24) and len(out["data.class_names"]) == 24
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(predicted, probs.argmax(axis=1))
    accuracy = float(np.mean(predicted == labels))
    assert accuracy == pytest.approx(logged["zeroshot/synthetic/top1"], abs=1.01 / num_eval)
    assert accuracy > 3 / 24
    assert displayed_images(notebook) == 1


def test_zero_shot_notebook_on_an_hf_clip_matches_transformers(tmp_path):
    """A tiny CLIP written by transformers' CLIPModel.save_pretrained (random weights), with the
    demo vocabulary as its tokenizer and a CLIPImageProcessor's pixel statistics, loads in
    zero_shot.ipynb; with one template its class probabilities equal the softmax of
    transformers' own logits_per_image for the same images and prompts."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from valign_jax.data import synthetic

    vocab = synthetic.WordTokenizer(16).vocab_size
    config = tf.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, vocab_size=vocab, max_position_embeddings=16,
                         bos_token_id=synthetic.BOS_ID, eos_token_id=synthetic.EOS_ID,
                         pad_token_id=synthetic.PAD_ID),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    reference = tf.CLIPModel(config).eval()
    checkpoint = tmp_path / "tiny_clip"
    reference.save_pretrained(checkpoint, safe_serialization=True)
    synthetic.save_hf_tokenizer(checkpoint)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    tf.CLIPImageProcessor(image_mean=list(mean), image_std=list(std)).save_pretrained(checkpoint)

    template = "a photo of a {}."
    _, out = run_notebook("zero_shot", tmp_path, {
        "MODEL": str(checkpoint), "TEMPLATES": [template], "NUM_IMAGES": 12, "SHOW": 4},
        report=("result.probs", "data.labels", "data.class_names"))

    source = synthetic.SyntheticImageText("eval", num_examples=12, image_size=32, seed=0)
    images = np.stack([source[i]["image"] for i in range(12)]).astype(np.float32) / 255.0
    pixels = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    tokens = tf.AutoTokenizer.from_pretrained(str(checkpoint))(
        [template.format(c) for c in synthetic.CLASS_NAMES], padding="max_length",
        max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = reference(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                           input_ids=tokens["input_ids"],
                           attention_mask=tokens["attention_mask"]).logits_per_image
    expected = torch.softmax(logits, dim=1).numpy()
    assert out["data.class_names"] == list(synthetic.CLASS_NAMES)
    assert out["data.labels"] == [source[i]["label"] for i in range(12)]
    # Probabilities range over 0.003-0.1 here; CLIP's vs [-1, 1] pixels moves them by ~2e-3.
    np.testing.assert_allclose(np.asarray(out["result.probs"]), expected, rtol=1e-3, atol=1e-5)


def test_modality_gap_notebook_closes_the_gap(tmp_path):
    """modality_gap.ipynb pretrains a tiny fixed-scale CLIP, refines it with CLIP-Refine and
    evaluates both: the gap after is below the gap before; "before" equals what the refine run
    logged at its step 0 (the pretrained parameters, through the training loop's evaluator)
    and "after" its last line; both PCA plots exist and the notebook displays them."""
    notebook, _ = run_notebook("modality_gap", tmp_path)
    workdir = tmp_path / "workdirs" / "notebook_clip_refine"
    before = json.loads((workdir / "eval" / "before.json").read_text())
    after = json.loads((workdir / "eval" / "after.json").read_text())
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert (before["step"], after["step"]) == (300, 100)
    assert after["metrics"]["geometry/gap"] < before["metrics"]["geometry/gap"]
    for key in ("geometry/gap", "retrieval/t2i_r1", "zeroshot/synthetic/top1"):
        assert before["metrics"][key] == pytest.approx(logged[0][key], abs=1e-5), key
        assert after["metrics"][key] == pytest.approx(logged[-1][key], abs=1e-5), key
    for result in (before, after):
        assert Image.open(result["plots"]["pca"]).size[0] > 100
    assert displayed_images(notebook) == 1  # the two PCA plots side by side
