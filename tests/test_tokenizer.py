"""The tokenizer wrapper reads a checkpoint's own tokenizer files (written here by transformers),
pads/truncates to a fixed length and matches the underlying tokenizer token for token."""

import numpy as np
import pytest
import transformers as tf

from valign_jax.data.tokenizer import Tokenizer

WORDS = ["a", "photo", "of", "red", "blue", "square", "circle", "cat", "dog", "two"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tf.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=False).save_pretrained(d)
    return d


def test_fixed_length_padding_and_mask(bert_dir):
    tok = Tokenizer(bert_dir, max_length=6)
    batch = tok(["a photo of cat", "two red square blue circle dog cat"])
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"].dtype == np.int32
    reference = tf.AutoTokenizer.from_pretrained(str(bert_dir))
    first = reference("a photo of cat")["input_ids"]
    assert batch["input_ids"][0].tolist() == first  # exactly 6 tokens with [CLS] and [SEP]
    second = batch["input_ids"][1].tolist()
    assert second[0] == reference.cls_token_id and second[-1] == reference.sep_token_id  # truncated
    short = tok(["cat"])
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0]]
    assert short["input_ids"][0, 3:].tolist() == [reference.pad_token_id] * 3


def test_lower_casing(bert_dir):
    cased, lowered = Tokenizer(bert_dir, 8), Tokenizer(bert_dir, 8, lower_case=True)
    unk = tf.AutoTokenizer.from_pretrained(str(bert_dir)).unk_token_id
    assert unk in cased(["A Photo"])["input_ids"][0]
    assert unk not in lowered(["A Photo"])["input_ids"][0]


def test_errors(bert_dir, tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        Tokenizer(bert_dir, 8)("a cat")
    with pytest.raises(FileNotFoundError, match="no usable tokenizer files"):
        Tokenizer(tmp_path, 8)


def test_a_checkpoint_without_tokenizer_files_names_the_directory_and_the_files(
        torch_fixture, tmp_path):
    """The CLIP fixture has config.json and weights but no tokenizer (transformers itself
    fails there with `TypeError: expected str, bytes or os.PathLike object, not NoneType`).
    Asserts a FileNotFoundError naming the directory and the files a tokenizer needs; with
    vocab.json but no merges.txt, the incomplete set is named; a FIFO vocab.txt is refused
    without blocking."""
    import os
    import shutil
    from valign_jax.hf_files import HFFileError
    from timeouts import no_hang

    clip, _ = torch_fixture("clip")
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer(clip, 8)
    message = str(err.value)
    assert f"no usable tokenizer files in {clip}" in message
    assert "tokenizer.json or vocab.txt or vocab.json + merges.txt" in message

    copy = tmp_path / "clip"
    shutil.copytree(clip, copy)
    (copy / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"it has \['vocab.json'\], an incomplete set"):
        Tokenizer(copy, 8)
    (copy / "vocab.json").unlink()
    os.mkfifo(copy / "vocab.txt")
    with no_hang(20), pytest.raises(HFFileError, match="vocab.txt is not a regular file"):
        Tokenizer(copy, 8)


def test_evaluate_hf_without_a_tokenizer_is_one_fatal_line(torch_fixture, tmp_path):
    """`python -m valign_jax.evaluate --hf=<CLIP without tokenizer files>`: exit status 1 and
    one FATAL line naming the directory and the missing files, no traceback."""
    import subprocess
    import sys
    from conftest import REPO

    clip, _ = torch_fixture("clip")
    proc = subprocess.run([sys.executable, "-m", "valign_jax.evaluate", f"--hf={clip}",
                           "--config=configs/clip.py:demo", f"--out={tmp_path / 'e.json'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL:")]
    assert len(fatal) == 1 and f"no usable tokenizer files in {clip}" in fatal[0]
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr


# SigLIP's SentencePiece tokenizer and SigLIP 2's Gemma one, made offline: a tiny SentencePiece
# model trained here, with the tokenizer_config.json their checkpoints carry.
CORPUS = ["a photo of a red circle", "two small blue squares on the left",
          "a large green triangle at the top", "one yellow cross"] * 20


def sentencepiece_checkpoint(directory, kind):
    import io
    import json
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    ids = (dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram") if kind == "siglip"
           else dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, model_type="bpe"))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                   vocab_size=32, minloglevel=2, **ids)
    name, cls = (("spiece.model", "SiglipTokenizer") if kind == "siglip"
                 else ("tokenizer.model", "GemmaTokenizer"))
    (directory / name).write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": cls, "model_max_length": 64}))
    return directory


def test_siglip_tokenizer_canonicalises_and_pads_to_max_length(tmp_path):
    """SigLIP's tokenizer lower-cases and strips punctuation itself; captions end with </s> and
    pad to exactly max_length (the length SigLIP was trained on)."""
    tok = Tokenizer(sentencepiece_checkpoint(tmp_path, "siglip"), max_length=12)
    batch = tok(["A Red  Circle!!", "a red circle", "two small blue squares on the left " * 3])
    reference = tf.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = batch["input_ids"]
    assert ids.shape == (3, 12) and ids[0].tolist() == ids[1].tolist()
    real = reference("a red circle")["input_ids"]
    assert real[-1] == reference.eos_token_id
    assert ids[0].tolist() == real + [reference.pad_token_id] * (12 - len(real))
    assert ids[2, -1] == reference.eos_token_id  # truncated, still ending in </s>
    assert batch["attention_mask"][0].tolist() == [1] * len(real) + [0] * (12 - len(real))


def test_gemma_tokenizer_with_lower_casing(tmp_path):
    """SigLIP 2's Gemma tokenizer starts with <bos> and does not lower-case: the recipe's
    data.lower_case does (SigLIP 2 was trained on lower-cased text)."""
    directory = sentencepiece_checkpoint(tmp_path, "gemma")
    cased, lowered = Tokenizer(directory, 10), Tokenizer(directory, 10, lower_case=True)
    assert cased(["A Red Circle"])["input_ids"][0].tolist() != \
        cased(["a red circle"])["input_ids"][0].tolist()
    batch = lowered(["A Red Circle", "a red circle"])
    reference = tf.AutoTokenizer.from_pretrained(str(directory))
    assert batch["input_ids"][0].tolist() == batch["input_ids"][1].tolist()
    assert batch["input_ids"][0, 0] == reference.bos_token_id
    assert batch["input_ids"].shape == (2, 10)


def test_a_tokenizer_without_attention_masks_gets_all_ones(bert_dir):
    """Tokenizers whose model_input_names leave the mask out (SigLIP's used to) give none;
    the batch then says every position counts, which towers read as no mask."""
    tok = Tokenizer(bert_dir, max_length=6)
    tok.tokenizer.model_input_names = ["input_ids"]
    batch = tok(["cat"])
    assert batch["attention_mask"].tolist() == [[1] * 6] and batch["input_ids"].shape == (1, 6)
