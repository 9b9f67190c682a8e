"""Input pipelines: a source of image–caption records -> grain -> fixed-shape NumPy batches.

A record is a dict with `image` (uint8 H×W×3), `caption`, optionally `captions` (several, one is
sampled per image per epoch), `long_caption` (SAIL's second positive) and `label` (zero-shot
class). Batches hold `pixel_values` (float32 NHWC, normalised), `input_ids` and `attention_mask`
(int32, fixed length), and `long_input_ids` / `long_attention_mask` for multi-positive recipes.

Training order is a seeded shuffle, reshuffled every epoch; each process reads every
process_count-th record of it, so the processes' local batches together form the global batch.
Because the order is a pure function of (seed, position), the iterator's state is one integer,
and restoring it continues the exact stream.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import jax
import numpy as np

from valign_jax.data import synthetic

SCHEMES = ("synthetic:",)


def make_source(spec: str, split: str, data_cfg, image_size: int, key: str):
    """The record source a config string names; `key` is the config key, for errors."""
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        if name != "shapes":
            raise ValueError(f"{key}={spec!r}: unknown synthetic dataset {name!r}; known: "
                             f"['shapes']")
        count = data_cfg.num_train if split == "train" else data_cfg.num_eval
        return synthetic.SyntheticImageText(split=split, num_examples=count,
                                            image_size=image_size, seed=data_cfg.seed)
    raise ValueError(f"{key}={spec!r}: unknown data source; expected one of {list(SCHEMES)} "
                     f"followed by a name, e.g. 'synthetic:shapes'")


def make_tokenizer(text_cfg, lower_case: bool = False):
    """The text tower's tokenizer; towers without a checkpoint use the synthetic vocabulary."""
    if text_cfg.checkpoint:
        from valign_jax.data.tokenizer import Tokenizer
        return Tokenizer(text_cfg.checkpoint, text_cfg.max_length, lower_case)
    return synthetic.WordTokenizer(text_cfg.max_length)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32, per-channel (x/255 - mean) / std (0.5, 0.5 gives [-1, 1])."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclasses.dataclass
class Collate:
    """A list of records -> one batch of arrays."""
    tokenizer: object
    mean: Sequence[float]
    std: Sequence[float]
    multi_positive: bool = False

    def __call__(self, records) -> dict[str, np.ndarray]:
        if isinstance(records, dict):  # grain's batch() stacks dicts of arrays/strings
            records = [dict(zip(records, values)) for values in zip(*records.values())]
        batch = {"pixel_values": normalize(np.stack([r["image"] for r in records]),
                                           self.mean, self.std)}
        batch.update(self.tokenizer([str(r["caption"]) for r in records]))
        if self.multi_positive:
            long = self.tokenizer([str(r["long_caption"]) for r in records])
            batch.update({f"long_{k}": v for k, v in long.items()})
        return batch


def _sample_caption(record, rng: np.random.Generator):
    """One caption per image per epoch, from the record's several (when it has them)."""
    captions = record.get("captions")
    if captions:
        record = {**record, "caption": captions[rng.integers(len(captions))]}
    return record


def _records_to_list(records):
    return list(records)


def train_dataset(source, collate: Collate, global_batch_size: int, seed: int,
                  threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """The endless, shuffled training stream of this process's local batches."""
    count, index = jax.process_count(), jax.process_index()
    local_batch = global_batch_size // count
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[index::count].random_map(_sample_caption, seed=seed)
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_records_to_list).map(collate)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=prefetch))


def iterator_handler():
    """The orbax handler that saves and restores a grain iterator's position."""
    return grain.checkpoint.CheckpointHandler()


def iterator_save_args(iterator):
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator):
    return grain.checkpoint.CheckpointRestore(iterator)
