"""Input pipelines: a source of image–caption records -> grain -> fixed-shape NumPy batches.

A record is a dict with `image` (uint8 H×W×3, or encoded bytes that the source's transform
decodes), `caption`, optionally `captions` (several: one is sampled per image per epoch),
`long_caption` (SAIL's second positive) and `label` (zero-shot class); see sources.py for the
config strings that name sources. Batches hold `pixel_values` (float32 NHWC, normalised; or
uint8 with Collate(normalize_on_host=False), for pixels.normalize_on_device in the step),
`input_ids` and `attention_mask` (int32, fixed length), `long_input_ids` / `long_attention_mask`
for multi-positive recipes, `labels` (int32, each record's `label`) for objectives that classify,
and `skipped` (below).

The training stream, per process:

    range(len(source)) -> seeded shuffle, reshuffled every epoch -> random_map(prepare): read,
    pick a caption, decode + augment, all randomness from grain's per-record Generator (a pure
    function of seed and global position, so any number of processes sees the same records)
    -> every process_count-th (the processes' local batches together form the global batch)
    -> threads read ahead -> fill batches -> collate
    -> [num_workers > 0: grain worker processes, each doing all of the above on its slice]

BROKEN RECORDS. A record that cannot be used (missing/empty/truncated/non-image file, empty or
non-string caption: `transforms.BrokenRecord`) becomes a marker in `prepare`, never an
exception. The batcher drops markers while it fills a batch and writes how many it dropped into
the batch itself: `batch["skipped"]` is int32 of shape (local batch,), row i = the broken records
dropped just before row i was taken, so `batch["skipped"].sum()` is what filling that batch
skipped. The count thus travels inside the data, through threads and worker processes alike,
and through `sharding.global_batch` too (the global array's sum counts every process). The loop
adds the sums into `data/skipped_examples`. More than `max_broken_in_a_row` broken records in a
row (default 1000) is an error naming the source: a source that has no decodable record fails
instead of spinning.

CHECKPOINTS. A batch ends right after its last good record, and every stage's state is its
parent's position, so the iterator state saved between batches (grain's orbax handler) restores
the exact stream, broken records included. With worker processes the state holds each
worker's position; restore with the same num_workers (the stream depends on it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import grain
import numpy as np

from valign_jax.data import pixels, sources, synthetic, transforms
from valign_jax.data.transforms import BrokenRecord, normalization  # noqa: F401  (re-exported)

BROKEN = "_broken"   # the key of a broken record's marker: {BROKEN: reason}

log = logging.getLogger(__name__)


def split_spec(data_cfg, split: str) -> tuple[str, int]:
    """(config string, synthetic example count) of the "train" or "eval" split of a config's
    data: config.data.train / num_train or config.data.eval / num_eval."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    return ((getattr(data_cfg, "train", ""), data_cfg.num_train) if split == "train"
            else (getattr(data_cfg, "eval", ""), data_cfg.num_eval))


def make_source(spec: str, split: str, data_cfg, image_size: int, key: str):
    """The record source a config string names; `key` is the config key, for errors.

    `split` chooses the synthetic split (other forms name their own split). Non-synthetic sources
    come with `train_transform` (augmentation per `data_cfg.augment`, if the config has it) and
    `eval_transform` (resize + centre crop), both to `image_size`."""
    if spec.startswith("synthetic:"):
        from valign_jax.data.relations import SyntheticRelations
        datasets = {"shapes": synthetic.SyntheticImageText, "relations": SyntheticRelations}
        assert tuple(datasets) == sources.SYNTHETIC
        name = spec.split(":", 1)[1]
        if name not in datasets:
            raise ValueError(f"{key}={spec!r}: unknown synthetic dataset {name!r}; known: "
                             f"{sorted(datasets)}")
        count = split_spec(data_cfg, split)[1]
        return datasets[name](split=split, num_examples=count, image_size=image_size,
                              seed=data_cfg.seed)
    source = sources.open_source(spec, key)
    source.train_transform = transforms.train_transform(image_size, data_cfg.get("augment"))
    source.eval_transform = transforms.EvalTransform(image_size)
    return source


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32, per-channel (x/255 - mean) / std (0.5, 0.5 gives [-1, 1]).

    A uint8 value has 256 possible results per channel: they are computed once into a table
    and looked up, one pass over the batch instead of four float passes (0.66 against 0.82 ms
    per 224-px image on a 2-core test machine; BENCHMARKS.md). pixels.normalize_on_device
    computes the same inside the jitted step, for uint8 batches."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        x = images.astype(np.float32) / 255.0
        return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    table = pixels.normalize_table(mean, std)
    if table.shape[0] != images.shape[-1]:
        raise ValueError(f"mean {tuple(mean)} / std {tuple(std)}: need one value per channel "
                         f"of images {images.shape}")
    out = np.empty(images.shape, np.float32)
    for c in range(images.shape[-1]):
        np.take(table[c], images[..., c], out=out[..., c])
    return out


@dataclasses.dataclass
class Collate:
    """A list of records -> one batch of arrays. A record without `long_caption` uses its
    caption as the long one. labels=True: the batch also holds each record's integer `label`
    (a record without one is an error naming it).

    normalize_on_host=False leaves `pixel_values` uint8 (4x fewer bytes to the device, no float
    work on the host): the jitted step must then normalise them, with
    `pixels.normalize_on_device(batch["pixel_values"], mean, std)`."""
    tokenizer: object
    mean: Sequence[float]
    std: Sequence[float]
    multi_positive: bool = False
    normalize_on_host: bool = True
    labels: bool = False

    def __call__(self, records) -> dict[str, np.ndarray]:
        if isinstance(records, dict):  # grain's batch() stacks dicts of arrays/strings
            records = [dict(zip(records, values)) for values in zip(*records.values())]
        images = np.stack([r["image"] for r in records])
        batch = {"pixel_values": normalize(images, self.mean, self.std)
                 if self.normalize_on_host else images}
        batch.update(self.tokenizer([str(r["caption"]) for r in records]))
        if self.multi_positive:
            long = self.tokenizer([str(r.get("long_caption") or r["caption"]) for r in records])
            batch.update({f"long_{k}": v for k, v in long.items()})
        if self.labels:
            batch["labels"] = record_labels(records)
        return batch


def record_labels(records) -> np.ndarray:
    """int32 labels of `records`; a record without an integer `label` >= 0 is named."""
    labels = [r.get("label") for r in records]
    for record, label in zip(records, labels):
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) \
                or label < 0:
            shown = record.get("caption", "")
            raise ValueError(f"the objective needs a class label per example, but a record "
                             f"(caption {shown!r}) has label {label!r}: train it on data whose "
                             f"records carry an integer `label` >= 0 (synthetic:shapes does)")
    return np.asarray(labels, np.int32)


# ---------------------------------------------------------------------------------------------
# Per record: read, caption, decode + transform (runs in grain's threads / worker processes)


def _transform_for(source, transform, which: str):
    """The explicit transform, or the one make_source attached to the source ("auto")."""
    if not (isinstance(transform, str) and transform == "auto"):
        return transform
    found = getattr(source, f"{which}_transform", None)
    if found is None and isinstance(source, sources.Source):
        raise ValueError(f"{source.name}: its records hold undecoded images; open it with "
                         f"pipeline.make_source or pass transform=")
    return found


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """source index (+ grain's per-record rng) -> a model-ready record, or {BROKEN: reason}."""
    source: object
    transform: object            # (image, rng) -> uint8 array; None: images are ready
    sample_caption: bool         # training: a random caption of the several; eval: the first

    def __call__(self, index, rng: np.random.Generator | None = None) -> dict:
        index = int(index)
        try:
            record = dict(self.source[index])
        except BrokenRecord as err:
            return {BROKEN: str(err)}
        describe = getattr(self.source, "describe", None)
        where = describe(index) if describe else f"{index}"
        try:
            captions = sources.clean_captions(record.get("captions") or record.get("caption"),
                                              where)
            record["captions"] = captions
            if self.sample_caption and len(captions) > 1:
                record["caption"] = captions[rng.integers(len(captions))]
            else:
                record["caption"] = captions[0]
            if self.transform is not None:
                try:
                    record["image"] = self.transform(record["image"], rng)
                except BrokenRecord as err:
                    raise BrokenRecord(f"{where}: {err}") from None
            return record
        except BrokenRecord as err:
            return {BROKEN: str(err)}


# ---------------------------------------------------------------------------------------------
# Batches that count what they skipped


class _FillBatches(grain.IterDataset):
    """Records -> (list of `batch_size` good records, per-row skip counts)."""

    def __init__(self, parent, batch_size: int, max_broken_in_a_row: int, source_name: str):
        super().__init__(parent)
        self.batch_size, self.max_broken = batch_size, max_broken_in_a_row
        self.source_name = source_name

    def __iter__(self):
        return _FillBatchesIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"_FillBatches(batch_size={self.batch_size})"


class _FillBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent, config: _FillBatches):
        super().__init__(parent)
        self.config = config
        self.in_a_row, self.logged = 0, 0

    def __next__(self):
        rows, skipped, pending = [], [], 0
        while len(rows) < self.config.batch_size:
            record = next(self._parent)
            if BROKEN not in record:
                rows.append(record)
                skipped.append(pending)
                pending, self.in_a_row = 0, 0
                continue
            pending += 1
            self.in_a_row += 1
            if self.logged < 10:  # the first few reasons, so a user can fix the data
                self.logged += 1
                log.warning("skipping a broken record: %s", record[BROKEN])
            if self.in_a_row >= self.config.max_broken:
                raise ValueError(
                    f"{self.config.source_name}: {self.in_a_row} broken records in a row, none "
                    f"decodable (last: {record[BROKEN]}). Check the data the source names.")
        return rows, np.asarray(skipped, np.int32)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


@dataclasses.dataclass(frozen=True)
class _CollateCounting:
    collate: Collate

    def __call__(self, rows_and_skipped) -> dict[str, np.ndarray]:
        rows, skipped = rows_and_skipped
        return {**self.collate(rows), "skipped": skipped}


def train_dataset(source, collate: Collate, global_batch_size: int, seed: int,
                  threads: int = 2, prefetch: int = 4, *, transform="auto",
                  num_workers: int = 0, max_broken_in_a_row: int = 1000) -> grain.IterDataset:
    """The endless, shuffled training stream of this process's local batches.

    threads: grain threads reading and preparing records; prefetch: records they read ahead.
    num_workers: grain worker processes (mp_prefetch), each preparing and collating whole
    batches of its slice of the stream; 0 keeps everything in this process (plus one thread
    collating the next batch while the device trains). transform: "auto" takes the one
    make_source attached (none for synthetic records), else a callable (image, rng) -> uint8.
    """
    import jax  # the process layout; imported here so grain workers need not set jax up
    count, index = jax.process_count(), jax.process_index()
    local_batch = global_batch_size // count
    name = getattr(source, "name", repr(source))
    if len(source) == 0:
        raise ValueError(f"{name}: the source has no records")
    if len(source) < global_batch_size:
        log.warning("%s: %d records, fewer than one batch of %d: records repeat within every "
                    "batch (a contrastive loss then treats the copies of a pair as each other's "
                    "negatives)", name, len(source), global_batch_size)
    prepare = _Prepare(source, _transform_for(source, transform, "train"), sample_caption=True)
    ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(prepare, seed=seed)[index::count]  # per-record rng: global position
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    ds = _FillBatches(ds, local_batch, max_broken_in_a_row, name).map(_CollateCounting(collate))
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (notebooks, tests)
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=2),
                              worker_init_fn=end_with_parent)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)


def end_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
    """In a worker process: have the kernel end it when the process that started it ends, even
    by `kill -9` (which runs no cleanup), instead of living on as an orphan (Linux only)."""
    import ctypes
    import signal
    import sys
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def cached_train_dataset(cache, global_batch_size: int, seed: int,
                         threads: int = 2) -> grain.IterDataset:
    """The training stream over cached tower features (feature_cache.CachedFeatures): the same
    seeded, per-process order as train_dataset, one caption's features sampled per image per
    epoch. A cache holds no broken rows: they were skipped when it was written."""
    import jax
    from valign_jax.data import feature_cache
    count, index = jax.process_count(), jax.process_index()
    ds = grain.MapDataset.source(cache).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(feature_cache.sample_caption, seed=seed)[index::count]
    ds = ds.batch(global_batch_size // count, drop_remainder=True,
                  batch_fn=feature_cache.collate_features)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


@dataclasses.dataclass
class EvalRecords:
    """Decoded, eval-transformed records in source order; `skipped` broken ones were dropped
    (`reasons`: the first 20 of them)."""
    records: list
    skipped: int
    reasons: list


def eval_records(source, transform="auto", limit: int | None = None,
                 threads: int = 4) -> EvalRecords:
    """The held-out records for the evaluator: each with its first caption and its image
    through the source's eval transform (resize + centre crop); broken ones skipped and counted.
    `limit`: stop after this many good records. A source with none is an error naming it."""
    name = getattr(source, "name", repr(source))
    prepare = _Prepare(source, _transform_for(source, transform, "eval"), sample_caption=False)
    ds = grain.MapDataset.range(len(source)).map(prepare)
    records, reasons, skipped = [], [], 0
    for record in ds.to_iter_dataset(grain.ReadOptions(num_threads=threads)):
        if BROKEN in record:
            skipped += 1
            if len(reasons) < 20:
                reasons.append(record[BROKEN])
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{name}: no usable record among {len(source)} ({reasons[:3]})")
    if skipped:
        log.warning("%s: skipped %d broken records, e.g. %s", name, skipped, reasons[:3])
    return EvalRecords(records, skipped, reasons)


class DecodedView:
    """Random access to a source's records as eval_records makes them (decoded, eval-transformed,
    first caption), for consumers that read by index without holding every image (the feature
    cache); reading a broken record raises BrokenRecord."""

    def __init__(self, source, transform="auto"):
        self.source, self.name = source, getattr(source, "name", repr(source))
        self._prepare = _Prepare(source, _transform_for(source, transform, "eval"),
                                 sample_caption=False)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index) -> dict:
        record = self._prepare(index)
        if BROKEN in record:
            raise BrokenRecord(record[BROKEN])
        return record


def class_names(source) -> tuple[str, ...]:
    """The zero-shot class names of a source (the synthetic ones for synthetic sources)."""
    if isinstance(source, synthetic.SyntheticImageText):
        return synthetic.CLASS_NAMES
    names = getattr(source, "class_names", None)
    if not names:
        raise ValueError(f"{getattr(source, 'name', source)}: not a classification source "
                         f"(no class names); use tfds classification data or class folders")
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# Checkpointing the iterator


def iterator_handler():
    """The orbax handler that saves and restores a grain iterator's position."""
    return grain.checkpoint.CheckpointHandler()


def iterator_save_args(iterator):
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator):
    return grain.checkpoint.CheckpointRestore(iterator)
