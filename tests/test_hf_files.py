"""Damaged or hostile Hugging Face checkpoint files (valign_jax/hf_files.py): every one is an
error naming the file and the key, raised before anything is traced; nothing outside the
checkpoint directory is opened and nothing blocks. The errors are ValueError / OSError, the
ones `python -m valign_jax.main` and `valign_jax.evaluate` print as one FATAL line."""

import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from valign_jax import hf, hf_files

from timeouts import no_hang

_OPENED = {"marker": None, "paths": []}   # files opened whose path holds the marker


def _audit(event, args):
    marker = _OPENED["marker"]
    if marker and event == "open" and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if marker in path:
            _OPENED["paths"].append(path)


sys.addaudithook(_audit)   # idle unless a test sets the marker


@pytest.fixture
def bert(torch_fixture, tmp_path):
    """A writable copy of the BERT fixture (2 layers, PyTorch layout) and its outputs."""
    source, expected = torch_fixture("bert")
    shutil.copytree(source, tmp_path / "bert")
    return tmp_path / "bert", expected


def pooled(tower, params, expected):
    out = tower.apply({"params": params}, expected["input_ids"], expected["attention_mask"])
    return np.asarray(out["pooled"])


def shard(directory, names=("part-1.safetensors", "part-2.safetensors")):
    """Split model.safetensors into two shards and an index, as transformers writes big
    checkpoints; returns the index dict."""
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for name, part in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: tensors[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    return index


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        node, *path = key.split(".")
        if path:
            config[node][path[0]] = value
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------
# Where the files are, and what they are


def test_a_sharded_checkpoint_loads_the_same_weights(bert):
    """The positive control for the index checks: the BERT fixture split into two shards with
    an index loads and reproduces PyTorch's outputs like the single file does."""
    directory, expected = bert
    whole = pooled(*hf.load_tower(directory, pooling="pooler"), expected)
    shard(directory)
    sharded = pooled(*hf.load_tower(directory, pooling="pooler"), expected)
    np.testing.assert_array_equal(sharded, whole)
    np.testing.assert_allclose(sharded, expected["pooler_output"], atol=1e-5)


def test_an_index_naming_a_shard_outside_the_directory_is_refused_unopened(bert, tmp_path):
    """The index maps the second half of the tensors to ../../outside/part-2.safetensors, a
    real, valid shard outside the checkpoint (and to an absolute path to it). Asserts:
    loading fails naming the index file and the entry, and the outside file is never opened
    (an audit hook watches every open)."""
    directory, _ = bert
    index = shard(directory)
    outside = tmp_path / "outside_marker_dir"
    outside.mkdir()
    shutil.move(directory / "part-2.safetensors", outside / "part-2.safetensors")
    for escape in (f"../../{outside.name}/part-2.safetensors",
                   str(outside / "part-2.safetensors")):
        weight_map = {k: (escape if v == "part-2.safetensors" else v)
                      for k, v in index["weight_map"].items()}
        (directory / hf.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
        key = next(k for k, v in weight_map.items() if v == escape)
        _OPENED.update(marker=outside.name, paths=[])
        try:
            with pytest.raises(hf_files.HFFileError) as err:
                hf.load_tower(directory)
        finally:
            _OPENED["marker"] = None
        message = str(err.value)
        assert hf.SAFETENSORS_INDEX in message and f"weight_map['{key}']" in message
        assert escape in message and "refused" in message
        assert _OPENED["paths"] == []


def test_symlinks_may_reach_the_hub_blob_store_and_nowhere_else(bert, tmp_path):
    """A huggingface_hub cache layout (snapshots/<rev>/ files linking to ../../blobs/) loads;
    the same directory whose model.safetensors links to a file elsewhere is refused, naming
    where the link leads."""
    directory, expected = bert
    repo = tmp_path / "models--org--bert"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, blobs / f"blob-{name}")
        (snapshot / name).symlink_to(f"../../blobs/blob-{name}")
    tower, params = hf.load_tower(snapshot, pooling="pooler")
    np.testing.assert_allclose(pooled(tower, params, expected), expected["pooler_output"],
                               atol=1e-5)

    (directory / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (directory / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(hf_files.HFFileError, match=r"model.safetensors resolves to .*"
                                                   r"elsewhere.safetensors, outside"):
        hf.load_tower(directory)


def test_fifos_are_refused_without_blocking(bert):
    """A FIFO as a shard named by the index, as model.safetensors and as config.json: each is
    refused naming the file (and the index that names it), within the no-hang guard: opening
    a FIFO with no writer would block for ever."""
    directory, _ = bert
    index = shard(directory)
    (directory / "part-2.safetensors").unlink()
    os.mkfifo(directory / "part-2.safetensors")
    with no_hang(20), pytest.raises(hf_files.HFFileError) as err:
        hf.load_tower(directory)
    assert "part-2.safetensors (named by model.safetensors.index.json) is not a regular " \
           "file" in str(err.value)

    for name in ("part-1.safetensors", "part-2.safetensors", hf.SAFETENSORS_INDEX):
        (directory / name).unlink()
    os.mkfifo(directory / "model.safetensors")
    with no_hang(20), pytest.raises(hf_files.HFFileError, match="model.safetensors is not a "
                                                                "regular file"):
        hf.load_tower(directory)
    assert index  # (the index was real before)

    os.unlink(directory / "config.json")
    os.mkfifo(directory / "config.json")
    with no_hang(20), pytest.raises(hf_files.HFFileError, match="config.json is not a regular"):
        hf.read_config(directory)


# ---------------------------------------------------------------------------------------------
# safetensors headers


def rewrite_raw(file, header=None, length=None, cut=None, raw_header=None):
    """Rewrite a safetensors file byte by byte: another header (dict or raw bytes), another
    declared length, or the file cut to `cut` bytes."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    old_header, body = json.loads(data[8:8 + n]), data[8 + n:]
    text = raw_header if raw_header is not None else json.dumps(
        header(old_header) if header else old_header).encode()
    out = struct.pack("<Q", len(text) if length is None else length) + text + body
    file.write_bytes(out[:cut] if cut is not None else out)
    return old_header


def _grow_first_shape(header):
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [1000, 1000]
    return header


def _past_the_end(header):
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + 10**9, end + 10**9]
    return header


def _bad_dtype(header):
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "F128"
    return header


@pytest.mark.parametrize("damage, expected", [
    (dict(length=2**40), "header claims 1099511627776 bytes"),
    (dict(raw_header=b"\x89garbage\xff not json at all"), "header is not valid JSON"),
    (dict(raw_header=b"[1, 2, 3]"), "header must be a JSON object"),
    (dict(header=_grow_first_shape), "needs 4000000"),
    (dict(header=_past_the_end), "past its end"),
    (dict(header=_bad_dtype), "has dtype 'F128'"),
    (dict(cut=4), "too short for a safetensors header"),
], ids=["length_2^40", "garbage", "not_an_object", "shape_vs_bytes", "offset_past_end",
        "dtype", "cut_in_length"])
def test_damaged_safetensors_headers_are_one_error_naming_the_file(bert, damage, expected):
    """Each damage, made to the real fixture file: an HFFileError (a ValueError) naming
    model.safetensors and what is wrong, raised by hf_files' own header check (the
    safetensors library is never handed the file) and within the no-hang guard."""
    directory, _ = bert
    rewrite_raw(directory / "model.safetensors", **damage)
    with no_hang(20), pytest.raises(hf_files.HFFileError) as err:
        hf.load_tower(directory)
    assert isinstance(err.value, ValueError)
    assert str(directory / "model.safetensors") in str(err.value) and expected in str(err.value)


def test_a_truncated_safetensors_file_names_the_first_tensor_cut_off(bert):
    """The file cut in the middle of its data: the error names the file, a tensor whose bytes
    are missing and says the file is truncated."""
    directory, _ = bert
    file = directory / "model.safetensors"
    header = rewrite_raw(file, cut=file.stat().st_size // 2)
    with pytest.raises(hf_files.HFFileError, match="past its end .* truncated") as err:
        hf.load_tower(directory)
    cut_off = [k for k in header if k != "__metadata__" and k in str(err.value)]
    assert len(cut_off) == 1


# ---------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": "32"}, "hidden_size='32' (str) must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 (int) must be a positive integer"),
    ({"intermediate_size": -48}, "intermediate_size=-48 (int) must be an integer >= 0"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers=2.0 (float) must be a positive integer"),
    ({"vocab_size": True}, "vocab_size=True (bool) must be a positive integer"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps=nan (float) must be a positive number"),
    ({"num_attention_heads": 5}, "hidden_size=32 is not divisible by num_attention_heads=5"),
    ({"hidden_act": 3}, "hidden_act=3 (int) must be a string"),
], ids=["str_width", "zero_heads", "negative", "float_layers", "bool", "nan_eps",
        "heads_divide", "act"])
def test_config_values_of_the_wrong_type_or_range_name_the_file_and_key(bert, changes, expected):
    directory, _ = bert
    edit_config(directory, **changes)
    with pytest.raises(hf_files.HFFileError) as err:
        hf.load_tower(directory)
    assert str(directory / "config.json") in str(err.value) and expected in str(err.value)


def test_a_clip_half_is_checked_under_its_own_key(torch_fixture, tmp_path):
    source, _ = torch_fixture("clip")
    shutil.copytree(source, tmp_path / "clip")
    edit_config(tmp_path / "clip", **{"vision_config.patch_size": "8"})
    with pytest.raises(hf_files.HFFileError, match=r"vision_config.patch_size='8' \(str\)"):
        hf.load_dual_encoder(tmp_path / "clip")


@pytest.mark.parametrize("name, changes, expected", [
    ("siglip", {"vision_config.vision_use_head": "yes"},
     "vision_config.vision_use_head='yes' (str) must be true or false"),
    ("siglip", {"text_config.projection_size": 0},
     "text_config.projection_size=0 (int) must be a positive integer"),
    ("siglip2_naflex", {"vision_config.num_patches": 16.0},
     "vision_config.num_patches=16.0 (float) must be a positive integer"),
    ("siglip2_naflex", {"vision_config.num_hidden_layers": 3},
     "vision_config.num_hidden_layers=3, but the weights"),
])
def test_siglip_configs_are_checked_per_half(torch_fixture, tmp_path, name, changes, expected):
    """SigLIP's and SigLIP 2's config.json pass the checks as transformers writes them, and a
    bad value in either half is one error naming the file and the key."""
    source, _ = torch_fixture(name)
    shutil.copytree(source, tmp_path / name)
    assert hf.read_config(tmp_path / name)["model_type"] == name.split("_")[0]
    edit_config(tmp_path / name, **changes)
    with pytest.raises(hf_files.HFFileError) as err:
        hf.load_dual_encoder(tmp_path / name)
    assert str(tmp_path / name / "config.json") in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json must hold a JSON object, not a list"),
    ("", "config.json is not valid JSON"),
])
def test_a_config_that_is_not_a_json_object_names_the_file(bert, text, expected):
    directory, _ = bert
    (directory / "config.json").write_text(text)
    with pytest.raises(hf_files.HFFileError, match=expected):
        hf.load_tower(directory)


def test_a_config_with_a_byte_order_mark_reads(bert):
    """Windows editors save config.json with a UTF-8 BOM; transformers reads it, so do we."""
    directory, expected = bert
    text = (directory / "config.json").read_text()
    (directory / "config.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert hf.read_config(directory)["hidden_size"] == 32


# ---------------------------------------------------------------------------------------------
# Architecture sizes against the weights, before anything is built


@pytest.fixture
def nothing_built(monkeypatch):
    """Records every tower built or traced by hf (tower_for, abstract_params)."""
    built = []
    for name in ("tower_for", "abstract_params"):
        real = getattr(hf, name)
        monkeypatch.setattr(hf, name, lambda *a, _real=real, _n=name, **k: (
            built.append(_n), _real(*a, **k))[1])
    return built


def test_a_config_claiming_more_layers_than_the_weights_fails_before_tracing(
        bert, nothing_built):
    """config.json says 10,000 layers; the weights hold 2 (encoder.layer.0/1). Asserts:
    read_config and load_tower fail naming num_hidden_layers=10000, the 2 layers held and the
    directory; no tower was built or traced. Sharded, the same check reads only the index."""
    directory, _ = bert
    edit_config(directory, num_hidden_layers=10_000)
    for load in (hf.read_config, hf.load_tower):
        with pytest.raises(hf_files.HFFileError) as err:
            load(directory)
        assert "num_hidden_layers=10000" in str(err.value) and "hold 2 layers" in str(err.value)
    assert nothing_built == []

    shard(directory)
    (directory / "part-1.safetensors").write_bytes(b"never read: the index has the names")
    with pytest.raises(hf_files.HFFileError, match="num_hidden_layers=10000.*hold 2 layers"):
        hf.read_config(directory)


def test_each_clip_half_is_counted_against_its_own_layers(torch_fixture, tmp_path,
                                                          nothing_built):
    source, _ = torch_fixture("clip")
    shutil.copytree(source, tmp_path / "clip")
    edit_config(tmp_path / "clip", **{"text_config.num_hidden_layers": 10_000})
    with pytest.raises(hf_files.HFFileError, match=r"text_config.num_hidden_layers=10000, "
                                                   r"but the weights .* hold 2 layers"):
        hf.load_dual_encoder(tmp_path / "clip")
    assert nothing_built == []


def test_fewer_layers_than_the_weights_hold_loads_the_bottom_ones_with_a_warning(bert, caplog):
    """config.json says 1 layer over 2 layers of weights: a warning naming both, and the
    1-layer tower loads the checkpoint's layer 0 exactly (as transformers would)."""
    directory, _ = bert
    edit_config(directory, num_hidden_layers=1)
    tower, params = hf.load_tower(directory)
    assert "num_hidden_layers=1 while the weights hold 2 layers" in caplog.text
    assert "1" not in params["encoder"]["layer"]
    weights = load_file(directory / "model.safetensors")
    np.testing.assert_array_equal(
        params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
        weights["encoder.layer.0.attention.self.query.weight"].T)


def test_a_flax_msgpack_checkpoint_is_counted_too(tmp_path, nothing_built):
    """A Flax-layout checkpoint (flax_model.msgpack, written by hf.save_tower) whose config
    claims 10,000 layers: the msgpack's structure gives the layer count (2) without decoding
    the arrays, and the error comes before any tower is built."""
    from valign_jax.models import BertConfig
    from valign_jax.models.layout import abstract_params
    from valign_jax.models.registry import tower_for
    import jax
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=16)
    tower = tower_for(config)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          abstract_params(tower, np.ones((1, 4), np.int32)))
    hf.save_tower(tower, params, tmp_path / "flax", formats=("msgpack",))
    nothing_built.clear()
    edit_config(tmp_path / "flax", num_hidden_layers=10_000)
    with pytest.raises(hf_files.HFFileError, match="num_hidden_layers=10000.*hold 2 layers"):
        hf.load_tower(tmp_path / "flax")
    assert nothing_built == []


# ---------------------------------------------------------------------------------------------
# Missing tensors


def test_a_missing_tensor_is_a_value_error_naming_file_key_and_parameter(bert):
    directory, _ = bert
    tensors = load_file(directory / "model.safetensors")
    key = "encoder.layer.1.intermediate.dense.bias"
    del tensors[key]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(hf_files.MissingTensorError) as err:
        hf.load_tower(directory)
    assert isinstance(err.value, ValueError)   # main's FATAL line, not a traceback
    message = str(err.value)
    assert str(directory / "model.safetensors") in message and f"'{key}'" in message
    assert "encoder/layer/1/intermediate/dense/bias" in message
    assert not message.startswith(("'", '"'))


def test_an_index_key_its_shard_does_not_hold_is_named(bert):
    directory, _ = bert
    index = shard(directory)
    index["weight_map"]["encoder.layer.9.extra.weight"] = "part-1.safetensors"
    (directory / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(hf_files.MissingTensorError,
                       match=r"index.json maps 'encoder.layer.9.extra.weight' to "
                             r"part-1.safetensors, which does not hold it"):
        hf.read_weights(directory)


# ---------------------------------------------------------------------------------------------
# What a user sees


def test_main_prints_one_fatal_line_naming_the_file_before_any_compute(bert, tmp_path):
    """`python -m valign_jax.main` with the text tower read from a damaged checkpoint: a
    config.json claiming 10,000 layers over 2, then (index and shards) a FIFO shard. Each
    run exits 1 with one FATAL line naming the file and the key, no traceback, within the
    subprocess timeout (the FIFO would otherwise block it for ever)."""
    import subprocess
    from conftest import REPO

    def main(checkpoint):
        return subprocess.run(
            [sys.executable, "-m", "valign_jax.main", "--config=configs/clip.py:demo",
             f"--config.model.text.checkpoint={checkpoint}", f"--workdir={tmp_path / 'run'}"],
            cwd=REPO, capture_output=True, text=True, timeout=120)

    directory, _ = bert
    edit_config(directory, num_hidden_layers=10_000)
    proc = main(directory)
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(fatal) == 1 and "FATAL: invalid config" in fatal[0]
    assert f"{directory / 'config.json'}: num_hidden_layers=10000, but the weights in " \
           f"{directory} hold 2 layers" in proc.stderr

    edit_config(directory, num_hidden_layers=2)
    shard(directory)
    (directory / "part-1.safetensors").unlink()
    os.mkfifo(directory / "part-1.safetensors")
    proc = main(directory)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "part-1.safetensors (named by model.safetensors.index.json) is not a regular " \
           "file" in proc.stderr
