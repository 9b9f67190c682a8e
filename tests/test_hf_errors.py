"""Bad checkpoints and bad inputs fail with errors that name the file, key, parameter path and
shapes, or say what to pass instead."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from valign_jax import hf


@pytest.fixture
def bert_copy(torch_fixture, tmp_path):
    path, _ = torch_fixture("bert")
    shutil.copytree(path, tmp_path / "bert")
    return tmp_path / "bert"


def rewrite(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_wrong_shape_names_parameter_and_both_shapes(bert_copy):
    key = "encoder.layer.1.attention.self.query.weight"
    rewrite(bert_copy, lambda t: t.__setitem__(key, np.zeros((32, 16), np.float32)))
    with pytest.raises(ValueError) as err:
        hf.load_tower(bert_copy)
    msg = str(err.value)
    assert "encoder/layer/1/attention/self/query/kernel" in msg and key in msg
    assert "(16, 32)" in msg and "(32, 32)" in msg


def test_missing_tensor_names_key_and_file(bert_copy):
    key = "encoder.layer.0.output.LayerNorm.bias"
    rewrite(bert_copy, lambda t: t.pop(key))
    with pytest.raises(KeyError) as err:
        hf.load_tower(bert_copy)
    assert key in str(err.value) and "model.safetensors" in str(err.value)
    assert "encoder/layer/0/output/LayerNorm/bias" in str(err.value)


def test_unknown_model_type(bert_copy):
    config = json.loads((bert_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bert_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported.*'bert'.*'vit'"):
        hf.load_tower(bert_copy)


def test_pickle_checkpoint_is_refused(bert_copy):
    (bert_copy / "model.safetensors").unlink()
    (bert_copy / "pytorch_model.bin").write_bytes(b"\x80\x04 not opened")
    with pytest.raises(ValueError, match=r"(?s)pytorch_model.bin is a pickle.*safe_serialization=True"):
        hf.load_tower(bert_copy)


def test_hub_id_without_network_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        hf.load_tower("no-such-org/no-such-model")
    assert "'no-such-org/no-such-model'" in str(err.value) and "local directory" in str(err.value)


def test_missing_local_path_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        hf.load_tower(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        hf.load_tower(tmp_path / "empty")


def test_full_clip_needs_part(torch_fixture):
    path, _ = torch_fixture("clip")
    with pytest.raises(ValueError, match="part='text' or part='vision'"):
        hf.load_tower(path)
    bert, _ = torch_fixture("bert")
    with pytest.raises(ValueError, match="load_dual_encoder reads two-tower checkpoints.*not model_type=.bert."):
        hf.load_dual_encoder(bert)


def test_wrong_image_shape(torch_fixture):
    path, _ = torch_fixture("vit")
    tower, params = hf.load_tower(path)
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*NHWC.*3 channels"):
        tower.apply({"params": params}, np.zeros((2, 3, 32, 32), np.float32))  # NCHW by mistake


def test_bad_run_options(torch_fixture):
    path, _ = torch_fixture("bert")
    with pytest.raises(ValueError, match="pooling='max'.*'cls', 'mean', 'pooler'"):
        hf.load_tower(path, pooling="max")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        hf.load_tower(path, dtype="fp8")
