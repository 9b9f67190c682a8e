"""Data files as users and disks really leave them (valign_jax/data/sources.py, pipeline.py):
a byte order mark on a pairs file, a FIFO where an image should be, tar shards truncated or
gzip-compressed, a dataset smaller than one batch. Each is handled (BOM), a counted skip (FIFO
rows, broken shards) or a warning (tiny datasets); nothing blocks (the no-hang guard)."""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest

from valign_jax.data import pipeline, sources, synthetic
from valign_jax.data.transforms import BrokenRecord

from test_data_sources import DATA_CFG, encode, image, jpeg
from timeouts import no_hang

BOM = b"\xef\xbb\xbf"


def pictures(root, count):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"{i}.png").write_bytes(encode(image(i, (16, 16))))
    return [f"{i}.png" for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Byte order marks


def test_a_pairs_jsonl_starting_with_a_bom_keeps_its_first_row(tmp_path):
    """Three rows written with a UTF-8 BOM, as Windows Notepad saves them. Asserts all three
    are usable rows (the first used to fail as invalid JSON) with the right captions, the same
    as the file without the BOM."""
    names = pictures(tmp_path, 3)
    lines = "\n".join(json.dumps({"image": n, "caption": f"caption {i}"})
                      for i, n in enumerate(names))
    for name, data in (("bom.jsonl", BOM + lines.encode()), ("plain.jsonl", lines.encode())):
        (tmp_path / name).write_bytes(data)
    bom = sources.open_source(str(tmp_path / "bom.jsonl"))
    plain = sources.open_source(str(tmp_path / "plain.jsonl"))
    assert bom.rows == plain.rows and len(bom) == 3
    assert [bom[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]


def test_a_pairs_csv_starting_with_a_bom_has_a_readable_header(tmp_path):
    """pairs.csv with a BOM before `image,caption` (Excel's "CSV UTF-8"): the header's first
    column is `image`, not '\\ufeffimage', so the file opens and both rows read."""
    names = pictures(tmp_path, 2)
    text = "image,caption\n" + "".join(f"{n},picture {i}\n" for i, n in enumerate(names))
    (tmp_path / "pairs.csv").write_bytes(BOM + text.encode())
    source = sources.open_source(str(tmp_path), "config.data.train")
    assert isinstance(source, sources.PairsSource) and len(source) == 2
    assert [source[i]["caption"] for i in range(2)] == ["picture 0", "picture 1"]


# ---------------------------------------------------------------------------------------------
# FIFOs and other non-files


@pytest.fixture
def rows_with_a_fifo(tmp_path):
    """pairs.jsonl: 4 good rows, one naming a FIFO (fifo.png, inside the root) and one naming
    a directory."""
    names = pictures(tmp_path, 4)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    rows = [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)]
    rows[2:2] = [{"image": "fifo.png", "caption": "a fifo"},
                 {"image": "folder.png", "caption": "a folder"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "pairs.jsonl"


def test_a_fifo_named_by_a_row_is_a_counted_skip_not_a_hang(rows_with_a_fifo):
    """Reading the FIFO's row raises BrokenRecord naming it, at once (it has no writer: opening
    it would block for ever); the evaluation reader keeps the 4 good rows and counts 2
    skipped with that reason."""
    source = pipeline.make_source(str(rows_with_a_fifo), "eval", DATA_CFG, 16, "config.data.eval")
    with no_hang(20):
        with pytest.raises(BrokenRecord, match="fifo.png: not a regular file"):
            source[2]
        with pytest.raises(BrokenRecord, match="folder.png: not a regular file"):
            source[3]
        result = pipeline.eval_records(source)
    assert [r["caption"] for r in result.records] == [f"caption {i}" for i in range(4)]
    assert result.skipped == 2
    assert sum("not a regular file" in r for r in result.reasons) == 2


def test_the_training_stream_counts_the_fifo_row_in_its_skip_counts(rows_with_a_fifo):
    """The training stream (3 threads reading) over the same 6 rows, batches of 4: the first
    two batches (8 good rows, two epochs) hold only good rows, and their `skipped` counts add
    up to 4, the FIFO and the folder of both epochs (with seed 0 the second epoch's two come
    before its last good row), without blocking."""
    source = pipeline.make_source(str(rows_with_a_fifo), "train", DATA_CFG, 16,
                                  "config.data.train")
    collate = pipeline.Collate(synthetic.WordTokenizer(8), (0.5,) * 3, (0.5,) * 3)
    stream = iter(pipeline.train_dataset(source, collate, 4, seed=0, threads=3))
    with no_hang(60):
        batches = [next(stream) for _ in range(2)]   # 8 good records: two epochs' worth
    assert sum(int(b["skipped"].sum()) for b in batches) == 4


def test_a_pairs_file_that_is_a_fifo_is_refused_at_open(tmp_path):
    os.mkfifo(tmp_path / "pairs.jsonl")
    with no_hang(20), pytest.raises(ValueError, match="neither a regular file nor a directory"):
        sources.open_source(str(tmp_path / "pairs.jsonl"), "config.data.train")


# ---------------------------------------------------------------------------------------------
# Broken tar shards


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, first, count):
    with tarfile.open(path, "w") as tar:
        for key in range(first, first + count):
            add(tar, f"{key:03d}.jpg", jpeg(key))
            add(tar, f"{key:03d}.txt", f"caption {key}".encode())
    return path.read_bytes()


def data_offset(path, member):
    with tarfile.open(path) as tar:
        return tar.getmember(member).offset_data


def readable_captions(source):
    captions = []
    for i in range(len(source)):
        try:
            captions.append(source[i]["caption"])
        except BrokenRecord:
            pass
    return sorted(captions)


def test_broken_shards_keep_their_good_samples_and_are_counted(tmp_path):
    """Five shards of 4 samples: one intact; one cut 100 bytes into its third sample's image
    (tarfile reports an error); one cut inside the header after its second sample (tarfile
    would stop quietly, as at a proper end); one gzip-compressed; one a FIFO named .tar.
    Asserts: the samples before each cut still read (4 + 2 + 2); `broken_shards` names the 4
    broken shards with their reasons; opening did not block."""
    import gzip
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "a-intact.tar", 0, 4)
    data = write_shard(root / "b-cut-in-data.tar", 10, 4)
    cut = data_offset(root / "b-cut-in-data.tar", "012.jpg") + 100
    (root / "b-cut-in-data.tar").write_bytes(data[:cut])
    data = write_shard(root / "c-cut-in-header.tar", 20, 4)
    header = data_offset(root / "c-cut-in-header.tar", "022.jpg") - tarfile.BLOCKSIZE
    (root / "c-cut-in-header.tar").write_bytes(data[:header + 200])
    (root / "d-gzip.tar").write_bytes(gzip.compress(write_shard(root / "d-gzip.tar", 30, 4)))
    os.mkfifo(root / "e-fifo.tar")

    with no_hang(20):
        source = sources.open_source(str(root), "config.data.train")
    assert readable_captions(source) == sorted(
        f"caption {k}" for k in (0, 1, 2, 3, 10, 11, 20, 21))
    reasons = {os.path.basename(entry.split(": ", 1)[0]): entry.split(": ", 1)[1]
               for entry in source.broken_shards}
    assert sorted(reasons) == ["b-cut-in-data.tar", "c-cut-in-header.tar", "d-gzip.tar",
                               "e-fifo.tar"]
    # b: 010, 011 and the cut 012 (its image started) were indexed before the error
    assert reasons["b-cut-in-data.tar"].startswith("unreadable after 3 samples")
    assert reasons["c-cut-in-header.tar"].startswith("damaged or cut short after 2 samples")
    assert "gzip-compressed" in reasons["d-gzip.tar"]
    assert "not a regular file" in reasons["e-fifo.tar"]
    assert all(entry.startswith(str(root)) for entry in source.broken_shards)


def test_intact_shards_report_nothing_broken(tmp_path):
    """The positive control: intact shards, one with and one without tar's closing zero
    blocks (some writers leave them out), have an empty `broken_shards`; every sample reads."""
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "a.tar", 0, 3)
    data = write_shard(root / "b.tar", 3, 3)
    end = data_offset(root / "b.tar", "005.txt") + tarfile.BLOCKSIZE
    assert not any(data[end:])   # what is dropped is the end-of-archive marker only
    (root / "b.tar").write_bytes(data[:end])
    source = sources.open_source(str(root))
    assert source.broken_shards == []
    assert readable_captions(source) == [f"caption {k}" for k in range(6)]


# ---------------------------------------------------------------------------------------------
# A dataset smaller than one batch


def test_a_dataset_smaller_than_a_batch_warns_that_rows_repeat(tmp_path, caplog):
    """3 records, global batch 8: a warning naming the source, both numbers and the
    repetition; the batch does hold repeated images. 8 records, batch 8: no warning."""
    collate = pipeline.Collate(synthetic.WordTokenizer(8), (0.5,) * 3, (0.5,) * 3)
    small = synthetic.SyntheticImageText("train", num_examples=3, image_size=16)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(pipeline.train_dataset(small, collate, 8, seed=0)))
    assert "3 records, fewer than one batch of 8: records repeat" in caplog.text
    assert len(np.unique(batch["pixel_values"].reshape(8, -1), axis=0)) <= 3

    caplog.clear()
    enough = synthetic.SyntheticImageText("train", num_examples=8, image_size=16)
    with caplog.at_level(logging.WARNING):
        next(iter(pipeline.train_dataset(enough, collate, 8, seed=0)))
    assert "fewer than one batch" not in caplog.text
