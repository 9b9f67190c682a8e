"""Random-access image–caption sources named by config strings (grain MapDataset sources).

    source = open_source("tfds:coco_captions/train", key="config.data.train")
    len(source), source[7]   # {"image": uint8 array or encoded bytes, "caption": str,
                             #  "captions": (str, ...), optionally "long_caption", "label"}
    source.class_names       # classification sources: ("apple", "aquarium fish", ...)

The forms (KNOWN_FORMS):
  tfds:<name>/<split>   `tfds.data_source` (prepared data, nothing is downloaded). Captions from
                        a `captions/text` sequence (coco_captions: ~5 per image; its splits are
                        Karpathy & Li's train/val/test/restval) or a `caption`/`text` string;
                        classification datasets (cifar100, svhn_cropped, imagenet2012, ...) give
                        `label` and `.class_names` (underscores as spaces), the class name being
                        the caption. ImageNet-family names are WordNet ids in tfds.
  <file>.jsonl          one JSON object per line: `image` (path relative to the file),
  <file>.csv            `caption` (a string or a list; in csv a JSON list), optional
                        `long_caption` and `language`; csv has a header row. Rows naming the
                        same image file are one image in retrieval evaluation (`image_id`).
  <directory>           holding *.tar -> tar shards; holding pairs.jsonl / pairs.csv -> those;
                        else class folders `<root>/<class name>/<images>` (classes sorted).
  <glob>.tar, <f>.tar   WebDataset-style shards: `<key>.<jpg|jpeg|png|webp>` with `<key>.txt`
                        (the caption) or `<key>.json` (`caption` / `captions` / `long_caption`).
                        An index of member offsets is built at open (headers only); records are
                        read with os.pread, so nothing is extracted and threads share the files.
  synthetic:shapes      the embedded dataset (pipeline.make_source builds it).

Broken rows never stop a run: a missing or empty image file, one over MAX_IMAGE_FILE_BYTES (refused
from its size, unread), a bad JSON line, a caption that is empty or not a string, a tar member
cut short... each keeps its index and raises
`BrokenRecord` when read; the pipeline drops and counts it. A source without a single usable row
is an error at open, naming it (checked cheaply: stat calls until one good row is found).

Only regular files are read: a row naming a FIFO, a device or a directory is a broken record
(asked with `stat`, which never blocks, before anything opens it), never a hang. A pairs file
may start with a UTF-8 byte order mark (Windows editors write one). A tar shard that cannot be
indexed to its end (truncated, gzip-compressed, not a tar, not a regular file) keeps the samples
read before the damage and is listed in the source's `broken_shards` ("<path>: <reason>"); the
training loop reports their number as `data/broken_shards` (how many samples were lost is not
knowable: the index stops at the damage).

Paths a dataset names never leave its root (the folder of the pairs file, the class-folder
directory): a row whose image is `../x.jpg`, an absolute path elsewhere, or a symlink whose
target lies outside is a broken record with that reason, refused before the file is opened, and
counted like every other. (Tar members are read at their offsets, never extracted, so their names
reach no file.) Keep pairs.jsonl at the top of its dataset, next to or above the images.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import stat
import tarfile
from pathlib import Path

import numpy as np

from valign_jax.data.transforms import BrokenRecord

KNOWN_FORMS = ("tfds:<name>/<split> (e.g. tfds:coco_captions/train, tfds:cifar100/test)",
               "<file>.jsonl or <file>.csv (image path relative to the file + caption)",
               "<directory>/<class name>/<images> (class folders, zero-shot)",
               "<directory of *.tar>, <glob>*.tar or <file>.tar (WebDataset-style shards)",
               "synthetic:shapes (the embedded dataset)")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Image files (and tar members) larger than this are broken records, refused before a byte is
# read: the largest image the decoder accepts (transforms.MAX_IMAGE_PIXELS, 67 Mpx) fits in it
# even uncompressed (8-bit RGB: 201 MB), while a mislabelled multi-GB file never fills memory.
MAX_IMAGE_FILE_BYTES = 256 * 2 ** 20
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

log = logging.getLogger(__name__)


class Source:
    """Random access records. `name` appears in every error; `class_names` is set by
    classification sources; `broken_shards` by tar sources (the shards that could not be
    indexed to their end). pipeline.make_source attaches `train_transform` / `eval_transform`
    (records here hold undecoded images)."""
    name: str = ""
    class_names: tuple[str, ...] | None = None
    broken_shards: tuple[str, ...] | list[str] = ()   # tar shards that could not be indexed
    train_transform = None
    eval_transform = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index) -> dict:
        raise NotImplementedError

    def describe(self, index) -> str:
        """Where record `index` comes from, for messages about it (a file, a tar member)."""
        return f"{self.name}[{index}]"

    def caption_texts(self, limit: int) -> list[str]:
        """Up to `limit` captions, for learning a tokenizer (broken records skipped). Sources
        that hold their captions apart from their images read no image here."""
        texts = []
        for index in range(len(self)):
            try:
                record = self[index]
            except BrokenRecord:
                continue
            texts += [c for c in (record.get("captions") or [record.get("caption")])
                      if isinstance(c, str)]
            if len(texts) >= limit:
                break
        return texts[:limit]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} records)"


SYNTHETIC = ("shapes", "relations")  # synthetic:<name>, built by pipeline.make_source


def spec_problem(spec: str, key: str) -> str | None:
    """What is wrong with a data source's config string, found without reading a record (a
    local path that does not exist, an unknown form or file type); None when nothing is. The
    config checks run it before any model is built."""
    spec = str(spec).strip()
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        return None if name in SYNTHETIC else (
            f"{key}={spec!r}: unknown synthetic dataset {name!r}; known: {list(SYNTHETIC)}")
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].rpartition("/")
        return None if name and split else (
            f"{key}={spec!r}: expected tfds:<name>/<split>, e.g. 'tfds:coco_captions/train'")
    path = Path(spec).expanduser()
    if _SCHEME.match(spec) and not path.exists():
        return f"{key}={spec!r}: unknown data source scheme; known forms: {list(KNOWN_FORMS)}"
    if any(c in spec for c in "*?[") and spec.endswith(".tar"):
        return None if glob.glob(spec) else f"{key}={spec!r}: no file matches this pattern"
    if not path.exists():
        return (f"{key}={spec!r}: {path.absolute()} does not exist; known forms: "
                f"{list(KNOWN_FORMS)}")
    if path.is_file() and path.suffix not in (".jsonl", ".csv", ".tar"):
        return (f"{key}={spec!r}: unknown file format {path.suffix!r}; known forms: "
                f"{list(KNOWN_FORMS)}")
    return None


def open_source(spec: str, key: str = "source") -> Source:
    """The source a config string names (any form but synthetic:); `key` (the config key) is
    named in errors."""
    spec = str(spec).strip()
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].rpartition("/")
        if not name or not split:
            raise ValueError(f"{key}={spec!r}: expected tfds:<name>/<split>, e.g. "
                             f"'tfds:coco_captions/train'")
        return TfdsSource(name, split)
    path = Path(spec).expanduser()
    if _SCHEME.match(spec) and not path.exists():
        raise ValueError(f"{key}={spec!r}: unknown data source scheme; known forms: "
                         f"{list(KNOWN_FORMS)}")
    if any(c in spec for c in "*?[") and spec.endswith(".tar"):
        return TarShardSource(spec)
    if not path.exists():
        raise FileNotFoundError(f"{key}={spec!r}: {path} does not exist; known forms: "
                                f"{list(KNOWN_FORMS)}")
    if not path.is_file() and not path.is_dir():
        raise ValueError(f"{key}={spec!r}: {path} is neither a regular file nor a directory "
                         f"(a FIFO or a device?); refused without opening it")
    if path.is_file():
        if path.suffix in (".jsonl", ".csv"):
            return PairsSource(path)
        if path.suffix == ".tar":
            return TarShardSource(str(path))
        raise ValueError(f"{key}={spec!r}: unknown file format {path.suffix!r}; known forms: "
                         f"{list(KNOWN_FORMS)}")
    if any(path.glob("*.tar")):
        return TarShardSource(str(path))
    for pairs in ("pairs.jsonl", "pairs.csv"):
        if (path / pairs).is_file():
            return PairsSource(path / pairs)
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return ClassFolderSource(path)
    raise ValueError(f"{key}={spec!r}: {path} holds no *.tar, pairs.jsonl/csv or class "
                     f"folders; known forms: {list(KNOWN_FORMS)}")


def clean_captions(value, where: str) -> tuple[str, ...]:
    """A caption field -> its non-empty captions: a string, or a list whose string items count
    (other items are ignored). BrokenRecord when nothing usable is left."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        items = [v for v in items if isinstance(v, str)]
        if not items:
            raise BrokenRecord(f"{where}: caption list without strings")
    else:
        raise BrokenRecord(f"{where}: caption is a {type(value).__name__}, not a string")
    captions = tuple(c.strip() for c in items if c.strip())
    if not captions:
        raise BrokenRecord(f"{where}: empty caption")
    return captions


def _text_record(fields: dict, where: str) -> dict:
    """caption / captions / long_caption fields -> the record's text part."""
    if "captions" in fields:
        captions = clean_captions(fields["captions"], where)
    elif "caption" in fields:
        captions = clean_captions(fields["caption"], where)
    else:
        raise BrokenRecord(f"{where}: no caption")
    record = {"caption": captions[0], "captions": captions}
    long = fields.get("long_caption")
    if isinstance(long, str) and long.strip():
        record["long_caption"] = long.strip()
    language = fields.get("language")
    if isinstance(language, str) and language.strip():  # multilingual retrieval, per language
        record["language"] = language.strip()
    return record


def _too_large(size: int) -> str | None:
    if size > MAX_IMAGE_FILE_BYTES:
        return (f"{size / 2 ** 20:.0f} MiB image file, over the {MAX_IMAGE_FILE_BYTES // 2 ** 20} "
                f"MiB cap (sources.MAX_IMAGE_FILE_BYTES); not read")
    return None


def _read_file(path: str) -> bytes:
    try:
        too_large = _too_large(os.stat(path).st_size)  # before reading: never a 3 GB read
        if too_large:
            raise BrokenRecord(f"{path}: {too_large}")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BrokenRecord(f"{path}: missing file") from None
    except OSError as err:
        raise BrokenRecord(f"{path}: unreadable ({err})") from None
    if not data:
        raise BrokenRecord(f"{path}: empty file")
    return data


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _inside(path: str, real_root: str) -> bool:
    """Whether `path`, symlinks followed, lies inside `real_root` (itself a realpath)."""
    return _within(os.path.realpath(path), real_root)


def _read_inside(path: str, real_root: str) -> bytes:
    """The file's bytes, unless its real location is outside the dataset root: then it is a
    broken record and the file is never opened."""
    if not _inside(path, real_root):
        raise BrokenRecord(f"{path}: resolves to {os.path.realpath(path)}, outside the dataset "
                           f"root {real_root}; refused")
    _check_regular(path)
    return _read_file(path)


def _check_regular(path: str) -> None:
    """BrokenRecord unless `path` is a regular file: a FIFO would block `open` for ever, so
    `stat` (which never blocks) is asked first."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: _read_file names it
    if not stat.S_ISREG(mode):
        raise BrokenRecord(f"{path}: not a regular file (a FIFO, device or directory); "
                           f"refused without opening it")


def _nonempty_file(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _end_of_archive(path: str, offset: int) -> bool:
    """Whether a tar file holds its end-of-archive marker (a zero block) at `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def human(name: str) -> str:
    """A class name as a caption: underscores as spaces."""
    return name.replace("_", " ").strip()


# ---------------------------------------------------------------------------------------------


class TfdsSource(Source):
    """A prepared tfds dataset through `tfds.data_source` (array_record, random access)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # only tfds sources need it
        self.name = f"tfds:{name}/{split}"
        try:
            self.data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:
            raise FileNotFoundError(
                f"{self.name}: tfds cannot open it ({type(err).__name__}: {str(err)[:300]}). "
                f"Prepare it once with `tfds build {name.split('/')[0]}` (TFDS_DATA_DIR or "
                f"~/tensorflow_datasets), then rerun.") from err
        features = self.data.dataset_info.features
        keys = set(features.keys())
        self.caption_key = next((k for k in ("captions", "caption", "text") if k in keys), None)
        label = features["label"] if "label" in keys else None
        if label is not None and hasattr(label, "names"):
            self.class_names = tuple(human(n) for n in label.names)
        if self.caption_key is None and self.class_names is None:
            raise ValueError(f"{self.name}: neither captions ('captions', 'caption', 'text') nor "
                             f"class labels ('label') among its features {sorted(keys)}")
        if len(self.data) == 0:
            raise ValueError(f"{self.name}: the split has no records")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index) -> dict:
        where = f"{self.name}[{index}]"
        try:
            example = self.data[int(index)]
        except Exception as err:  # a corrupt record must not stop the run
            raise BrokenRecord(f"{where}: unreadable ({type(err).__name__}: {err})") from None
        record = {"image": example["image"]}
        if "label" in example and self.class_names is not None:
            record["label"] = int(example["label"])
        if self.caption_key is not None:
            value = example[self.caption_key]
            if isinstance(value, dict):  # captions: Sequence({"text": ...})
                value = value.get("text", ())
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            record.update(_text_record({"captions": value}, where))
        else:
            name = self.class_names[record["label"]]
            record.update(caption=name, captions=(name,))
        return record


class PairsSource(Source):
    """pairs.jsonl / pairs.csv: rows of image path (relative to the file) and caption(s)."""

    def __init__(self, path):
        path = Path(path)
        self.name, self.root = str(path), os.path.abspath(path.parent)
        self.real_root = os.path.realpath(self.root)
        self.outside: list[str] = []   # reasons of the rows refused for leaving the root
        self.rows: list[tuple[str, dict] | str] = []   # (image path, text record) or a reason
        # utf-8-sig: a byte order mark at the start would otherwise glue itself to the first
        # JSON line (which then fails to parse) or to the csv header's first column name.
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            if path.suffix == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                    raise ValueError(f"{path}: a pairs.csv needs a header with 'image' and "
                                     f"'caption' columns; found {reader.fieldnames}")
                for line, row in enumerate(reader, start=2):
                    row["caption"] = _csv_caption(row.get("caption"))
                    self.rows.append(self._parse(row, f"{path}:{line}"))
            else:
                for line, text in enumerate(f, start=1):
                    if text.strip():
                        self.rows.append(self._parse_json(text, f"{path}:{line}"))
        if self.outside:
            log.warning("%s: %d rows name an image outside %s; they are skipped, e.g. %s",
                        self.name, len(self.outside), self.root, self.outside[0])
        self._check()

    def _parse_json(self, text: str, where: str):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{where}: invalid JSON ({err})"
        if not isinstance(row, dict):
            return f"{where}: a line must be a JSON object"
        return self._parse(row, where)

    def _parse(self, row: dict, where: str):
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            return f"{where}: no image path"
        image = image.strip()
        path = os.path.normpath(os.path.join(self.root, image))  # an absolute image stays itself
        if not _within(path, self.root):
            self.outside.append(f"{where}: image {image!r} is outside the dataset root "
                                f"{self.root}; refused")
            return self.outside[-1]
        try:
            text = _text_record(row, where)
        except BrokenRecord as err:
            return str(err)
        return path, text

    def caption_texts(self, limit: int) -> list[str]:
        texts = [c for row in self.rows if not isinstance(row, str) for c in row[1]["captions"]]
        return texts[:limit]

    def _check(self):
        if not self.rows:
            raise ValueError(f"{self.name}: no rows")
        reasons = []
        for row in self.rows:
            if isinstance(row, str):
                reasons.append(row)
            elif _nonempty_file(row[0]) and _inside(row[0], self.real_root):
                return
            else:
                reasons.append(f"{row[0]}: missing or empty file")
        raise ValueError(f"{self.name}: none of its {len(self.rows)} rows is usable, e.g. "
                         f"{reasons[:3]}")

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index) -> str:
        row = self.rows[index]
        return f"{self.name}[{index}]" if isinstance(row, str) else row[0]

    def __getitem__(self, index) -> dict:
        row = self.rows[index]
        if isinstance(row, str):
            raise BrokenRecord(row)
        # image_id: rows naming one image file are one image to the retrieval evaluator.
        return {"image": _read_inside(row[0], self.real_root), "image_id": row[0], **row[1]}


def _csv_caption(cell):
    """A csv caption cell: a JSON list when it parses as one, else the text itself."""
    if isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        return value if isinstance(value, list) else cell
    return cell


class ClassFolderSource(Source):
    """<root>/<class name>/<image files>; classes sorted by folder name, the caption is the
    class name. Files without an image extension are not records (README.txt); a broken file
    with one is a broken record."""

    def __init__(self, root):
        root = Path(root)
        self.name, self.real_root = str(root), os.path.realpath(root)
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{root}: no class folders")
        self.class_names = tuple(human(p.name) for p in folders)
        self.files: list[str] = []
        labels = []
        for label, folder in enumerate(folders):
            names = sorted(e.name for e in os.scandir(folder) if e.is_file()
                           and not e.name.startswith(".")
                           and e.name.lower().endswith(IMAGE_EXTENSIONS))
            self.files += [str(folder / n) for n in names]
            labels += [label] * len(names)
        self.labels = np.asarray(labels, np.int32)
        if not any(_nonempty_file(f) and _inside(f, self.real_root) for f in self.files):
            raise ValueError(f"{root}: no non-empty image file ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in its {len(folders)} class folders")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index) -> str:
        return self.files[index]

    def __getitem__(self, index) -> dict:
        label = int(self.labels[index])
        name = self.class_names[label]
        return {"image": _read_inside(self.files[index], self.real_root), "caption": name,
                "captions": (name,), "label": label}


class TarShardSource(Source):
    """WebDataset-style shards (uncompressed tar) with an index of member offsets."""

    def __init__(self, pattern: str):
        self.name = pattern
        path = Path(pattern).expanduser()
        paths = sorted(glob.glob(str(path / "*.tar"))) if path.is_dir() else (
            sorted(glob.glob(str(path))))
        if not paths:
            raise FileNotFoundError(f"{pattern}: no *.tar shards")
        self.paths = paths
        keys, columns = [], {k: [] for k in ("shard", "image_at", "image_size", "text_at",
                                              "text_size", "text_json")}
        self.broken_shards: list[str] = []
        for shard, shard_path in enumerate(paths):
            samples, broken = self._scan(shard_path)
            if broken:
                self.broken_shards.append(f"{shard_path}: {broken}")
                log.warning("%s: %s; its samples from there on are lost", shard_path, broken)
            for key, members in samples.items():
                image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
                text = members.get("txt") or members.get("json")
                if image is None and text is None:
                    continue  # a key with other members only (.cls, ...): not a sample
                keys.append(f"{Path(shard_path).name}:{key}")
                columns["shard"].append(shard)
                columns["image_at"].append(image[0] if image else -1)
                columns["image_size"].append(image[1] if image else -1)
                columns["text_at"].append(text[0] if text else -1)
                columns["text_size"].append(text[1] if text else -1)
                columns["text_json"].append("txt" not in members)
        self.keys = keys
        self.index = {k: np.asarray(v, np.int64) for k, v in columns.items()}
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        if not keys:
            raise ValueError(f"{pattern}: its {len(paths)} shards hold no <key>.<jpg|jpeg|png|webp>"
                             f" + <key>.<txt|json> samples" + (
                                 f"; broken shards: {self.broken_shards[:3]}"
                                 if self.broken_shards else ""))
        if self.broken_shards:
            log.warning("%s: %d of its %d shards are broken (reported as data/broken_shards), "
                        "e.g. %s", pattern, len(self.broken_shards), len(paths),
                        self.broken_shards[0])
        if not any(self._usable(i) for i in range(len(keys))):
            raise ValueError(f"{pattern}: none of its {len(keys)} samples has a non-empty image "
                             f"and a non-empty caption")

    @staticmethod
    def _scan(path: str) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
        """key -> {extension: (data offset, size)} from the tar headers of one shard, and why
        the shard could not be indexed to its end (None when it could)."""
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            info = os.stat(path)
        except OSError as err:
            return samples, f"unreadable ({err})"
        if not stat.S_ISREG(info.st_mode):
            return samples, "not a regular file (a FIFO, device or directory); not opened"
        try:
            with open(path, "rb") as f:
                if f.read(2) == b"\x1f\x8b":
                    return samples, ("gzip-compressed; shards must be uncompressed tar files "
                                     "(gunzip them)")
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    stem, dot, ext = base.partition(".")
                    if dot:
                        key = f"{folder}/{stem}" if folder else stem
                        samples.setdefault(key, {})[ext.lower()] = (member.offset_data,
                                                                    member.size)
                end = tar.offset
            if end < info.st_size and not _end_of_archive(path, end):
                # tarfile stops quietly at a header cut short or garbled after the first one
                return samples, (f"damaged or cut short after {len(samples)} samples (no valid "
                                 f"header or end-of-archive block at byte {end})")
        except (tarfile.TarError, OSError) as err:
            return samples, f"unreadable after {len(samples)} samples ({err})"
        return samples, None

    def _usable(self, i: int) -> bool:
        if self.index["image_size"][i] <= 0 or self.index["text_size"][i] <= 0:
            return False
        try:
            return bool(self._text(i))
        except BrokenRecord:
            return False

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}  # file descriptors do not travel to workers

    def _read(self, i: int, at: str, size: str, what: str) -> bytes:
        if os.getpid() != self._pid:
            self._fds, self._pid = {}, os.getpid()
        shard = int(self.index["shard"][i])
        offset, length = int(self.index[at][i]), int(self.index[size][i])
        if offset < 0:
            raise BrokenRecord(f"{self.name} {self.keys[i]}: no {what} member")
        if length == 0:
            raise BrokenRecord(f"{self.name} {self.keys[i]}: empty {what} member")
        too_large = _too_large(length) if what == "image" else None
        if too_large:
            raise BrokenRecord(f"{self.name} {self.keys[i]}: {too_large}")
        try:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            data = os.pread(fd, length, offset)  # no shared file position: thread-safe
        except OSError as err:
            raise BrokenRecord(f"{self.keys[i]}: unreadable ({err})") from None
        if len(data) < length:
            raise BrokenRecord(f"{self.name} {self.keys[i]}: {what} member cut short")
        return data

    def _text(self, i: int) -> dict:
        data = self._read(i, "text_at", "text_size", "caption")
        where = f"{self.name} {self.keys[i]}"
        text = data.decode("utf-8", "replace")
        if not self.index["text_json"][i]:
            return _text_record({"caption": text}, where)
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as err:
            raise BrokenRecord(f"{where}: invalid JSON ({err})") from None
        if not isinstance(fields, dict):
            raise BrokenRecord(f"{where}: the .json member must hold an object")
        return _text_record(fields, where)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, index) -> str:
        return f"{self.name} {self.keys[index]}"

    def __getitem__(self, index) -> dict:
        text = self._text(index)
        return {"image": self._read(index, "image_at", "image_size", "image"), **text}
