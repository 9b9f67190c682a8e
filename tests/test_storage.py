"""gs:// workdirs (storage.py): every file the run writes or reads in its workdir goes through
etils.epath, never pathlib, so a URL reaches the bucket instead of a local ./gs:/ directory.

There is no bucket offline: `fake_gcs` serves gs://bucket/... from a local directory through
etils' own epath mock, and the cwd is watched for a stray ./gs: directory. What this cannot
reach: orbax writes array data through TensorStore's own GCS driver, and TensorBoard through
TensorFlow's; both are those libraries' GCS support, not exercised here.
"""

import json
import os

import ml_collections
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from valign_jax import checkpointing, storage, workdir as run_workdir


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://<path> is <tmp>/gcs/<path> for every epath operation; yields that root."""
    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(p):
        p = os.fspath(p)
        return os.fspath(root / p[len("gs://"):]) if p.startswith("gs://") else p

    def url(p):
        p = os.fspath(p)
        return "gs://" + os.path.relpath(p, root) if p.startswith(os.fspath(root)) else p

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def glob(fn, pattern):
        return [url(p) for p in fn(local(pattern))]

    def walk(fn, top, **kwargs):
        for d, dirs, files in fn(local(top), **kwargs):
            yield url(d), dirs, files

    # epath hands gs:// to TensorFlow's GCS client whenever TF is installed (it is, here and
    # on a TPU VM); the mock replaces the other backends only.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    # orbax asks a gs:// bucket whether it has a hierarchical namespace, over the network
    from orbax.checkpoint._src.path import gcs_utils
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    with epath_testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
        yield root
    assert not (cwd / "gs:").exists(), "a workdir URL was written as a local path"


def test_workdir_urls_reach_the_bucket(fake_gcs):
    workdir = run_workdir.prepare_workdir("gs://bucket/run")
    assert str(workdir) == "gs://bucket/run"
    assert (fake_gcs / "bucket/run").is_dir()
    assert not list((fake_gcs / "bucket/run").iterdir()), "the write probe was left behind"

    checkpointing.write_json(workdir / "config.json", {"a": 1})
    assert json.loads((fake_gcs / "bucket/run/config.json").read_text()) == {"a": 1}

    # metrics.jsonl: an object cannot be appended to, so each line rewrites it whole
    metrics = workdir / "metrics.jsonl"
    for step in (1, 2, 3):
        storage.append_line(metrics, json.dumps({"step": step}))
    lines = (fake_gcs / "bucket/run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert run_workdir._last_line(metrics) == {"step": 3}
    assert sorted(p.name for p in (fake_gcs / "bucket/run").iterdir()) == [
        "config.json", "metrics.jsonl"]


def test_run_files_and_checkpoint_directory_on_a_bucket(fake_gcs):
    """write_run_files refuses a different model in a bucket workdir as in a local one, and
    orbax's checkpoint manager is handed the URL (it creates the directory through epath)."""
    from valign_jax.models.dual_encoder import DualEncoder
    from valign_jax.models import FeaturesConfig

    def model(dim):
        return DualEncoder(image_config=FeaturesConfig(dim, "image"),
                           text_config=FeaturesConfig(dim, "text"), projection_dim=4)
    config = ml_collections.ConfigDict({"seed": 0})
    workdir = run_workdir.prepare_workdir("gs://bucket/run")
    run_workdir.write_run_files(workdir, config, model(8))
    assert (fake_gcs / "bucket/run/model.json").is_file()
    with pytest.raises(ValueError, match="gs://bucket/run holds a run of a different model"):
        run_workdir.write_run_files(workdir, config, model(16))

    checkpoints = checkpointing.Checkpoints(workdir, async_save=False)
    assert str(checkpoints.directory) == "gs://bucket/run/checkpoints"
    assert (fake_gcs / "bucket/run/checkpoints").is_dir()
    assert checkpoints.latest_step() is None
    # orbax looks for half-written checkpoints to delete in a thread that only `save` waits
    # for; let it finish while gs:// is still the stand-in
    checkpoints.manager._maybe_await_cleanup_tmp_directory()
    checkpoints.manager.close()
    with pytest.raises(FileNotFoundError, match="gs://bucket/run/checkpoints: no finished"):
        checkpointing.restore_params("gs://bucket/run")


def test_local_paths_are_made_absolute_and_appended_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = storage.path("runs/a")
    assert str(workdir) == os.fspath(tmp_path / "runs/a")
    run_workdir.prepare_workdir("runs/a")
    storage.append_line(workdir / "m.jsonl", "1")
    storage.append_line(workdir / "m.jsonl", "2")
    assert (tmp_path / "runs/a/m.jsonl").read_text() == "1\n2\n"


def test_a_gs_workdir_without_the_storage_client_is_refused_first(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_importable", lambda module: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match=r"--workdir=gs://bucket/run: .*\.\[gcs\]"):
        run_workdir.prepare_workdir("gs://bucket/run")
    assert not list(tmp_path.iterdir())


def test_relative_feature_cache_in_a_url_workdir_is_refused():
    from valign_jax import frozen_towers
    config = ml_collections.ConfigDict({"data": {"feature_cache": "features"}})
    with pytest.raises(ValueError, match="feature_cache='features'.*memory-mapped"):
        frozen_towers.cache_dir(config, "train", "gs://bucket/run")
    assert str(frozen_towers.cache_dir(config, "train", "/tmp/run")) == "/tmp/run/features/train"

