"""Images per second of the training input pipeline at 224 px, next to an equivalent tf.data
pipeline, in one run on the same files.

Both read JPEG files listed in a pairs.jsonl, decode, random-resized-crop (scale 0.2–1, ratio
3/4–4/3) to 224, flip, normalise, tokenise the caption and batch. Ours additionally runs LiLT's
geometric RandAugment(2, 7) in one row; the other row turns it off so the two do the same work.

    python -m benchmarks.data_pipeline [--images=512] [--batches=24] [--threads=2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BATCH = 64
SIZE = 224


def write_dataset(directory: Path, count: int) -> Path:
    """`count` 640×480 JPEGs of smooth random colour fields, and their pairs.jsonl."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(
            directory / f"{i}.jpg", quality=90)
        rows.append({"image": f"{i}.jpg", "caption": f"a photo number {i} of a thing"})
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def ours(pairs: Path, batches: int, threads: int, randaugment: bool, workers: int) -> float:
    import ml_collections

    from valign_jax.data import pipeline, synthetic
    data = ml_collections.ConfigDict(dict(
        augment={"randaugment_ops": 2 if randaugment else 0}, num_train=0, num_eval=0, seed=0))
    source = pipeline.make_source(str(pairs), "train", data, SIZE, "benchmark")
    collate = pipeline.Collate(synthetic.WordTokenizer(16), (0.5,) * 3, (0.5,) * 3)
    stream = iter(pipeline.train_dataset(source, collate, BATCH, seed=0, threads=threads,
                                         num_workers=workers))
    next(stream)  # start-up (threads, worker processes) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        assert batch["pixel_values"].shape == (BATCH, SIZE, SIZE, 3)
    return batches * BATCH / (time.perf_counter() - start)


def tf_data(pairs: Path, batches: int, threads: int) -> float:
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    files = [str(pairs.parent / r["image"]) for r in rows]
    from valign_jax.data import synthetic
    tokens = synthetic.WordTokenizer(16)([r["caption"] for r in rows])["input_ids"]

    def load(path, ids, seed):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([1, 0, 4]), seed=seed, area_range=(0.2, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True)
        image = tf.image.resize(tf.slice(image, begin, size), (SIZE, SIZE), "bicubic")
        image = tf.image.stateless_random_flip_left_right(image, seed)
        return (image / 255.0 - 0.5) / 0.5, ids

    seeds = tf.data.Dataset.random(seed=0).batch(2)
    ds = tf.data.Dataset.from_tensor_slices((files, tokens)).shuffle(len(files), seed=0).repeat()
    ds = tf.data.Dataset.zip((ds, seeds)).map(lambda x, s: load(x[0], x[1], s),
                                              num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH, drop_remainder=True).prefetch(2)
    stream = iter(ds.as_numpy_iterator())
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(stream)
        assert images.shape == (BATCH, SIZE, SIZE, 3)
    return batches * BATCH / (time.perf_counter() - start)


def measure(images: int, batches: int, threads: int) -> dict:
    """`data_pipeline_vs_tf_data_images_per_s_ratio` for benchmarks.run: ours (crop, flip,
    threads) over tf.data doing the same work on the same files."""
    from benchmarks import common
    try:
        import grain  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as err:
        return {"data_pipeline_vs_tf_data_images_per_s_ratio": common.skipped(
            f"the data stack is not installed ({err})")}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_dataset(Path(tmp), images)
        reference = tf_data(pairs, batches, threads)
        rate = ours(pairs, batches, threads, False, 0)
    return {"data_pipeline_vs_tf_data_images_per_s_ratio": common.figure(
        rate / reference, sizes={"images": images, "batches": batches, "batch": BATCH,
                                 "size": SIZE, "threads": threads},
        images_per_s={"valign_jax grain (crop, flip)": rate, "tf.data (crop, flip)": reference})}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_dataset(Path(tmp), args.images)
        results = {
            "tf.data (crop, flip)": tf_data(pairs, args.batches, args.threads),
            "valign_jax grain, threads (crop, flip)": ours(pairs, args.batches, args.threads,
                                                           False, 0),
            "valign_jax grain, threads (crop, flip, RandAugment)": ours(
                pairs, args.batches, args.threads, True, 0),
            f"valign_jax grain, {args.threads} worker processes (crop, flip, RandAugment)": ours(
                pairs, args.batches, args.threads, True, args.threads),
        }
    reference = results["tf.data (crop, flip)"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; batch {BATCH}, {SIZE} px")
    print("| pipeline | images/s | vs tf.data |\n| --- | --- | --- |")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} | {rate / reference:.2f} |")


if __name__ == "__main__":
    main()
