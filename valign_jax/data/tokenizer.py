"""The text tower's own tokenizer, as fixed-length NumPy batches.

    tok = Tokenizer("openai/clip-vit-base-patch32", max_length=77)
    batch = tok(["a photo of a cat", "a dog"])   # {"input_ids": (2, 77) int32, "attention_mask": ...}

Reads the tokenizer files of a checkpoint directory (or hub id, through hf.resolve); never runs
remote code. Every batch has exactly `max_length` tokens, so the train step compiles once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from valign_jax import hf


class Tokenizer:
    def __init__(self, path_or_hub_id, max_length: int, lower_case: bool = False):
        from transformers import AutoTokenizer  # only the data side needs transformers
        directory = hf.resolve(path_or_hub_id)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no usable tokenizer files in {directory} ({err})") from err
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: need room for at least the special tokens")
        self.max_length = max_length
        self.lower_case = lower_case

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a list of strings; wrap a single text in a list")
        texts = [t.lower() if self.lower_case else t for t in texts]
        out = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np")
        return {"input_ids": out["input_ids"].astype(np.int32),
                "attention_mask": out["attention_mask"].astype(np.int32)}
