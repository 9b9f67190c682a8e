"""Reading a Hugging Face checkpoint directory's files, trusting nothing they say.

    directory = resolve("openai/clip-vit-base-patch32")     # or a local directory
    config = read_config(directory)                          # config.json, values checked
    flat, layout, file = read_weights(directory)             # {dotted key: array}, "pytorch"|"flax"

hf.py turns what these return into parameter trees. A checkpoint may come from anywhere, so
before anything is built from it:
  - every file opened is a regular file (a FIFO or device named config.json, or by the shard
    index, would block `open` for ever: `stat` is asked first) lying inside the checkpoint
    directory. Shard names in model.safetensors.index.json must stay inside it as written
    (`../x.safetensors` and absolute names are refused); symlinks may point elsewhere only into
    the hub cache's own blob store (`<repo>/blobs`, where huggingface_hub keeps the files a
    snapshot's links name).
  - a safetensors header is parsed here first: its length, JSON, dtypes, shapes and byte
    ranges must agree with the file's size, so a hostile or damaged header is one error naming
    the file (the safetensors library would otherwise allocate what the header claims, or fail
    with an error main does not report).
  - config.json must be a JSON object whose architecture sizes are positive integers (not
    strings, floats or booleans), whose heads divide the width, and whose layer count the
    weights actually hold: a config claiming 10,000 layers over 12 layers of weights fails
    here, in a millisecond, instead of after minutes of tracing a model that cannot load.
Every such error is an `HFFileError` (a ValueError) whose message names the file and the key,
so `python -m valign_jax.main` prints it as one FATAL line.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAFETENSORS, SAFETENSORS_INDEX, MSGPACK = ("model.safetensors", "model.safetensors.index.json",
                                           "flax_model.msgpack")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.msgpack", "*.txt", "*.model"]  # no code, no pickles

MAX_JSON_BYTES = 64 << 20          # config.json and the shard index: kilobytes in practice
MAX_HEADER_BYTES = 100_000_000     # the safetensors library's own limit on a header
# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

# Architecture fields of config.json (of a tower, or of a two-tower checkpoint's text_config /
# vision_config: CLIP, SigLIP, SigLIP 2) and what they must hold. Fields a config does not have
# keep the family's defaults.
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings", "image_size", "patch_size", "num_channels",
                 "projection_dim", "projection_size", "num_patches")
NON_NEGATIVE_INTS = ("intermediate_size", "type_vocab_size")   # DINOv2: 0 = from mlp_ratio
POSITIVE_NUMBERS = ("layer_norm_eps", "mlp_ratio")
FINITE_NUMBERS = ("initializer_range", "layerscale_value", "logit_scale_init_value")
BOOLEANS = ("qkv_bias", "use_swiglu_ffn", "use_mask_token", "vision_use_head")
STRINGS = ("hidden_act", "position_embedding_type", "model_type")
SUB_CONFIGS = {"text_config": "text_model.", "vision_config": "vision_model."}  # two-tower halves
# Where a tower's layers sit in a checkpoint's keys: encoder.layer.N (BERT, ViT, DINOv2) or
# encoder.layers.N (CLIP), under any prefix (bert., vit., text_model., ...).
_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layers?\.(\d+)\.")


class HFFileError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the key."""


class MissingTensorError(HFFileError, KeyError):
    """A tensor the model needs is not in the checkpoint (also a KeyError, as it used to be)."""

    __str__ = ValueError.__str__   # KeyError would show the message in quotes


# ---------------------------------------------------------------------------------------------
# Locating the directory and opening its files


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, fetching a hub id into huggingface_hub's cache if needed."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name!r} is not a checkpoint directory (expected a folder with "
                                f"config.json and {SAFETENSORS} or {MSGPACK})")
    from huggingface_hub import snapshot_download  # only hub ids need it
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown id, gated repo: all end the same way for the user
        raise FileNotFoundError(
            f"could not get hub id {name!r} ({type(err).__name__}: {str(err)[:200]}). Pass a local "
            f"directory holding config.json and {SAFETENSORS} or {MSGPACK} instead, or run where "
            "the hub is reachable once so the cache has it (then HF_HUB_OFFLINE=1 works).") from err


def _allowed_roots(directory: Path) -> tuple[str, ...]:
    """Where the directory's files may really lie: the directory itself and, for a snapshot of
    huggingface_hub's cache (<repo>/snapshots/<revision>), that repository's blob store."""
    real = os.path.realpath(directory)
    roots = [real]
    for folder in {os.path.abspath(directory), real}:
        parent = os.path.dirname(folder)
        if os.path.basename(parent) == "snapshots":
            roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), "blobs")))
    return tuple(roots)


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def checked_file(directory: Path, file: Path, named_by: str = "") -> int:
    """The size of `file`, a regular file inside `directory` (symlinks followed, see the module
    docstring); FileNotFoundError when absent, HFFileError when it is anything else. `stat`
    never blocks, so a FIFO is refused before anything opens it."""
    by = f" (named by {named_by})" if named_by else ""
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing{by}") from None
    except OSError as err:
        raise HFFileError(f"{file}{by}: cannot be read ({err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise HFFileError(f"{file}{by} is not a regular file (a FIFO, device or directory); "
                          f"refused without opening it")
    real = os.path.realpath(file)
    if not any(_within(real, root) for root in _allowed_roots(directory)):
        raise HFFileError(f"{file}{by} resolves to {real}, outside the checkpoint directory "
                          f"{directory}; refused")
    return info.st_size


def _read_json(directory: Path, file: Path, named_by: str = ""):
    size = checked_file(directory, file, named_by)
    if size > MAX_JSON_BYTES:
        raise HFFileError(f"{file}: {size} bytes, more than any config ({MAX_JSON_BYTES} at "
                          f"most); is it the right file?")
    text = file.read_bytes().decode("utf-8-sig", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise HFFileError(f"{file} is not valid JSON ({err})") from None


# ---------------------------------------------------------------------------------------------
# config.json


def read_config(directory: Path) -> dict:
    """config.json as a dict, its architecture values checked (types, ranges, the layer count
    against the layers the weights hold). HFFileError naming the file and the key otherwise."""
    directory = Path(directory)
    file = directory / "config.json"
    if not file.exists() and not file.is_symlink():
        raise FileNotFoundError(f"{file} is missing: every checkpoint directory needs its "
                                f"config.json")
    config = _read_json(directory, file)
    if not isinstance(config, dict):
        raise HFFileError(f"{file} must hold a JSON object, not a {type(config).__name__}")
    check_config_values(config, file)
    check_layer_counts(config, weight_names(directory), directory)
    if config.get("auto_map") and str(file) not in _WARNED_REMOTE_CODE:
        _WARNED_REMOTE_CODE.add(str(file))
        log.warning("%s names its own modelling code (auto_map: %s); valign_jax never runs it and "
                    "builds its own %r architecture instead, loading the weights by name and "
                    "shape. If the checkpoint's code changes the computation, results will differ.",
                    file, sorted(config["auto_map"]), config.get("model_type"))
    return config


_WARNED_REMOTE_CODE: set[str] = set()  # config.json files already warned about, once each


def check_config_values(config: dict, file, where: str = "") -> None:
    """Architecture values of the right type and range, in `config` and its two-tower halves."""
    def bad(key, value, expected):
        raise HFFileError(f"{file}: {where}{key}={value!r} ({type(value).__name__}) must be "
                          f"{expected}")

    for key, value in config.items():
        if key in POSITIVE_INTS and not (_is_int(value) and value > 0):
            bad(key, value, "a positive integer")
        elif key in NON_NEGATIVE_INTS and not (_is_int(value) and value >= 0):
            bad(key, value, "an integer >= 0")
        elif key in POSITIVE_NUMBERS and not (_is_number(value) and value > 0):
            bad(key, value, "a positive number")
        elif key in FINITE_NUMBERS and not _is_number(value):
            bad(key, value, "a finite number")
        elif key in BOOLEANS and not isinstance(value, bool):
            bad(key, value, "true or false")
        elif key in STRINGS and not isinstance(value, str):
            bad(key, value, "a string")
    heads, width = config.get("num_attention_heads"), config.get("hidden_size")
    if heads and width and width % heads:
        raise HFFileError(f"{file}: {where}hidden_size={width} is not divisible by "
                          f"{where}num_attention_heads={heads}")
    for key in SUB_CONFIGS:
        sub = config.get(key)
        if sub is not None and not isinstance(sub, dict):
            bad(key, sub, "a JSON object")
        if sub:
            check_config_values(sub, file, f"{where}{key}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_layer_counts(config: dict, names, directory: Path) -> None:
    """num_hidden_layers against the layer indices the weights hold (`names`: their keys; None
    when there are no weights to compare with). More layers than the weights hold is an error
    (loading would fail anyway, after tracing every layer); fewer is a warning (the top layers
    are left out, as transformers does)."""
    if names is None:
        return
    towers = [("", "", config)] + [(f"{key}.", prefix, config[key])
                                   for key, prefix in SUB_CONFIGS.items()
                                   if isinstance(config.get(key), dict)]
    for where, prefix, tower in towers:
        claimed = tower.get("num_hidden_layers")
        if claimed is None:
            continue
        held = {int(m.group(1)) for name in names if name.startswith(prefix)
                for m in [_LAYER_KEY.search(name[len(prefix):])] if m}
        if not held and prefix == "" and any(n.startswith(tuple(SUB_CONFIGS.values()))
                                             for n in names):
            continue  # a two-tower checkpoint's top level: its halves are checked one by one
        count = max(held) + 1 if held else 0
        if claimed > count:
            raise HFFileError(
                f"{directory / 'config.json'}: {where}num_hidden_layers={claimed}, but the "
                f"weights in {directory} hold {count} layers (indices of "
                f"'{prefix}...encoder.layer(s).N.' keys); the config and the weights do not "
                f"belong together")
        if claimed < count:
            log.warning("%s: %snum_hidden_layers=%d while the weights hold %d layers; the top "
                        "%d are not used", directory / "config.json", where, claimed, count,
                        count - claimed)


def weight_names(directory: Path) -> list[str] | None:
    """The weights' keys without reading any tensor (the shard index, the safetensors header,
    or a msgpack file's structure), or None when the directory has no weights."""
    if (directory / SAFETENSORS_INDEX).exists():
        index = _shard_index(directory)
        for shard in sorted(set(index.values())):   # there, and regular files (stat only)
            checked_file(directory, directory / shard, SAFETENSORS_INDEX)
        return list(index)
    if (directory / SAFETENSORS).exists():
        return list(safetensors_header(directory, directory / SAFETENSORS))
    if (directory / MSGPACK).exists():
        file = directory / MSGPACK
        checked_file(directory, file)
        info = os.stat(file)
        return list(_msgpack_names(os.path.realpath(file), info.st_size, info.st_mtime_ns))
    return None


@functools.lru_cache(maxsize=8)
def _msgpack_names(file: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The dotted keys of a Flax msgpack checkpoint, arrays left undecoded. The file is read
    whole (msgpack has no index); cached, since a run reads config.json several times."""
    import msgpack
    try:
        tree = msgpack.unpackb(Path(file).read_bytes(), ext_hook=lambda code, data: None,
                               raw=False, strict_map_key=False)
    except Exception as err:  # noqa: BLE001  (msgpack's errors are ValueError or their own)
        raise HFFileError(f"{file}: not a readable Flax msgpack checkpoint "
                          f"({type(err).__name__}: {str(err)[:300]})") from None
    names, stack = [], [("", tree)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            stack += [(f"{prefix}{k}.", v) for k, v in node.items()]
        else:
            names.append(prefix[:-1])
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# Weights


def safetensors_header(directory: Path, file: Path, named_by: str = "") -> dict[str, dict]:
    """The tensors a safetensors file declares, {key: {"dtype", "shape", "data_offsets"}},
    checked against the file's size before any tensor is read."""
    size = checked_file(directory, file, named_by)
    if size < 8:
        raise HFFileError(f"{file}: {size} bytes, too short for a safetensors header")
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise HFFileError(f"{file}: the safetensors header claims {length} bytes but the "
                              f"file holds {size - 8} after its length field (at most "
                              f"{MAX_HEADER_BYTES}); the file is truncated or not safetensors")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFFileError(f"{file}: the safetensors header is not valid JSON ({err}); the file "
                          f"is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise HFFileError(f"{file}: the safetensors header must be a JSON object")
    data_size = size - 8 - length
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _check_entry(file, key, entry, data_size)
    return tensors


def _check_entry(file, key, entry, data_size: int) -> dict:
    def bad(why):
        raise HFFileError(f"{file}: tensor '{key}' {why}; the file is damaged or not safetensors")

    if not isinstance(entry, dict):
        bad("has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        bad(f"has dtype {dtype!r}, not one of {sorted(DTYPE_SIZES)}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        bad(f"has shape {shape!r}, not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_size:
        bad(f"ends at byte {offsets[1]} of the data, past its end ({data_size} bytes): the "
            f"file is truncated")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        bad(f"spans {offsets[1] - offsets[0]} bytes, but {dtype} {tuple(shape)} needs {expected}")
    return entry


def _shard_index(directory: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map, {tensor key: shard file name}, every shard
    name staying inside the directory as written."""
    file = directory / SAFETENSORS_INDEX
    index = _read_json(directory, file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise HFFileError(f"{file}: expected {{\"weight_map\": {{tensor key: shard file}}}}")
    for key, shard in weight_map.items():
        normal = os.path.normpath(shard)
        if (not shard or os.path.isabs(shard) or normal in (os.curdir, os.pardir)
                or normal.startswith(os.pardir + os.sep)):
            raise HFFileError(f"{file}: weight_map['{key}'] = {shard!r} is not a file inside "
                              f"{directory}; refused")
    return weight_map


def read_weights(directory: Path) -> tuple[dict[str, np.ndarray], str, Path]:
    """Flat weights {dotted key: array}, their layout ("pytorch" or "flax") and the file read."""
    directory = Path(directory)
    if (directory / SAFETENSORS).exists() or (directory / SAFETENSORS_INDEX).exists():
        if (directory / SAFETENSORS).exists():
            files, index, by = [directory / SAFETENSORS], None, ""
        else:
            index, by = _shard_index(directory), SAFETENSORS_INDEX
            files = [directory / n for n in sorted(set(index.values()))]
        flat = {}
        for file in files:
            flat.update(_load_safetensors(directory, file, by))
        if index is not None:
            missing = sorted(set(index) - set(flat))
            if missing:
                raise MissingTensorError(
                    f"{directory / SAFETENSORS_INDEX} maps '{missing[0]}' to "
                    f"{index[missing[0]]}, which does not hold it ({len(missing)} such keys)")
        # transformers' Flax classes can write safetensors too, keeping Flax names.
        flax_names = any(k.endswith((".kernel", ".scale", ".embedding")) for k in flat)
        return flat, "flax" if flax_names else "pytorch", files[0]
    if (directory / MSGPACK).exists():
        return _load_msgpack(directory, directory / MSGPACK), "flax", directory / MSGPACK
    pickles = [p for p in PICKLES if (directory / p).exists()]
    if pickles:
        raise ValueError(
            f"{directory / pickles[0]} is a pickle, which valign_jax never loads (unpickling "
            "can run arbitrary code). Convert it once to safetensors where you trust the file, "
            "e.g.\n  python -c \"from transformers import AutoModel; AutoModel.from_pretrained("
            f"'{directory}').save_pretrained('{directory}', safe_serialization=True)\"")
    raise FileNotFoundError(f"{directory} has no weights: expected {SAFETENSORS}, "
                            f"{SAFETENSORS_INDEX} or {MSGPACK}")


def _load_safetensors(directory: Path, file: Path, named_by: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    safetensors_header(directory, file, named_by)   # every check first: sizes, FIFO, location
    try:
        return load_file(file)
    except Exception as err:  # noqa: BLE001  (SafetensorError is no ValueError/OSError)
        raise HFFileError(f"{file}: safetensors could not read it "
                          f"({type(err).__name__}: {str(err)[:300]})") from None


def _load_msgpack(directory: Path, file: Path) -> dict[str, np.ndarray]:
    from flax import serialization, traverse_util
    checked_file(directory, file)
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except Exception as err:  # noqa: BLE001  (msgpack's errors are ValueError or their own)
        raise HFFileError(f"{file}: not a readable Flax msgpack checkpoint "
                          f"({type(err).__name__}: {str(err)[:300]})") from None
    if not isinstance(tree, dict):
        raise HFFileError(f"{file}: expected a tree of named arrays, found a "
                          f"{type(tree).__name__}")
    return {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
