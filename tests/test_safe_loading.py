"""Nothing a checkpoint or a dataset holds can run code or reach files outside it: the package
has no unpickling call, hub downloads skip code and pickles, a checkpoint's own modelling code
(`auto_map`) never runs, a pickled checkpoint is never opened, and dataset rows whose paths
leave the dataset root are refused, counted and never opened while the other rows train."""

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from valign_jax import hf, train
from valign_jax.data import pipeline, synthetic
from valign_jax.data.tokenizer import Tokenizer
from valign_jax.data.transforms import BrokenRecord

from conftest import REPO
from test_data_sources import DATA_CFG, encode, image
from test_train_data import write_pairs
from train_helpers import tiny_config

# ---------------------------------------------------------------------------------------------
# The package source

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                  "torch"}
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "torch.load", "joblib.load", "dill.load",
                "dill.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.load",
                "marshal.loads", "yaml.load", "yaml.unsafe_load", "pd.read_pickle",
                "pandas.read_pickle", "eval", "exec"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loading(source: str, where: str) -> list[str]:
    """Every import of an unpickling module, call that unpickles or evaluates code, pickle or
    remote-code switch turned on, and from_pretrained without trust_remote_code=False."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            found += [f"{where}:{node.lineno}: import {n}" for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in UNSAFE_CALLS:
            found.append(f"{where}:{node.lineno}: {name}(...)")
        for switch in ("allow_pickle", "trust_remote_code"):
            value = keywords.get(switch)
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}:{node.lineno}: {name}({switch}=...) not False")
        if name.endswith("from_pretrained") and "trust_remote_code" not in keywords:
            found.append(f"{where}:{node.lineno}: {name}(...) without trust_remote_code=False")
    return found


def test_the_package_source_has_no_unsafe_loading_call():
    """Parses every .py file of valign_jax and asserts none imports pickle/dill/joblib/torch/...,
    calls pickle.load(s), torch.load, yaml.load, eval or exec, passes allow_pickle or
    trust_remote_code other than False, or calls from_pretrained without
    trust_remote_code=False. A snippet holding each of those shows the scan finds them."""
    files = sorted((REPO / "valign_jax").rglob("*.py"))
    assert len(files) > 20
    found = [f for path in files for f in unsafe_loading(path.read_text(), path.name)]
    assert found == []
    source = "\n".join(path.read_text() for path in files)
    assert "from_pretrained(str(directory), trust_remote_code=False)" in source  # tokenizer.py

    bad = ("import pickle\nimport torch.serialization\nx = pickle.loads(b'')\n"
           "y = np.load('a.npy', allow_pickle=True)\nz = torch.load('m.pt')\n"
           "AutoTokenizer.from_pretrained('d')\nAutoConfig.from_pretrained('d', "
           "trust_remote_code=flag)\neval('1')\n")
    assert len(unsafe_loading(bad, "bad.py")) == 8


def test_hub_downloads_fetch_no_code_and_no_pickles():
    """Filters a hub repository's file list with huggingface_hub's own pattern matcher and
    hf.HUB_PATTERNS (what hf.resolve passes to snapshot_download) and asserts weights, configs
    and vocabularies pass while .py, .bin, .pt, .ckpt and .pkl files are never fetched."""
    from huggingface_hub.utils import filter_repo_objects
    repo = ["config.json", "model.safetensors", "flax_model.msgpack", "tokenizer.json",
            "vocab.txt", "spiece.model", "modeling_custom.py", "sub/tokenization_custom.py",
            "pytorch_model.bin", "model.pt", "model.ckpt", "optimizer.pkl"]
    fetched = list(filter_repo_objects(repo, allow_patterns=hf.HUB_PATTERNS))
    assert fetched == repo[:6]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def evil_module(marker: Path) -> str:
    """Python that leaves `marker` behind if it is ever imported or run."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"


def add_remote_code(directory: Path, marker: Path, model_type: str = "bert") -> None:
    """Give a checkpoint directory custom code: auto_map entries in config.json and
    tokenizer_config.json pointing at .py files that would write `marker`."""
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (directory / name).write_text(evil_module(marker))
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (directory / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]) + "\n")


def test_remote_code_in_a_checkpoint_never_runs(torch_fixture, tmp_path, caplog):
    """Copies the BERT fixture and adds auto_map entries (config.json, tokenizer_config.json)
    naming .py files that write a marker file when imported. Asserts: hf.load_tower loads it
    without running them and reproduces PyTorch's outputs, warning that auto_map was not run;
    the data side's Tokenizer tokenizes like a plain BertTokenizerFast of the same vocabulary;
    with an unknown model_type both refuse it; the marker never appears, although running one
    of the files does write it."""
    source, expected = torch_fixture("bert")
    marker = tmp_path / "MARKER"
    checkpoint = tmp_path / "bert"
    shutil.copytree(source, checkpoint)
    add_remote_code(checkpoint, marker)

    tower, params = hf.load_tower(checkpoint, pooling="pooler")
    out = tower.apply({"params": params}, expected["input_ids"], expected["attention_mask"])
    np.testing.assert_allclose(out["pooled"], expected["pooler_output"], atol=1e-5)
    assert "auto_map" in caplog.text and "never runs it" in caplog.text

    texts = ["a red circle", "a circle"]
    reference = transformers.BertTokenizerFast(vocab_file=str(checkpoint / "vocab.txt"))(
        texts, padding="max_length", max_length=8)["input_ids"]
    assert Tokenizer(checkpoint, max_length=8)(texts)["input_ids"].tolist() == reference

    unknown = tmp_path / "unknown"
    shutil.copytree(source, unknown)
    add_remote_code(unknown, marker, model_type="evil_bert")
    with pytest.raises(ValueError, match="model_type='evil_bert' is not supported"):
        hf.load_tower(unknown)
    with pytest.raises(FileNotFoundError, match="no usable tokenizer files"):
        Tokenizer(unknown, max_length=8)

    assert not marker.exists()
    subprocess.run([sys.executable, str(checkpoint / "modeling_evil.py")], check=True)
    assert marker.exists()  # the files really would have left the marker


class _WritesMarker:
    """Unpickling this runs Path(marker).write_text(...): what a malicious pickle does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path(self.marker).write_text, ("code ran",)


def test_a_pickled_checkpoint_is_never_unpickled(torch_fixture, tmp_path):
    """Replaces the BERT fixture's safetensors with a pytorch_model.bin whose unpickling
    writes a marker file; asserts hf.load_tower refuses it naming the file and the marker
    never appears (while unpickling the file here does write it)."""
    source, _ = torch_fixture("bert")
    checkpoint, marker = tmp_path / "bert", tmp_path / "MARKER"
    shutil.copytree(source, checkpoint)
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle"):
        hf.load_tower(checkpoint)
    assert not marker.exists()
    pickle.loads((checkpoint / "pytorch_model.bin").read_bytes())
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Dataset paths

_WATCHED = {"directory": None, "opened": []}   # while a test watches: files opened inside


def _audit(event, args):
    """Record every file opened (by any thread) whose real location is the watched directory."""
    if event != "open" or _WATCHED["directory"] is None or not isinstance(args[0], (str, bytes)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    if path.startswith(_WATCHED["directory"] + os.sep):
        _WATCHED["opened"].append(path)


sys.addaudithook(_audit)   # audit hooks cannot be removed; this one is idle outside the tests


@pytest.fixture
def outside(tmp_path):
    """A directory outside every dataset root holding real images, secret.png and 1.png;
    yields it with the list of files opened inside it during the test."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.png").write_bytes(encode(image(9, (32, 32))))
    (directory / "1.png").write_bytes(encode(image(1)))
    _WATCHED.update(directory=os.path.realpath(directory), opened=[])
    yield directory, _WATCHED["opened"]
    _WATCHED["directory"] = None


def test_pairs_rows_outside_the_dataset_root_are_refused_counted_and_never_opened(
        tmp_path, outside, caplog):
    """Writes a pairs.jsonl with 24 good rows, a good row whose path goes down and back up
    inside the root, and 4 rows reaching a real image outside the root (`../`, absolute,
    a symlink in the root, climbing out of a subfolder). Asserts: opening the file warns about
    the 3 rows whose path text leaves the root; the evaluation reader skips exactly the 4 with
    the reason 'outside the dataset root' and keeps the 25 others; a 4-step training run on the
    file (evaluating on it too) finishes with finite metrics and counts >= 4 skipped examples;
    no file outside the root was ever opened, by any thread."""
    directory, opened = outside
    data = synthetic.SyntheticImageText("train", num_examples=24, image_size=32)
    root = tmp_path / "data"
    pairs = write_pairs(root, [data[i] for i in range(24)], broken=[
        {"image": "../outside/secret.png", "caption": "dot dot"},
        {"image": str(directory / "secret.png"), "caption": "absolute"},
        {"image": "link.png", "caption": "symlink"},
        {"image": "sub/../../outside/secret.png", "caption": "climbs out"},
        {"image": "sub/../img1.png", "caption": "inside"}])
    (root / "link.png").symlink_to(directory / "secret.png")

    source = pipeline.make_source(str(pairs), "eval", DATA_CFG, 32, "config.data.eval")
    assert "3 rows name an image outside" in caplog.text
    result = pipeline.eval_records(source)
    assert len(result.records) == 25 and result.skipped == 4
    assert all("outside the dataset root" in r for r in result.reasons), result.reasons
    with pytest.raises(BrokenRecord, match="link.png: resolves to .*secret.png, outside"):
        source[24 + 2]

    config = tiny_config("clip", steps=4)
    config.data.train = config.data.eval = str(pairs)
    config.eval.zeroshot = ""
    final = train.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(final["train/loss"]) and np.isfinite(final["retrieval/i2t_r1"])
    assert final["data/skipped_examples"] >= 4   # 4 steps of 8 pass every row at least once
    assert opened == []


def test_class_folder_symlinks_out_of_the_root_are_refused(tmp_path, outside):
    """Builds class folders where `cat` holds a good image and a symlink to an image outside
    the root, and `dog` is a symlink to a folder outside the root holding two images. Asserts
    the good image reads, the 3 escaping files raise BrokenRecord naming the root, the
    evaluation reader skips exactly those 3, and no file outside the root was opened."""
    directory, opened = outside
    root = tmp_path / "classes"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "0.png").write_bytes(encode(image(0)))
    (root / "cat" / "link.png").symlink_to(directory / "secret.png")
    (root / "dog").symlink_to(directory, target_is_directory=True)

    source = pipeline.make_source(str(root), "eval", DATA_CFG, 16, "config.eval.zeroshot")
    assert source.class_names == ("cat", "dog") and len(source) == 4
    assert source[0]["caption"] == "cat"
    for index in (1, 2, 3):
        with pytest.raises(BrokenRecord, match="outside the dataset root"):
            source[index]
    result = pipeline.eval_records(source)
    assert len(result.records) == 1 and result.skipped == 3
    assert opened == []
