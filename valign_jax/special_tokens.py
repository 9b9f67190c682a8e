"""The special-token ids of the tokenizers valign_jax makes for text towers trained from scratch
(the embedded data's word vocabulary, or one learned from the training captions). A text tower
built from a preset takes them (build.py), since no checkpoint's tokenizer fixes them there."""

SPECIAL_IDS = {"pad": 0, "bos": 1, "unk": 2, "eos": 3}
