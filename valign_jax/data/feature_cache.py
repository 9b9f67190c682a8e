"""The feature cache for frozen towers: run the towers once, train the heads from disk.

SAIL (docs/methods.md §4) freezes both towers, so their outputs never change during training; it runs
them once over the data and then trains only the alignment layers, from the stored features.

    path = cache_features(model, params, source, collate, out_dir, manifest, mesh=mesh)
    check_manifest(out_dir, manifest)                        # refuses a stale or partial cache
    image_cfg, text_cfg = feature_configs(out_dir)           # FeaturesConfig towers for a
    heads_model = DualEncoder(image_cfg, text_cfg, ...)      # DualEncoder that reuses the heads
    ds = grain.MapDataset.source(CachedFeatures(out_dir)).shuffle(seed=0).repeat(None)
    ds = ds.random_map(sample_caption, seed=0).batch(B, batch_fn=collate_features)

What is cached are the towers' POOLED outputs (`vision_model(...)["pooled"]`,
`text_model(...)["pooled"]`), i.e. the features before the projection heads, which
`DualEncoder.encode_image` / `encode_text` would apply next.

Layout of a cache directory:
    manifest.json       the caller's manifest (model ids, pooling, image size, max_length, data
                        spec, ...) plus count, shard_size, num_shards, image_dim, text_dim,
                        max_captions, has_long_caption, format_version
    shard-00000.npz     rows [0, shard_size) of the source, in index order; uncompressed, so
    shard-00001.npz     CachedFeatures memory-maps the arrays inside it:
    ...                   image (n, Di) float32, text (n, C, Dt) float32 (caption slots beyond a
                          row's num_captions are zeros), num_captions (n,) int32,
                          long_text (n, Dt) float32 when the records have `long_caption`,
                          index (n,) int64: the rows' source indices
A shard appears on disk complete or not at all (written to a temporary file, then renamed), so a
rerun after an interruption recomputes exactly the missing shards.
"""

from __future__ import annotations

import concurrent.futures
import collections
import json
import operator
import os
import struct
import sys
from contextlib import ExitStack, closing
import threading
import zipfile
from pathlib import Path

import jax
import numpy as np
from absl import logging

from valign_jax import sharding
from valign_jax.batched import FeatureEncoder, eval_batch_size, text_inputs
from valign_jax.data.transforms import BrokenRecord

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_MISSING = "<missing>"


def shard_path(cache_dir, k: int) -> Path:
    return Path(cache_dir) / f"shard-{k:05d}.npz"


# ---------------------------------------------------------------------------------------------
# Tower features (DualEncoder methods written as functions: `model.apply(..., method=fn)`)


def image_features(model, pixel_values):
    """The image tower's pooled output: the features before `visual_projection`."""
    return model.vision_model(pixel_values)["pooled"]


def text_features(model, input_ids, attention_mask=None):
    """The text tower's pooled output: the features before `text_projection`."""
    return model.text_model(input_ids, attention_mask)["pooled"]


def _place(params, mesh):
    """Parameters on the mesh by sharding's rule, and their shardings. Arrays already spread over
    several processes stay where they are."""
    target = sharding.tree_shardings(params, mesh)

    def one(x, s):
        if isinstance(x, jax.Array) and (not x.is_fully_addressable
                                         or x.sharding.is_equivalent_to(s, x.ndim)):
            return x
        return sharding.put(x, s)
    placed = jax.tree.map(one, params, target)
    return placed, jax.tree.map(lambda x: x.sharding, placed)


# ---------------------------------------------------------------------------------------------
# Writing


def _captions(record, max_captions: int) -> list[str]:
    """Up to max_captions captions of a record: its `captions`, or else its one `caption`."""
    captions = record.get("captions")
    if captions is None or len(captions) == 0:
        captions = (record["caption"],)
    return [str(c) for c in captions[:max_captions]]


def _read(source, index):
    """Record `index`, or None when it is broken (BrokenRecord): the cache keeps its row with no
    caption, and readers never see it."""
    try:
        return source[index]
    except BrokenRecord:
        return None


def _load_batch(source, indices, collate, max_captions: int, has_long: bool, pool,
                blank: dict) -> dict:
    """Records `indices` of `source` -> pixel values and tokenized captions (host NumPy); a
    broken record becomes `blank`'s image with no caption."""
    read = list(pool.map(lambda i: _read(source, i), indices))
    records = [r if r is not None else blank for r in read]
    captions = [_captions(r, max_captions) if o is not None else [] for r, o in zip(records, read)]
    batch = {"pixel_values": collate(records)["pixel_values"],
             "num_captions": np.asarray([len(c) for c in captions], np.int32),
             "captions": collate.tokenizer([c for cs in captions for c in cs] or [""]),
             "broken": sum(r is None for r in read)}
    if has_long:
        missing = [i for i, r in zip(indices, read) if r is not None and "long_caption" not in r]
        if missing:
            raise ValueError(f"records {missing[:5]} of the source have no long_caption but "
                             f"record 0 has one: a feature cache needs it on all records or none")
        batch["long"] = collate.tokenizer([str(r.get("long_caption", "")) for r in records])
    return batch


def _encode_batch(encoder: FeatureEncoder, params, batch: dict, max_captions: int) -> dict:
    """One batch of host inputs -> its rows of the shard arrays (float32 features)."""
    image = encoder.run(image_features, params, {"pixel_values": batch["pixel_values"]})
    num = batch["num_captions"]
    flat = encoder.run(text_features, params, text_inputs(batch["captions"]))[:int(num.sum())]
    text = np.zeros((len(num), max_captions, flat.shape[-1]), np.float32)
    rows = np.repeat(np.arange(len(num)), num)
    slots = np.concatenate([np.arange(n) for n in num])
    text[rows, slots] = flat
    out = {"image": image, "text": text, "num_captions": num}
    if "long" in batch:
        out["long_text"] = encoder.run(text_features, params, text_inputs(batch["long"]))
    return out


def _write_shard(path: Path, arrays: dict) -> None:
    """Atomically: the shard is either absent or complete on disk."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _jsonable(data: dict) -> dict:
    """`data` as it reads back from JSON (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(dict(data)))


def _differences(cache: dict, other: dict, keys, other_name: str) -> list[str]:
    return [f"{k}: cache has {cache.get(k, _MISSING)!r}, {other_name} {other.get(k, _MISSING)!r}"
            for k in sorted(keys) if cache.get(k, _MISSING) != other.get(k, _MISSING)]


def _prefetched(fn, items):
    """fn(item) for each item in order, the next one computed in the background meanwhile."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        pending = None
        for item in items:
            future = ex.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def cache_features(model, params, source, collate, out_dir, manifest: dict, *, mesh,
                   batch_size: int = 256, shard_size: int = 4096, max_captions: int = 5,
                   progress: bool = True, num_workers: int = 8) -> Path:
    """Runs the frozen towers of the DualEncoder `model` once over `source`; returns `out_dir`.

    `source[i]` are records (`image` uint8 HxWx3, `caption`, optional `captions`, optional
    `long_caption`), read in index order by `num_workers` threads; `collate` (a
    pipeline.Collate) normalises the images (deterministic eval preprocessing, as the features
    are reused every epoch) and its tokenizer tokenizes the captions. Each image keeps up to
    `max_captions` caption features. Batches of `batch_size` (rounded up to the data-parallel
    size) are sharded over the mesh's data axes, the last one of each shard padded.

    `manifest` describes what produced the features (model ids, checkpoints, pooling, dtype,
    image size, max_length, source spec, ...); it is written to manifest.json with the cache's
    own fields, which take these names: count, shard_size, num_shards, image_dim, text_dim,
    max_captions, has_long_caption, format_version. Rerunning with the same manifest skips the
    shards already on disk; a directory holding a different manifest is refused (ValueError).
    Every process computes (the towers run on the global mesh); only process 0 writes.
    """
    out_dir = Path(out_dir)
    n = len(source)
    if n == 0:
        raise ValueError("cache_features: the source is empty")
    batch_size = eval_batch_size(batch_size, mesh)
    params, param_sh = _place(params, mesh)
    encoder = FeatureEncoder(model, mesh, param_sh, batch_size)
    writer = jax.process_index() == 0

    # The cache's own fields; the feature widths come from tracing the towers on the first
    # record that can be read (a broken one is cached as a row without captions).
    first = next((r for r in (_read(source, i) for i in range(min(n, 1000))) if r is not None),
                 None)
    if first is None:
        raise ValueError(f"cache_features: none of the first {min(n, 1000)} records of "
                         f"{getattr(source, 'name', source)} can be read")
    pv = collate([first])["pixel_values"]
    tokens = collate.tokenizer([str(first["caption"])])
    dim = lambda fn, *args: jax.eval_shape(
        lambda p, *a: model.apply({"params": p}, *a, method=fn), params, *args).shape[-1]
    num_shards = -(-n // shard_size)
    has_long = "long_caption" in first
    full = _jsonable({**manifest, "count": n, "shard_size": shard_size, "num_shards": num_shards,
                      "image_dim": dim(image_features, pv),
                      "text_dim": dim(text_features, tokens["input_ids"],
                                      tokens["attention_mask"]),
                      "max_captions": max_captions, "has_long_caption": has_long,
                      "format_version": FORMAT_VERSION})

    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        diffs = _differences(existing, full, set(existing) | set(full), "this run has")
        if diffs:
            raise ValueError(f"{manifest_path}: the cache there was built with other settings:\n  "
                             + "\n  ".join(diffs) + "\nchoose another output directory, or "
                             "delete this one to rebuild it")
    elif writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, full)

    done = np.asarray([shard_path(out_dir, k).exists() for k in range(num_shards)])
    if jax.process_count() > 1:  # every process must run the same shards: process 0 decides
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done), bool)
    todo = [k for k in range(num_shards) if not done[k]]
    rows = lambda k: range(k * shard_size, min((k + 1) * shard_size, n))
    if len(todo) < num_shards:
        logging.info("feature cache %s: %d of %d shards already complete on disk, skipping them; "
                     "computing %d", out_dir, num_shards - len(todo), num_shards, len(todo))
    if not todo:
        return out_dir

    from tqdm.auto import tqdm
    bar = tqdm(total=n, initial=n - sum(len(rows(k)) for k in todo), unit="ex",
               desc=f"caching features to {out_dir.name}", dynamic_ncols=True,
               disable=not (progress and writer and sys.stderr.isatty()))
    batches = [(k, r[i:i + batch_size]) for k in todo for r in [rows(k)]
               for i in range(0, len(r), batch_size)]
    parts, broken = [], 0
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool, bar, ExitStack() as stack:
        load = lambda item: (item[0], item[1], _load_batch(source, item[1], collate,
                                                           max_captions, has_long, pool, first))
        for k, indices, batch in stack.enter_context(closing(_prefetched(load, batches))):
            broken += batch.pop("broken")
            parts.append(_encode_batch(encoder, params, batch, max_captions))
            bar.update(len(indices))
            if indices.stop == rows(k).stop:   # the shard's last batch
                arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
                arrays["index"] = np.arange(rows(k).start, rows(k).stop, dtype=np.int64)
                parts = []
                if writer:
                    _write_shard(shard_path(out_dir, k), arrays)
    if broken:
        logging.warning("feature cache %s: %d broken records skipped (kept as rows without a "
                        "caption, which readers never see)", out_dir, broken)
    logging.info("feature cache %s: %d examples in %d shards", out_dir, n - broken, num_shards)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(cache_dir) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no feature cache there (no manifest); build it with "
                                f"--mode=cache_features")
    return json.loads(path.read_text())


def check_manifest(cache_dir, expected: dict) -> dict:
    """The cache's manifest, after checking that it matches `expected` key by key and that every
    shard is on disk. ValueError lists each differing key; FileNotFoundError names the missing
    manifest or shards."""
    manifest = read_manifest(cache_dir)
    expected = _jsonable(expected)
    diffs = _differences(manifest, expected, expected, "config says")
    if diffs:
        raise ValueError(f"feature cache {cache_dir} was built with other settings than the "
                         f"config's:\n  " + "\n  ".join(diffs) + "\nrebuild it with "
                         f"--mode=cache_features (into a new directory)")
    missing = [shard_path(cache_dir, k).name for k in range(manifest["num_shards"])
               if not shard_path(cache_dir, k).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"feature cache {cache_dir} is incomplete: {len(missing)} of "
                                f"{manifest['num_shards']} shards missing ({shown}); rerun "
                                f"--mode=cache_features with the same config to finish it")
    return manifest


def _open_npz(path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, memory-mapped where stored uncompressed (np.load cannot
    memory-map inside a zip): each member's data starts after its zip local header (30 bytes +
    name + extra field) and its .npy header."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member)
                continue
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
                continue
            out[name] = np.memmap(path, dtype, "r", f.tell(), shape, "F" if fortran else "C")
    return out


class CachedFeatures:
    """Random access over a complete feature cache (a grain MapDataset source).

    `self[i]` = {"image_features": (Di,), "text_features": (C, Dt), "num_captions": int,
    "long_text_features": (Dt,) if cached, "index": source index}, copied out of the
    memory-mapped shards, over the rows of usable records (`rows`: their positions); at most `max_open_shards` shards are mapped at a time (each mapping
    holds a file descriptor), least recently used closed first.
    """

    def __init__(self, cache_dir, max_open_shards: int = 32):
        self.cache_dir = Path(cache_dir)
        self.manifest = check_manifest(self.cache_dir, {})
        self.max_open_shards = max_open_shards
        self.__setstate__(self.__dict__)
        # The rows of records that were broken when the cache was written have no caption:
        # they are left out, so every row a reader sees is a usable pair.
        counts = np.concatenate([self._shard(k)["num_captions"]
                                 for k in range(self.manifest["num_shards"])])
        self.rows = np.flatnonzero(counts > 0)

    def __getstate__(self):  # pickles (grain worker processes) without open mappings
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open, self._lock = collections.OrderedDict(), threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def _shard(self, k: int) -> dict:
        with self._lock:
            if k in self._open:
                self._open.move_to_end(k)
                return self._open[k]
        arrays = _open_npz(shard_path(self.cache_dir, k))
        with self._lock:
            self._open[k] = arrays
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        return arrays

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for the {n} cached examples")
        k, row = divmod(int(self.rows[i]), self.manifest["shard_size"])
        s = self._shard(k)
        record = {"image_features": np.array(s["image"][row]),
                  "text_features": np.array(s["text"][row]),
                  "num_captions": int(s["num_captions"][row]),
                  "index": int(s["index"][row])}
        if "long_text" in s:
            record["long_text_features"] = np.array(s["long_text"][row])
        return record

    def __repr__(self) -> str:
        return f"CachedFeatures({str(self.cache_dir)!r}, count={len(self)})"


def sample_caption(record: dict, rng: np.random.Generator) -> dict:
    """The record with `text_features` of one of its captions, drawn uniformly among its
    num_captions (grain's random_map: one caption per image per epoch)."""
    text = record["text_features"]
    if text.ndim == 1:  # already one caption
        return record
    return {**record, "text_features": text[int(rng.integers(record["num_captions"]))]}


def collate_features(records) -> dict[str, np.ndarray]:
    """Records -> {"image_features": (B, Di), "text_features": (B, Dt)[, "long_text_features"]}.
    Records whose captions were not sampled contribute their first caption (for evaluation)."""
    if isinstance(records, dict):  # grain's batch() stacks dicts of arrays
        records = [dict(zip(records, values)) for values in zip(*records.values())]
    first = lambda t: t if t.ndim == 1 else t[0]
    batch = {"image_features": np.stack([r["image_features"] for r in records]),
             "text_features": np.stack([first(r["text_features"]) for r in records])}
    if records and "long_text_features" in records[0]:
        batch["long_text_features"] = np.stack([r["long_text_features"] for r in records])
    return batch


def feature_configs(cache_dir):
    """(image, text) FeaturesConfig towers of the cached widths: a DualEncoder built with them
    applies only its heads, so the heads' parameters carry over from the full model."""
    from valign_jax.models import FeaturesConfig
    manifest = read_manifest(cache_dir)
    return (FeaturesConfig(dim=manifest["image_dim"], modality="image"),
            FeaturesConfig(dim=manifest["text_dim"], modality="text"))
