"""The text tower's own tokenizer, as fixed-length NumPy batches.

    tok = Tokenizer("openai/clip-vit-base-patch32", max_length=77)
    batch = tok(["a photo of a cat", "a dog"])   # {"input_ids": (2, 77) int32, "attention_mask": ...}

Reads the tokenizer files of a checkpoint directory (or hub id, through hf.resolve); never runs
remote code. Every batch has exactly `max_length` tokens, so the train step compiles once.
Lower-casing and other text normalisation are the checkpoint tokenizer's own (SigLIP's
lower-cases and strips punctuation itself); `lower_case` adds lower-casing on top.
A directory without tokenizer files (a model saved without its tokenizer) is a
FileNotFoundError naming the directory and the files it needs, before transformers is asked
(which would fail with a TypeError about a None path); the files transformers would open must
be regular files (hf_files.checked_file: a FIFO is refused, never waited on).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from valign_jax import hf
from valign_jax.hf_files import checked_file

# A tokenizer is one of these (a fast tokenizer's tokenizer.json; WordPiece's vocab.txt; BPE's
# vocab.json with merges.txt; a sentencepiece model) ...
VOCABULARIES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"),
                ("spiece.model",), ("sentencepiece.bpe.model",), ("tokenizer.model",))
# ... plus the settings transformers reads beside it.
SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "config.json")


class Tokenizer:
    def __init__(self, path_or_hub_id, max_length: int, lower_case: bool = False):
        from transformers import AutoTokenizer  # only the data side needs transformers
        directory = hf.resolve(path_or_hub_id)
        _check_files(directory)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise FileNotFoundError(f"no usable tokenizer files in {directory} "
                                    f"({type(err).__name__}: {err})") from err
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
        ids = out["input_ids"].astype(np.int32)
        # A tokenizer that gives no attention mask (SigLIP's SentencePiece one: SigLIP was
        # trained attending to its padding) gets an all-ones mask, which towers treat as none.
        mask = out.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else mask.astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask}


def _check_files(directory) -> None:
    """The tokenizer files are there and are regular files; FileNotFoundError naming what is
    missing otherwise (HFFileError for a FIFO or a file outside the directory)."""
    present = {name for group in VOCABULARIES for name in group if (directory / name).exists()}
    for name in sorted(present) + [n for n in SETTINGS if (directory / n).exists()]:
        checked_file(directory, directory / name)
    if not any(set(group) <= present for group in VOCABULARIES):
        wanted = " or ".join(" + ".join(group) for group in VOCABULARIES)
        found = f" (it has {sorted(present)}, an incomplete set)" if present else ""
        raise FileNotFoundError(
            f"no usable tokenizer files in {directory}{found}: a tokenizer needs {wanted}. The "
            f"checkpoint was saved without its tokenizer: copy the tokenizer files of the model "
            f"it came from into {directory} (tokenizer.save_pretrained(...) writes them)")


# ---------------------------------------------------------------------------------------------
# A vocabulary learned from the training captions (text towers trained from scratch)

LEARNED_DIR = "tokenizer"        # <workdir>/tokenizer: the run's learned vocabulary
MAX_CAPTIONS = 50_000            # captions a vocabulary is learned from


def learn_tokenizer(captions: Sequence[str], vocab_size: int, directory,
                    lower_case: bool = True) -> None:
    """Learn a WordPiece vocabulary of at most `vocab_size` tokens from `captions` and save it
    as a Hugging Face tokenizer in `directory`. Its special tokens take the ids every scratch
    text tower here expects (models.config.SPECIAL_IDS: [PAD] 0, [BOS] 1, [UNK] 2, [EOS] 3);
    a word it never saw is split into pieces it knows, so little becomes [UNK]."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    from valign_jax.special_tokens import SPECIAL_IDS
    specials = ["[PAD]", "[BOS]", "[UNK]", "[EOS]"]  # in the order of their ids
    assert [SPECIAL_IDS[k] for k in ("pad", "bos", "unk", "eos")] == list(range(4))
    if not captions:
        raise ValueError("learning a tokenizer needs captions; the training data gave none")
    tok = RustTokenizer(WordPiece(unk_token="[UNK]"))
    steps = [normalizers.NFD(), normalizers.StripAccents()]
    tok.normalizer = normalizers.Sequence(([normalizers.Lowercase()] if lower_case else [])
                                          + steps)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        min_frequency=1, show_progress=False)
    tok.train_from_iterator(list(captions), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", SPECIAL_IDS["bos"]),
                                                 ("[EOS]", SPECIAL_IDS["eos"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]", unk_token="[UNK]").save_pretrained(str(directory))


def caption_texts(source, limit: int = MAX_CAPTIONS) -> list[str]:
    """Up to `limit` training captions of a source (its own `caption_texts` when it has one)."""
    own = getattr(source, "caption_texts", None)
    if own is not None:
        return own(limit)
    texts = []
    for index in range(min(len(source), limit)):
        record = source[index]
        texts += [c for c in (record.get("captions") or [record["caption"]]) if isinstance(c, str)]
    return texts[:limit]


def unknown_words(tokenizer, captions: Sequence[str]) -> tuple[float, list[str]]:
    """(share of the captions' tokens that are the unknown token, the words that became it,
    most frequent first): what a tokenizer loses of the user's text."""
    unk = getattr(getattr(tokenizer, "tokenizer", None), "unk_token_id", None)
    if unk is None:
        from valign_jax.special_tokens import SPECIAL_IDS
        unk = SPECIAL_IDS["unk"]
    batch = tokenizer(list(captions))
    real = batch["attention_mask"].astype(bool)
    tokens = int(real.sum()) - 2 * len(captions)  # without [BOS] / [EOS]
    unknown = int(((batch["input_ids"] == unk) & real).sum())
    lost: dict[str, int] = {}
    if unknown:
        words = sorted({w for c in captions for w in c.split()})
        ids = tokenizer(words)["input_ids"]
        for word, row in zip(words, ids):
            if unk in row:
                lost[word] = sum(c.split().count(word) for c in captions)
    return unknown / max(tokens, 1), sorted(lost, key=lambda w: -lost[w])
