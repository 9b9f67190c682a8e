"""Images per second of the input pipeline at 224 px next to tf.data doing the same work, in one
run on the same files and the same number of threads.

The files: JPEGs (quality 90) of colour fields with a 1/f amplitude spectrum, the spectrum of
natural photographs, which compress like them (~4 bits per pixel, as COCO's and ImageNet's
JPEGs do; flat or smooth fields take ~1 bit and make decoding look cheap). Half are 640×480,
half 1600×1200 (COCO's originals are that large), named in turn by the 16,384 rows of a
pairs.jsonl (a real dataset's length: see ROWS).

Training (batches of 64 from pipeline.train_dataset vs a tf.data map + batch):
  tf.data: read, decode_jpeg, stateless_sample_distorted_bounding_box (area 0.2–1, ratio
      3/4–4/3), crop, bicubic resize to 224 with antialiasing (as PIL's bicubic resize does:
      the same work; one more row shows tf.image's default, which skips it and aliases), random
      flip, normalise; the map runs on a private pool of `threads` threads.
  ours: the same through grain with `threads` threads; normalised float32 on the host (what the
      step receives today), or uint8 (normalised on the device: pixels.normalize_on_device);
      with LiLT's RandAugment(2, 7); with 1 and 2 worker processes.
Evaluation (every image once): pipeline.eval_records (EvalTransform: shorter side to 224,
centre crop) vs tf.data decode_jpeg, centre square, bicubic resize, uint8.
Each row runs twice, the rows taking turns, and keeps its faster run: load from other processes
on a shared machine then falls on every row alike.

    python -m benchmarks.data_pipeline [--images=512] [--batches=24] [--threads=2] [--split]

--split adds the time per image of each stage (read, decode, crop, resize, flip, augment,
collate; one thread) and the mean absolute pixel difference of a reduced-scale decode.
"""

from __future__ import annotations

import argparse
import io
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
SHAPES = ((640, 480), (1600, 1200))   # (width, height), alternating
MEAN = STD = (0.5, 0.5, 0.5)
# Rows of the pairs file (naming the images in turn): grain's index shuffle costs 2.7 ms per
# record over a 16-row source, 0.37 ms over 128 rows and 5 µs over 16k and more, with the GIL
# held; a dataset of a few hundred rows would measure grain's shuffle, not the pipeline.
ROWS = 16384


# ---------------------------------------------------------------------------------------------
# The files


def _one_over_f_field(rng: np.random.Generator, side: int = 2048) -> np.ndarray:
    """(side, side, 3) float32, zero mean and unit variance per channel, amplitude ∝ 1/f^1.1;
    the channels share most of their phases, as the colours of a photograph do."""
    fy, fx = np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    amplitude = (frequency ** -1.1).astype(np.float32)
    shape = (side, side // 2 + 1)

    def noise():
        return rng.standard_normal(shape, np.float32) + 1j * rng.standard_normal(shape, np.float32)

    shared, channels = noise(), []
    for _ in range(3):
        x = np.fft.irfft2((0.8 * shared + 0.6 * noise()) * amplitude, s=(side, side))
        channels.append(((x - x.mean()) / x.std()).astype(np.float32))
    return np.stack(channels, -1)


def photo_like_jpegs(count: int, seed: int = 0):
    """`count` (width, height, JPEG bytes): crops of one 1/f field with their own colour gains
    and offsets, sizes alternating through SHAPES."""
    rng = np.random.default_rng(seed)
    field = _one_over_f_field(rng)
    for i in range(count):
        width, height = SHAPES[i % len(SHAPES)]
        top, left = rng.integers(0, len(field) - height), rng.integers(0, len(field) - width)
        gain, mid = rng.uniform(35, 60, 3), rng.uniform(90, 170, 3)
        pixels = field[top:top + height, left:left + width] * gain.astype(np.float32) + mid
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                       quality=90)
        yield width, height, buffer.getvalue()


def write_dataset(directory: Path, count: int, rows: int = ROWS) -> Path:
    """`count` photo-like JPEGs and a pairs.jsonl of `rows` rows naming them in turn."""
    for i, (_, _, data) in enumerate(photo_like_jpegs(count)):
        (directory / f"{i}.jpg").write_bytes(data)
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"image": f"{i % count}.jpg",
                                          "caption": f"a photo number {i} of a thing"})
                              for i in range(max(rows, count))))
    return path


# ---------------------------------------------------------------------------------------------
# Timing: wall clock and CPU time


class Clock:
    """Wall seconds and CPU seconds (this process's threads and its worker processes) between
    start() and stop(): images per CPU-second is what a pipeline gets out of one core, and on
    a machine shared with other jobs it moves far less than images per second do."""

    def __init__(self):
        try:
            import psutil
            self._process = psutil.Process()
        except ImportError:  # then this process's own CPU time only
            self._process = None

    def _cpu(self) -> dict:
        if self._process is None:
            t = os.times()
            return {os.getpid(): t.user + t.system}
        out = {}
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except Exception:  # a child that ended meanwhile
                pass
        return out

    def start(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    def stop(self, images: int) -> dict:
        wall, cpu = time.perf_counter() - self.wall, self._cpu()
        used = sum(t - self.cpu.get(pid, 0.0) for pid, t in cpu.items())
        return {"images": images, "images_per_s": images / wall,
                "images_per_cpu_s": images / max(used, 1e-9)}


# ---------------------------------------------------------------------------------------------
# Ours


def ours(pairs: Path, batches: int, threads: int, randaugment: bool = False, workers: int = 0,
         on_device: bool = False) -> dict:
    """Clock.stop's rates of pipeline.train_dataset over `batches` batches after its first."""
    import ml_collections

    from valign_jax.data import pipeline, synthetic
    data = ml_collections.ConfigDict(dict(
        augment={"randaugment_ops": 2 if randaugment else 0}, num_train=0, num_eval=0, seed=0))
    source = pipeline.make_source(str(pairs), "train", data, SIZE, "benchmark")
    collate = pipeline.Collate(synthetic.WordTokenizer(16), MEAN, STD,
                               normalize_on_host=not on_device)
    stream = iter(pipeline.train_dataset(source, collate, BATCH, seed=0, threads=threads,
                                         num_workers=workers))
    try:
        next(stream)  # start-up (threads, worker processes) is not throughput
        clock = Clock()
        clock.start()
        for _ in range(batches):
            batch = next(stream)
            assert batch["pixel_values"].shape == (BATCH, SIZE, SIZE, 3)
        return clock.stop(batches * BATCH)
    finally:
        if hasattr(stream, "close"):
            stream.close()


def ours_eval(pairs: Path, threads: int) -> dict:
    """Clock.stop's rates of pipeline.eval_records over every row of `pairs`."""
    import ml_collections

    from valign_jax.data import pipeline
    data = ml_collections.ConfigDict(dict(num_train=0, num_eval=0, seed=0))
    source = pipeline.make_source(str(pairs), "eval", data, SIZE, "benchmark")
    clock = Clock()
    clock.start()
    records = pipeline.eval_records(source, threads=threads).records
    assert records[0]["image"].shape == (SIZE, SIZE, 3)
    return clock.stop(len(records))


# ---------------------------------------------------------------------------------------------
# tf.data


def _tf_files(pairs: Path, threads: int):
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    return [str(pairs.parent / r["image"]) for r in rows], rows, options


def tf_data(pairs: Path, batches: int, threads: int, antialias: bool = True) -> dict:
    """Clock.stop's rates of the tf.data training reference over `batches` after its first."""
    import tensorflow as tf

    from valign_jax.data import synthetic
    files, rows, options = _tf_files(pairs, threads)
    tokens = synthetic.WordTokenizer(16)([r["caption"] for r in rows])["input_ids"]

    def load(path, ids, seed):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([1, 0, 4]), seed=seed, area_range=(0.2, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True)
        image = tf.image.resize(tf.slice(image, begin, size), (SIZE, SIZE), "bicubic",
                                antialias=antialias)
        image = tf.image.stateless_random_flip_left_right(image, seed)
        return (image / 255.0 - MEAN[0]) / STD[0], ids

    seeds = tf.data.Dataset.random(seed=0).batch(2)
    ds = tf.data.Dataset.from_tensor_slices((files, tokens)).shuffle(len(files), seed=0).repeat()
    ds = tf.data.Dataset.zip((ds, seeds)).map(lambda x, s: load(x[0], x[1], s),
                                              num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH, drop_remainder=True).prefetch(2).with_options(options)
    stream = iter(ds.as_numpy_iterator())
    next(stream)
    clock = Clock()
    clock.start()
    for _ in range(batches):
        images, _ = next(stream)
        assert images.shape == (BATCH, SIZE, SIZE, 3)
    return clock.stop(batches * BATCH)


def tf_eval(pairs: Path, threads: int) -> dict:
    """Clock.stop's rates of tf.data's evaluation preprocessing over every row of `pairs` but
    the first batch's (its start-up: tracing the map function)."""
    import tensorflow as tf
    files, _, options = _tf_files(pairs, threads)

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        side = tf.minimum(height, width)
        image = tf.slice(image, [(height - side) // 2, (width - side) // 2, 0], [side, side, 3])
        image = tf.image.resize(image, (SIZE, SIZE), "bicubic", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH).prefetch(2).with_options(options)
    stream = iter(ds.as_numpy_iterator())
    next(stream)
    clock, count = Clock(), 0
    clock.start()
    for images in stream:
        count += len(images)
    return clock.stop(count)


# ---------------------------------------------------------------------------------------------
# All rows, in turns


def rates(pairs: Path, eval_pairs: Path, batches: int, threads: int, rounds: int = 2) -> dict:
    """Images per second and per CPU-second of every row, each the best of `rounds` runs taken
    in turns."""
    rows = {
        "tf.data (crop, flip)": lambda: tf_data(pairs, batches, threads),
        "tf.data (crop, flip), resize without antialiasing": lambda: tf_data(
            pairs, batches, threads, antialias=False),
        "ours (crop, flip), float32": lambda: ours(pairs, batches, threads),
        "ours (crop, flip), uint8": lambda: ours(pairs, batches, threads, on_device=True),
        "ours (crop, flip, RandAugment), float32": lambda: ours(pairs, batches, threads, True),
        "ours (crop, flip, RandAugment), uint8": lambda: ours(pairs, batches, threads, True,
                                                               on_device=True),
        "ours (crop, flip, RandAugment), uint8, 1 worker process": lambda: ours(
            pairs, batches, threads, True, workers=1, on_device=True),
        "ours (crop, flip, RandAugment), uint8, 2 worker processes": lambda: ours(
            pairs, batches, threads, True, workers=2, on_device=True),
        "tf.data eval (centre crop, resize)": lambda: tf_eval(eval_pairs, threads),
        "ours eval (centre crop, resize)": lambda: ours_eval(eval_pairs, threads),
    }
    best = {name: {"images_per_s": 0.0, "images_per_cpu_s": 0.0} for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            result = run()
            for key, value in best[name].items():
                best[name][key] = max(value, result[key])
    return best


def eval_listing(pairs: Path, count: int) -> Path:
    """A pairs file of the first `count` rows of `pairs`."""
    path = pairs.with_name("eval_pairs.jsonl")
    path.write_text("\n".join(pairs.read_text().splitlines()[:count]))
    return path


def measure(images: int, batches: int, threads: int, rounds: int = 2) -> dict:
    """The data group's figures for benchmarks.run (all measured in this one run)."""
    from benchmarks import common
    names = ("data_pipeline_vs_tf_data_images_per_s_ratio",
             "data_pipeline_randaugment_vs_tf_data_images_per_s_ratio",
             "eval_transform_vs_tf_data_images_per_s_ratio",
             "data_pipeline_1_worker_images_per_s", "data_pipeline_2_workers_images_per_s")
    try:
        import grain  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as err:
        return {name: common.skipped(f"the data stack is not installed ({err})") for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_dataset(Path(tmp), images)
        r = rates(pairs, eval_listing(pairs, batches * BATCH), batches, threads, rounds)
    sizes = {"images": images, "rows": ROWS, "shapes": [list(s) for s in SHAPES],
             "batches": batches, "batch": BATCH, "size": SIZE, "threads": threads,
             "rounds": rounds}

    def ratio(ours_row, reference_row, goal, **details):
        rate = {k: r[ours_row][k] / r[reference_row][k] for k in r[ours_row]}
        return common.figure(rate["images_per_s"], goal, sizes=sizes, rows=[ours_row,
                             reference_row], per_cpu_s_ratio=rate["images_per_cpu_s"], **details)

    # The training rows compared are the uint8 ones: the batch the step normalises on the device
    # (pixels.normalize_on_device); the float32 rows, host-normalised, are in `rates` too.
    workers = "ours (crop, flip, RandAugment), uint8, {}"
    return {
        names[0]: ratio("ours (crop, flip), uint8", "tf.data (crop, flip)", ">= 1.0", rates=r),
        names[1]: ratio("ours (crop, flip, RandAugment), uint8", "tf.data (crop, flip)",
                        ">= 0.8"),
        names[2]: ratio("ours eval (centre crop, resize)", "tf.data eval (centre crop, resize)",
                        ">= 1.0"),
        names[3]: common.figure(r[workers.format("1 worker process")]["images_per_s"],
                                sizes=sizes, **r[workers.format("1 worker process")]),
        names[4]: common.figure(r[workers.format("2 worker processes")]["images_per_s"],
                                sizes=sizes, **r[workers.format("2 worker processes")]),
    }


# ---------------------------------------------------------------------------------------------
# Where the time goes


def stage_split(pairs: Path, limit: int = 64) -> dict:
    """Milliseconds per image of each stage of the training transform (RandAugment included)
    and of collating, one thread, over the first `limit` images of `pairs`: for each image
    size, and over all."""
    from valign_jax.data import pipeline, synthetic, transforms
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:limit]
    stages = ("read", "decode", "crop", "resize", "flip", "augment")
    times = {}   # "WxH" -> stage -> [seconds per image]

    def timed(into, stage, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        into[stage] = into.get(stage, 0.0) + time.perf_counter() - start
        return out

    records = []
    for i, row in enumerate(rows):
        rng, spent = np.random.default_rng(i), {}
        data = timed(spent, "read", (pairs.parent / row["image"]).read_bytes)
        image = timed(spent, "decode", transforms.open_image, data)
        shape = "x".join(map(str, image.size))
        box = timed(spent, "crop", lambda: transforms.random_resized_crop_box(
            *transforms.upright_size(image), rng))
        image, box = timed(spent, "decode", transforms.decode_box, image, box, SIZE)
        image = timed(spent, "resize", image.resize, (SIZE, SIZE), transforms.RESAMPLE, box)
        image = timed(spent, "flip", image.transpose, Image.Transpose.FLIP_LEFT_RIGHT)
        image = timed(spent, "augment", transforms.rand_augment, image, rng)
        records.append({"image": np.asarray(image), "caption": row["caption"]})
        for stage in stages:
            times.setdefault(shape, {}).setdefault(stage, []).append(spent[stage])
    collated = {}
    tokenizer = synthetic.WordTokenizer(16)
    for on_host, stage in ((True, "collate float32"), (False, "collate uint8")):
        collate = pipeline.Collate(tokenizer, MEAN, STD, normalize_on_host=on_host)
        start = time.perf_counter()
        collate(records)
        collated[stage] = (time.perf_counter() - start) / len(records)
    out = {}
    for shape, by_stage in [*times.items(), ("all", None)]:
        by_stage = by_stage or {s: sum((times[k][s] for k in times), []) for s in stages}
        out[shape] = {s: 1e3 * float(np.mean(v)) for s, v in by_stage.items()}
        out[shape].update({s: 1e3 * v for s, v in collated.items()})
    return out


def reduced_decode_error(count: int = 32) -> dict:
    """Mean absolute difference (of 255) between a reduced-scale and a full decode of the same
    random crop box, resized to SIZE, by reduction factor, over `count` of the benchmark's
    images and 8 boxes each."""
    from valign_jax.data import transforms
    errors: dict[int, list] = {}
    for i, (width, height, data) in enumerate(photo_like_jpegs(count, seed=1)):
        rng = np.random.default_rng(i)
        for _ in range(8):
            box = transforms.random_resized_crop_box(width, height, rng)
            factor = transforms.reduction_factor(box, SIZE)
            out = []
            for reduced in (True, False):
                image, mapped = transforms.decode_box(transforms.open_image(data), box, SIZE,
                                                      reduced)
                out.append(np.asarray(image.resize((SIZE, SIZE), transforms.RESAMPLE,
                                                   mapped), np.float32))
            errors.setdefault(factor, []).append(float(np.abs(out[0] - out[1]).mean()))
    return {f"factor {f}": {"crops": len(e), "mean": float(np.mean(e)), "max": float(np.max(e))}
            for f, e in sorted(errors.items())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--split", action="store_true", help="stage times and pixel error too")
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_dataset(Path(tmp), args.images)
        results = rates(pairs, eval_listing(pairs, args.batches * BATCH), args.batches,
                        args.threads)
        split = stage_split(pairs) if args.split else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}; "
          f"batch {BATCH}, {SIZE} px, {args.threads} threads, {args.images} images "
          f"({' and '.join(f'{w}x{h}' for w, h in SHAPES)})")
    train_reference = results["tf.data (crop, flip)"]
    eval_reference = results["tf.data eval (centre crop, resize)"]
    print("| pipeline | images/s | vs tf.data | images per CPU-second | vs tf.data |")
    print("| --- | --- | --- | --- | --- |")
    for name, rate in results.items():
        reference = eval_reference if "eval" in name else train_reference
        wall, cpu = rate["images_per_s"], rate["images_per_cpu_s"]
        print(f"| {name} | {wall:.0f} | {wall / reference['images_per_s']:.2f} | {cpu:.0f} | "
              f"{cpu / reference['images_per_cpu_s']:.2f} |")
    if split:
        print("ms per image (one thread):")
        for shape, stages in split.items():
            print(f"  {shape}: {json.dumps({k: round(v, 3) for k, v in stages.items()})}")
        error = reduced_decode_error()
        print("reduced-scale decode vs full decode, |difference| of 255:", json.dumps(error))
    if args.out:
        from benchmarks import common
        Path(args.out).write_text(json.dumps({
            "machine": {**common.machine(), "load_average": os.getloadavg()},
            "sizes": {"images": args.images, "rows": ROWS, "shapes": SHAPES,
                      "batches": args.batches, "batch": BATCH, "size": SIZE,
                      "threads": args.threads, "rounds": 2},
            "rates": results, "ms_per_image": split,
            "reduced_decode_error": error if split else None}, indent=1))


if __name__ == "__main__":
    main()
