"""Writes the Colab notebooks of this directory from the cells below, without outputs:

    python notebooks/make_notebooks.py

Edit the cells here, never the .ipynb files: the notebooks are generated so that they stay
diffable and free of outputs (tests/test_notebooks.py checks both, and runs each notebook end to
end with VALIGN_NOTEBOOK_SMALL=1).

Every notebook starts with a code cell tagged "parameters" (papermill's convention: a runner may
insert a cell after it that overrides the values), then the cell that installs valign_jax on
Colab and the shared set-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SMALL_SWITCH = '''\
import os

# Small settings (VALIGN_NOTEBOOK_SMALL=1): less data and fewer steps, so the notebook runs in
# about a minute on a 2-core CPU; the tests run it this way. Default: the real demo.
SMALL = os.environ.get("VALIGN_NOTEBOOK_SMALL") == "1"'''

REPO_URL = '''\
REPO_URL = "https://github.com/OWNER/valign_jax.git"  # Colab: the repository to install from'''

INSTALL = '''\
# On Colab (or anywhere valign_jax is not installed yet): clone the repository and install it.
# Skipped where `import valign_jax` already works, e.g. after `pip install -e .` in a checkout.
import importlib.util
import sys

if importlib.util.find_spec("valign_jax") is None:
    if "OWNER" in REPO_URL:
        raise ValueError("REPO_URL (parameters cell): set it to the valign_jax repository's "
                         "git URL, e.g. https://github.com/<owner>/valign_jax.git")
    !git clone --depth 1 {REPO_URL} valign_jax_repo
    !pip install -q -e valign_jax_repo
    sys.path.insert(0, os.path.abspath("valign_jax_repo"))  # importable without a restart'''

SETUP = '''\
from pathlib import Path

import jax
import numpy as np

import valign_jax

# Keep compiled programs on disk: rerunning a cell, or the notebook, skips compiling them again.
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache/valign_jax/xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
print(f"valign_jax {valign_jax.__version__}; devices: {jax.devices()}")'''

# The notebooks that train read the recipes from the checkout valign_jax was installed from.
SETUP_WITH_RECIPES = SETUP + '''

# The recipes (configs/*.py) live in the repository checkout, next to the package.
REPO = Path(valign_jax.__file__).resolve().parents[1]
if not (REPO / "configs").is_dir():
    raise FileNotFoundError(f"{REPO / 'configs'} is missing: install valign_jax from a checkout "
                            f"of its repository (pip install -e .), which holds the recipes")'''

OVERRIDE = '''\
from valign_jax.recipes import load_config


def override(config, values: dict) -> list[str]:
    """Sets config keys ("data.num_eval": 128; a None value keeps the recipe's own) and returns
    the command-line flags that do the same for `python -m valign_jax.main`."""
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"override {key!r}: the config has no such key")
        node[leaf] = value
        flags.append(f"--config.{key}={value}")
    return flags'''


# ---------------------------------------------------------------------------------------------
# zero_shot.ipynb


ZERO_SHOT = [
    ("md", '''\
# Zero-shot classification with a CLIP model

A CLIP model embeds images and texts into one space. To classify an image without training a
classifier, write each class name into a few prompt templates ("a photo of a {}."), embed the
prompts with the text tower, average them per class, and pick the class whose embedding is
closest (cosine similarity) to the image's embedding. The model's learned logit scale turns
the similarities into probabilities.

This notebook does that for
- a Hugging Face CLIP checkpoint (a hub id such as `openai/clip-vit-base-patch32`, or a local
  directory with `config.json` and `model.safetensors`), or
- a model you trained with valign_jax (its workdir, e.g. from `train.ipynb`),

on the embedded synthetic shapes (24 classes: a colour and a shape) or on your own images in
class folders (`<root>/<class name>/<image files>`), and shows a grid of images with the
predicted labels.'''),
    ("parameters", SMALL_SWITCH + '''

MODEL = "openai/clip-vit-base-patch32"  # HF hub id, local HF CLIP directory, or a training workdir
IMAGES = "synthetic:shapes"   # or a directory of class folders: <root>/<class name>/<images>
TEMPLATES = "auto"            # "auto" | "single" | "clip7" | "clip80" | ["a photo of a {}.", ...]
NUM_IMAGES = 64 if SMALL else 512   # images classified; the accuracy is over these
SHOW = 8 if SMALL else 16           # images in the grid
''' + REPO_URL),
    ("code", INSTALL),
    ("code", SETUP),
    ("md", '''\
## Load the model

A training workdir holds `model.json` (the architecture), `config.json` (the recipe) and
orbax checkpoints; `valign_jax.load_trained` rebuilds the model and restores the latest
parameters, and the run's config says how it tokenised captions and normalised pixels. An HF
checkpoint brings its own tokenizer and pixel statistics (`preprocessor_config.json`).'''),
    ("code", '''\
import ml_collections

from valign_jax import checkpointing, hf
from valign_jax.data import pipeline
from valign_jax.run_setup import input_setup

if (Path(MODEL) / checkpointing.MODEL_JSON).is_file():  # a valign_jax training run
    model, params, config = valign_jax.load_trained(MODEL)
    image_size, collate = input_setup(config, model)
    tokenizer, mean, std = collate.tokenizer, collate.mean, collate.std
else:  # a Hugging Face CLIP checkpoint
    from valign_jax.data.tokenizer import Tokenizer
    model, params = hf.load_dual_encoder(MODEL)
    image_size = model.image_config.image_size
    tokenizer = Tokenizer(MODEL, max_length=model.text_config.max_position_embeddings)
    # Its preprocessor_config.json's mean and std; without one, pixels go to [-1, 1].
    mean, std = pipeline.normalization(ml_collections.ConfigDict({"checkpoint": MODEL}),
                                       ml_collections.ConfigDict({"image_mean": (0.5,) * 3,
                                                                  "image_std": (0.5,) * 3}))
print(f"{MODEL}: {image_size} px images, pixel mean {mean}, std {std}")'''),
    ("md", '''\
## The images and the prompts

`pipeline.make_source` reads the same data strings a training config takes; evaluation
resizes and centre-crops each image to the model's size. The synthetic shapes are drawn at any
size, so a 224 px CLIP sees them sharp. The templates are those the training loop's zero-shot
evaluation uses (`valign_jax/evaluation/templates.py`).'''),
    ("code", '''\
from valign_jax.evaluation.build import dataset_class_names
from valign_jax.evaluation.templates import templates_for

data = ml_collections.ConfigDict({"num_train": 0, "num_eval": NUM_IMAGES, "seed": 0})
source = pipeline.make_source(IMAGES, "eval", data, image_size, "IMAGES")
records = pipeline.eval_records(source, limit=NUM_IMAGES).records
images = np.stack([r["image"] for r in records])  # uint8 (N, H, W, 3)
labels = np.array([r["label"] for r in records])
class_names = list(dataset_class_names(source))
templates = templates_for(TEMPLATES, IMAGES, key="TEMPLATES")
print(f"{len(images)} images, {len(class_names)} classes, e.g. {class_names[:4]}")
example = templates[0].format(class_names[0])
print(f"{len(templates)} templates, e.g. {templates[0]!r}: {example!r}")'''),
    ("md", '''\
## Classify

The training loop's evaluation code embeds the images and prompts in batches
(`FeatureEncoder`) and builds one embedding per class from its prompts
(`zeroshot.class_embeddings`: normalise, average over templates, normalise again).'''),
    ("code", '''\
from valign_jax import sharding
from valign_jax.evaluation import zeroshot
from valign_jax.batched import FeatureEncoder, eval_batch_size
from valign_jax.evaluation.geometry import l2_normalize

mesh = sharding.make_mesh()  # every local device takes a slice of each batch
param_sh = sharding.tree_shardings(params, mesh)
placed = sharding.put(params, param_sh)
encoder = FeatureEncoder(model, mesh, param_sh, eval_batch_size(64, mesh))

image_features = encoder.images(placed, images, lambda x: pipeline.normalize(x, mean, std))
prompts = [t.format(name) for name in class_names for t in templates]  # class-major
class_features = zeroshot.class_embeddings(encoder.texts(placed, tokenizer(prompts)),
                                           len(class_names), len(templates))

scale = float(np.exp(params["logit_scale"]))  # CLIP's learned inverse temperature
logits = scale * l2_normalize(image_features, "image features") @ class_features.T
probs = np.asarray(jax.nn.softmax(logits, axis=1))
predicted = probs.argmax(axis=1)
metrics = zeroshot.zeroshot_metrics(image_features, class_features, labels)
print(f"top-1 accuracy {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f} over {len(labels)} "
      f"images (chance: {1 / len(class_names):.3f}); logit scale {scale:.1f}")'''),
    ("md", '''\
## Predictions

Each image with its most probable class and that probability; green when it is the true
class, red otherwise (the true class in brackets).'''),
    ("code", '''\
import math

import matplotlib.pyplot as plt

shown = min(SHOW, len(images))
cols = min(shown, 8)
rows = math.ceil(shown / cols)
fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= shown:
        continue
    ax.imshow(images[i])
    right = predicted[i] == labels[i]
    ax.set_title(f"{class_names[predicted[i]]} {probs[i, predicted[i]]:.0%}"
                 + ("" if right else f"\\n({class_names[labels[i]]})"),
                 color="green" if right else "red", fontsize=9)
fig.tight_layout()
plt.show()'''),
    ("md", '''\
## Try your own

- `MODEL`: another CLIP on the hub with safetensors or Flax weights (e.g.
  `openai/clip-vit-large-patch14`), or the workdir of a run from `train.ipynb` /
  `python -m valign_jax.main`.
- `IMAGES`: a folder of class folders; the folder names are the class names written into the
  prompts, so name them as you would say them ("golden retriever", not "n02099601").
- `TEMPLATES`: `"clip80"` is CLIP's 80-prompt ensemble, `"single"` LiLT's "a photo of {}".'''),
]


# ---------------------------------------------------------------------------------------------
# train.ipynb


TRAIN = [
    ("md", '''\
# Train a recipe, watch it in TensorBoard, evaluate it

valign_jax trains every recipe (CLIP, SigLIP, LiT, LiLT, SAIL, CLIP-Refine) with one loop;
a recipe is a config file in `configs/`. This notebook trains `configs/clip.py:demo`: a tiny
CLIP (both towers and projections trained with the softmax contrastive loss) on the embedded
synthetic shapes, offline. It is what

    python -m valign_jax.main --config=configs/clip.py:demo --workdir=workdirs/notebook_train

does, and takes about a minute on a CPU. The run evaluates at step 0 and every 125 steps
(image-text retrieval, zero-shot classification, the modality gap) into
`<workdir>/metrics.jsonl` and TensorBoard. Then `valign_jax.evaluate` evaluates the last
checkpoint and draws two plots: the joint embedding space, and how far training moved each
LayerNorm.'''),
    ("parameters", SMALL_SWITCH + '''

CONFIG = "configs/clip.py:demo"    # any recipe: configs/<recipe>.py:<variant>,<modifiers>
WORKDIR = "workdirs/notebook_train"  # checkpoints, metrics, TensorBoard logs; rerunning resumes
# COCO captions instead of the shapes: prepare them once (`tfds build coco_captions`, ~20 GB)
# and set COCO = True. Captions in English need real pretrained towers, so COCO_CONFIG is
# trained then (the demo's tiny towers only know the shapes' words).
COCO = False
COCO_CONFIG = "configs/lilt.py:lilt_lwa"  # frozen DeiT-B + BERT-base with adapters (a GPU run)
STEPS = 100 if SMALL else None       # None: the recipe's own (500 for the demo)
NUM_EVAL = 128 if SMALL else None    # held-out images per evaluation (None: the recipe's)
BATCH_SIZE = None                    # None: the recipe's (64 for the demo, 512 for COCO)
TENSORBOARD = not SMALL              # show TensorBoard inline (starts a TensorBoard server)
''' + REPO_URL),
    ("code", INSTALL),
    ("code", SETUP_WITH_RECIPES),
    ("md", '''\
## The recipe

`load_config` reads `configs/<recipe>.py:<argument>` as `--config=` does; the values set here
are what `--config.<key>=<value>` flags would set on the command line.'''),
    ("code", OVERRIDE + '''


spec = COCO_CONFIG if COCO else CONFIG
if COCO:  # fail now, with the command that prepares the data, rather than after loading towers
    from valign_jax.data.sources import open_source
    open_source("tfds:coco_captions/train", "COCO")
config = load_config(str(REPO / spec))
flags = override(config, {"total_steps": STEPS, "data.num_eval": NUM_EVAL,
                          "batch_size": BATCH_SIZE})
print(f"data: train {config.data.train}, eval {config.data.eval}, zero-shot "
      f"{config.eval.zeroshot or '-'}")
print(f"towers: {config.model.image.preset} + {config.model.text.preset}; "
      f"objective {config.objective.kind}; batch {config.batch_size}; "
      f"steps {config.total_steps or f'{config.num_epochs} epochs'}")
print("the same run from a shell:\\n  python -m valign_jax.main "
      + " ".join([f"--config={spec}", f"--workdir={WORKDIR}", *flags]))'''),
    ("md", '''\
## Train

`train.train_and_evaluate` is the loop behind `python -m valign_jax.main`: it writes
`config.json` and `model.json`, trains, evaluates, and saves orbax checkpoints (the parameters,
the optimizer state and the data iterator's position) into the workdir. Its progress (steps/s,
ETA) and the training loss go to TensorBoard. Rerunning this cell resumes from the latest
checkpoint; a finished run returns at once.'''),
    ("code", '''\
from valign_jax import train
from valign_jax.main import summary

metrics = train.train_and_evaluate(config, WORKDIR)
print(summary(WORKDIR, metrics))'''),
    ("md", '''\
## The curves

`metrics.jsonl` has one line per evaluation; the same values, and the training loss at every
`log_every` steps, are in TensorBoard.'''),
    ("code", '''\
import json

import matplotlib.pyplot as plt

logged = [json.loads(line) for line in open(Path(WORKDIR) / "metrics.jsonl")]
steps = [m["step"] for m in logged]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for key in ("retrieval/i2t_r1", "retrieval/t2i_r1", "zeroshot/synthetic/top1"):
    if key in logged[-1]:
        axes[0].plot(steps, [m.get(key) for m in logged], marker="o", label=key)
axes[0].set(xlabel="step", ylabel="accuracy", title="held-out retrieval and zero-shot")
axes[0].legend()
axes[1].plot(steps, [m["geometry/gap"] for m in logged], marker="o")
axes[1].set(xlabel="step", ylabel="distance", title="modality gap (centroid distance)")
fig.tight_layout()
plt.show()'''),
    ("code", '''\
# TensorBoard inline (Colab, Jupyter); elsewhere run the printed command in a shell.
if TENSORBOARD:
    %load_ext tensorboard
    %tensorboard --logdir {WORKDIR}
else:
    print(f"TensorBoard: tensorboard --logdir {WORKDIR}")'''),
    ("md", '''\
## Evaluate the checkpoint

`valign_jax.evaluate.evaluate` (also `python -m valign_jax.evaluate --workdir=...`) runs the
evaluators the training loop runs on the latest checkpoint and writes
`<workdir>/eval/step_<N>.json` with two plots beside it:
- `*_pca.png`: image and text embeddings in their first two principal components, with each
  modality's centroid; the distance between the centroids in the full space is the modality
  gap, `geometry/gap` (`modality_gap.ipynb` closes it).
- `*_ln_shift.png`: how far training moved each layer's LayerNorm scale and bias (LiLT's
  Fig. 4), against depth.'''),
    ("code", '''\
from IPython.display import Image, display

from valign_jax import evaluate

result = evaluate.evaluate(workdir=WORKDIR)
for key, value in sorted(result["metrics"].items()):
    if key.endswith(("_r1", "_r5", "top1", "/gap", "alignment", "uniformity", "pearson_r")):
        print(f"{key:45s} {value:.4f}")
print("written:", result["file"])
for name, path in result["plots"].items():
    display(Image(filename=path))'''),
]


# ---------------------------------------------------------------------------------------------
# modality_gap.ipynb


MODALITY_GAP = [
    ("md", '''\
# The modality gap, before and after CLIP-Refine

A trained CLIP puts image embeddings and text embeddings in two separate regions of the unit
sphere: the **modality gap**, measured here as the distance between the two modalities'
centroids (`geometry/gap`). CLIP-Refine (Yamaguchi et al., 2025) closes it with a short
post-training:
- **RaFA** pulls image and text features towards the same random references drawn from a
  Gaussian, so both modalities spread over one shared distribution;
- **HyCD** distils the frozen starting model's image-text similarities (mixed with the
  identity), so the model keeps what it knew.

Offline there is no pretrained CLIP to refine, so the demo (`configs/clip_refine.py:demo`)
first trains a tiny CLIP on the synthetic shapes with its logit scale held at 100, as OpenAI's
CLIP ends its training, which leaves a gap; then it refines that model. Both stages are shown
below; with default settings this is exactly

    python -m valign_jax.main --config=configs/clip_refine.py:demo \\
        --workdir=workdirs/notebook_clip_refine'''),
    ("parameters", SMALL_SWITCH + '''

CONFIG = "configs/clip_refine.py:demo"
WORKDIR = "workdirs/notebook_clip_refine"  # the refined run; the pretrained one in WORKDIR/pretrain
PRETRAIN_STEPS = 300 if SMALL else None   # None: the pretraining recipe's own (500)
REFINE_STEPS = 100 if SMALL else None     # None: CLIP-Refine's own (400)
NUM_EVAL = 128 if SMALL else None         # held-out images per evaluation (None: 512)
''' + REPO_URL),
    ("code", INSTALL),
    ("code", SETUP_WITH_RECIPES),
    ("md", '''\
## Stage 1: a pretrained CLIP

The refine config names its pretraining stage in `config.pretrain`
(`configs/clip.py:demo,fixed_scale`). The command line trains it into `<workdir>/pretrain`
before refining; here it is a step of its own.'''),
    ("code", OVERRIDE + '''


from valign_jax import train

refine_config = load_config(str(REPO / CONFIG))
pretrain_config = load_config(refine_config.pretrain)
print(f"pretraining stage: {refine_config.pretrain}")
for cfg, steps in ((pretrain_config, PRETRAIN_STEPS), (refine_config, REFINE_STEPS)):
    override(cfg, {"total_steps": steps, "data.num_eval": NUM_EVAL})  # both on one eval split

PRETRAIN_DIR = str(Path(WORKDIR) / "pretrain")
pretrained = train.train_and_evaluate(pretrain_config, PRETRAIN_DIR)
print(f"pretrained CLIP: step {pretrained['step']}, gap {pretrained['geometry/gap']:.3f}, "
      f"t2i R@1 {pretrained['retrieval/t2i_r1']:.3f}")'''),
    ("md", '''\
## Stage 2: refine it

All parameters train with RaFA + HyCD (`config.objective.kind = "clip_refine"`, loss weights
CLIP 0, RaFA 1, HyCD 1) at a small constant learning rate, starting from the pretrained run
(`config.model.init_from`), whose parameters also stay as the frozen HyCD teacher.'''),
    ("code", '''\
refine_config.pretrain = ""  # done above
refine_config.model.init_from = PRETRAIN_DIR
refined = train.train_and_evaluate(refine_config, WORKDIR)
print(f"refined: step {refined['step']}, gap {refined['geometry/gap']:.3f}, "
      f"t2i R@1 {refined['retrieval/t2i_r1']:.3f}")'''),
    ("md", '''\
## Before and after

`valign_jax.evaluate.evaluate` runs the same evaluators on each workdir's last checkpoint:
the pretrained CLIP (before) and the refined one (after), on the same held-out shapes. It also
writes each run's PCA plot. (The refine run logged the "before" numbers too, at its step 0.)'''),
    ("code", '''\
from valign_jax import evaluate

eval_dir = Path(WORKDIR) / "eval"
before = evaluate.evaluate(workdir=PRETRAIN_DIR, out=eval_dir / "before.json")
after = evaluate.evaluate(workdir=WORKDIR, out=eval_dir / "after.json")

rows = ["geometry/gap", "geometry/alignment", "geometry/uniformity", "retrieval/i2t_r1",
        "retrieval/t2i_r1", "retrieval/t2i_r5", "zeroshot/synthetic/top1"]
print(f"{'metric':28s} {'before':>8s} {'after':>8s}")
for key in rows:
    print(f"{key:28s} {before['metrics'][key]:8.3f} {after['metrics'][key]:8.3f}")'''),
    ("md", '''\
- **gap**: the distance between the image and text centroids; lower is a smaller gap.
- **alignment**: the mean squared distance between an image and its caption (lower: closer).
- **uniformity**: log of the mean Gaussian potential over all pairs of embeddings (lower:
  spread more evenly over the sphere).
- Retrieval and zero-shot accuracy should hold or improve: HyCD keeps the model's knowledge.'''),
    ("code", '''\
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, (name, result) in zip(axes, (("before: pretrained CLIP", before),
                                     ("after: CLIP-Refine", after))):
    ax.imshow(plt.imread(result["plots"]["pca"]))  # the plot's own title gives the gap
    ax.set_title(name)
    ax.axis("off")
fig.tight_layout()
plt.show()'''),
    ("md", '''\
The PCA plots show the two directions along which the embeddings vary most, with each
modality's centroid marked; the gap may lie mostly along other directions of the space, so the
`gap` number (measured in the full space) is the one to read.

To refine a real CLIP, run `configs/clip_refine.py` (OpenAI's ViT-B/32 on COCO captions; needs
the hub and `tfds build coco_captions`), and compare with the checkpoint as it was:

    python -m valign_jax.evaluate --hf=openai/clip-vit-base-patch32 \\
        --config=configs/clip_refine.py --out=before.json'''),
]


NOTEBOOKS = {"zero_shot": ZERO_SHOT, "train": TRAIN, "modality_gap": MODALITY_GAP}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name` (a key of NOTEBOOKS), with stable cell ids so reruns of this script
    produce identical files."""
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        if kind == "md":
            cell = new_markdown_cell(source)
        else:
            cell = new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell.id = f"{name}-{i:02d}"
        cells.append(cell)
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })
    nbformat.validate(notebook)
    return notebook


def write_all(directory: Path = HERE) -> list[Path]:
    paths = []
    for name in NOTEBOOKS:
        path = Path(directory) / f"{name}.ipynb"
        path.write_text(nbformat.writes(build(name)) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {written}")
