"""Apply a model method over many examples: padded, sharded, jitted batches.

    encoder = FeatureEncoder(model, mesh, param_shardings, batch_size=256)
    img = encoder.images(params, pixel_values)          # model.encode_image, batch by batch
    out = encoder.run(fn, params, {"pixel_values": x})  # any method (a name or a function)

Every batch is padded to `batch_size` (so each method compiles once) and split over the mesh's
batch axes with the parameters where the training run keeps them: nothing is gathered onto one
device. Evaluation, the feature cache and zero-shot prompts all go through here.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import jax
import numpy as np

from valign_jax import sharding


def progress(iterable, total: int, desc: str):
    """A progress bar on process 0 for host loops long enough to want one (and named), where a
    terminal shows it: in a log file a bar is only noise between the log lines."""
    if total < 8 or not desc or jax.process_index() != 0 or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def eval_batch_size(requested: int, mesh) -> int:
    """The requested batch, rounded up to a multiple of the data-parallel size and the
    process count."""
    parallel = math.lcm(sharding.data_parallel_size(mesh), jax.process_count())
    return -(-requested // parallel) * parallel


class FeatureEncoder:
    """Jitted model methods over padded, sharded batches: encode_image / encode_text, and for
    fusion models their token variants and match_logits; `run` applies any other."""

    def __init__(self, model, mesh, param_shardings, batch_size: int):
        self.model, self.mesh, self.batch_size = model, mesh, batch_size
        self.param_shardings = param_shardings
        sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
        self._compiled = {}

    def _method(self, method: str | Callable, num_inputs: int):
        """model.<method> (or `method(module, ...)`) jitted with the batch split over the mesh
        (compiled once, on first use)."""
        if method not in self._compiled:
            model = self.model
            fn = getattr(model, method) if isinstance(method, str) else method

            def apply(params, *inputs):
                return model.apply({"params": params}, *inputs, method=fn)
            batch_sh = sharding.batch_sharding(self.mesh)
            self._compiled[method] = jax.jit(
                apply, in_shardings=(self.param_shardings,) + (batch_sh,) * num_inputs,
                out_shardings=sharding.replicated(self.mesh))
        return self._compiled[method]

    def run(self, method: str | Callable, params, arrays: dict,
            prepare: Callable | None = None, desc: str = ""):
        """`method` over the rows of `arrays` (equal-length host arrays, passed positionally in
        their order); outputs as float32 host arrays. `prepare` maps each batch first."""
        fn = self._method(method, len(arrays))
        n = len(next(iter(arrays.values())))
        count, index = jax.process_count(), jax.process_index()
        outputs = []
        starts = range(0, n, self.batch_size)
        for start in progress(starts, len(starts), desc):
            chunk = {k: v[start:start + self.batch_size] for k, v in arrays.items()}
            rows = len(next(iter(chunk.values())))
            pad = self.batch_size - rows
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v
                     for k, v in chunk.items()}
            # Every process holds the whole batch; each passes its own slice of it.
            local = self.batch_size // count
            chunk = {k: v[index * local:(index + 1) * local] for k, v in chunk.items()}
            if prepare is not None:
                chunk = {k: prepare(v) for k, v in chunk.items()}
            out = fn(params, *sharding.global_batch(chunk, self.mesh).values())
            outputs.append(jax.tree.map(lambda o: np.asarray(o, np.float32)[:rows],
                                        jax.device_get(out)))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)

    def images(self, params, pixel_values: np.ndarray, prepare: Callable | None = None):
        """Image features; `prepare` maps each batch first (uint8 pixels -> normalised)."""
        return self.run("encode_image", params, {"pixel_values": pixel_values}, prepare,
                        "embedding images")

    def texts(self, params, tokens: dict) -> np.ndarray:
        return self.run("encode_text", params, text_inputs(tokens), None, "embedding texts")

    def image_tokens(self, params, pixel_values, prepare: Callable | None = None):
        """(image features, image tower tokens)."""
        return self.run("encode_image_tokens", params, {"pixel_values": pixel_values},
                        prepare, "embedding images")

    def text_tokens(self, params, tokens: dict):
        return self.run("encode_text_tokens", params, text_inputs(tokens), None,
                        "embedding texts")

    def match(self, params, image_tokens, text_tokens, text_mask) -> np.ndarray:
        """Match logits of the pairs (image_tokens[p], text_tokens[p])."""
        # No bar: re-ranking calls this once per block of queries.
        return self.run("match_logits", params, {"image": image_tokens, "text": text_tokens,
                                                 "mask": text_mask})


def text_inputs(tokens: dict) -> dict:
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
