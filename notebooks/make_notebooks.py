"""Writes the Colab notebooks of this directory from the cells below, without outputs:

    python notebooks/make_notebooks.py

Edit the cells here, never the .ipynb files: the notebooks are generated so that they stay
diffable and free of outputs (tests/test_notebooks.py checks both, and runs each notebook end to
end with VALIGN_NOTEBOOK_SMALL=1).

Every notebook starts with a code cell tagged "parameters" (papermill's convention: a runner may
insert a cell after it that overrides the values), then the cell that installs valign_jax on
Colab and the shared set-up. After that each step is one call of the package's public API
(valign_jax/api.py: load, load_images, zero_shot, recipe, plot_predictions, plot_metrics; and
valign_jax.train.train_and_evaluate, valign_jax.evaluate.evaluate) plus what it prints or draws:
no helper is defined in a notebook and no internal module is imported.
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

import valign_jax

# Keep compiled programs on disk: rerunning a cell, or the notebook, skips compiling them again.
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache/valign_jax/xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
print(f"valign_jax {valign_jax.__version__}; devices: {jax.devices()}")'''

# ---------------------------------------------------------------------------------------------
# zero_shot.ipynb


ZERO_SHOT = [
    ("md", """\
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
predicted labels. Each step is one call: `valign_jax.load`, `valign_jax.load_images`,
`valign_jax.zero_shot`, `valign_jax.plot_predictions`."""),
    ("parameters", SMALL_SWITCH + """

MODEL = "openai/clip-vit-base-patch32"  # HF hub id, local HF CLIP directory, or a training workdir
IMAGES = "synthetic:shapes"   # or a directory of class folders: <root>/<class name>/<images>
TEMPLATES = "auto"            # "auto" | "single" | "clip7" | "clip80" | ["a photo of a {}.", ...]
NUM_IMAGES = 64 if SMALL else 512   # images classified; the accuracy is over these
SHOW = 8 if SMALL else 16           # images in the grid
""" + REPO_URL),
    ("code", INSTALL),
    ("code", SETUP),
    ("md", """\
## Load the model

`valign_jax.load` reads a training workdir (`model.json`: the architecture; `config.json`: the
recipe, which says how the run tokenised captions and normalised pixels; the latest orbax
checkpoint) or an HF checkpoint, which brings its own tokenizer and pixel statistics
(`preprocessor_config.json`)."""),
    ("code", """\
model = valign_jax.load(MODEL)
print(model)"""),
    ("md", """\
## The images

`valign_jax.load_images` reads the same data strings a training config takes and resizes and
centre-crops each image to the model's size, as a run's evaluation does. The synthetic shapes
are drawn at any size, so a 224 px CLIP sees them sharp. From a larger folder it takes a
random sample of `NUM_IMAGES`, so every class can appear."""),
    ("code", """\
data = valign_jax.load_images(IMAGES, model.image_size, limit=NUM_IMAGES)
print(data)"""),
    ("md", """\
## Classify

`valign_jax.zero_shot` writes every class name into the templates (`"auto"`: the shapes' own;
CLIP's 80 for other data), embeds images and prompts in batches and builds one embedding per
class from its prompts (normalise, average over templates, normalise again): the code the
training loop's zero-shot evaluation runs, so on a run's own held-out shapes the accuracy is
the one it logged."""),
    ("code", """\
result = valign_jax.zero_shot(model, data, templates=TEMPLATES)
print(result)
print(f"chance: {1 / len(data.class_names):.3f}; {len(result.templates)} prompts per class, "
      f"e.g. {result.templates[0].format(data.class_names[0])!r}")"""),
    ("md", """\
## Predictions

Each image with its most probable class and that probability; green when it is the true
class, red otherwise (the true class in brackets). `result.probs` holds every class's
probability, `result.predicted` the chosen class of each image."""),
    ("code", """\
valign_jax.plot_predictions(data, result, count=SHOW)"""),
    ("md", """\
## Try your own

- `MODEL`: another CLIP on the hub with safetensors or Flax weights (e.g.
  `openai/clip-vit-large-patch14`), or the workdir of a run from `train.ipynb` /
  `python -m valign_jax.main`.
- `IMAGES`: a folder of class folders; the folder names are the class names written into the
  prompts, so name them as you would say them ("golden retriever", not "n02099601"), or give
  `load_images(..., class_names=[...])` the names to use.
- `TEMPLATES`: `"clip80"` is CLIP's 80-prompt ensemble, `"single"` LiLT's "a photo of {}"."""),
]


# ---------------------------------------------------------------------------------------------
# train.ipynb


TRAIN = [
    ("md", """\
# Train a recipe, watch it in TensorBoard, evaluate it

valign_jax trains every recipe (CLIP, SigLIP, LiT, LiLT, SAIL, CLIP-Refine) with one loop;
a recipe is a config file in `configs/`. This notebook trains `configs/clip.py:demo`: a tiny
CLIP (both towers and projections trained with the softmax contrastive loss) on the embedded
synthetic shapes, offline. It is what

    python -m valign_jax.main --config=configs/clip.py:demo --workdir=workdirs/notebook_train

does, and takes about a minute on a CPU. The run evaluates at step 0 and every 125 steps
(image-text retrieval, zero-shot classification, the modality gap) into
`<workdir>/metrics.jsonl` and TensorBoard. Then `valign_jax.evaluate.evaluate` evaluates the
last checkpoint and draws two plots: the joint embedding space, and how far training moved
each LayerNorm."""),
    ("parameters", SMALL_SWITCH + """

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
""" + REPO_URL),
    ("code", INSTALL),
    ("code", SETUP),
    ("md", """\
## The recipe

`valign_jax.recipe` reads `configs/<recipe>.py:<argument>` as `--config=` does (relative to
the working directory or to the repository) and sets the keys given (a None value keeps the
recipe's own); it also gives the command line that makes the same config with
`--config.<key>=<value>` flags."""),
    ("code", """\
recipe = valign_jax.recipe(COCO_CONFIG if COCO else CONFIG, {
    "total_steps": STEPS, "data.num_eval": NUM_EVAL, "batch_size": BATCH_SIZE})
print(recipe)
print("the same run from a shell:\\n  " + recipe.command(WORKDIR))"""),
    ("md", """\
## Train

`valign_jax.train.train_and_evaluate` is the loop behind `python -m valign_jax.main`: it
checks the config and every data path first, writes `config.json` and `model.json`, trains,
evaluates, and saves orbax checkpoints (the parameters, the optimizer state and the data
iterator's position) into the workdir. Its progress (steps/s, ETA) and the training loss go to
TensorBoard. Rerunning this cell resumes from the latest checkpoint; a finished run returns at
once with its last evaluation."""),
    ("code", """\
metrics = valign_jax.train.train_and_evaluate(recipe.config, WORKDIR)
print(f"finished at step {metrics['step']}:",
      {k: round(v, 4) for k, v in metrics.items() if k.endswith(("_r1", "top1", "/gap"))})"""),
    ("md", """\
## The curves

`metrics.jsonl` has one line per evaluation (`valign_jax.logged_metrics(WORKDIR)` reads it);
`valign_jax.plot_metrics` draws retrieval R@1, zero-shot top-1 and the modality gap against
the step (or the metrics you name). TensorBoard has the same values, and the training loss at
every `log_every` steps."""),
    ("code", """\
valign_jax.plot_metrics(WORKDIR)"""),
    ("code", """\
# TensorBoard inline (Colab, Jupyter); elsewhere run the printed command in a shell.
if TENSORBOARD:
    %load_ext tensorboard
    %tensorboard --logdir {WORKDIR}
else:
    print(f"TensorBoard: tensorboard --logdir {WORKDIR}")"""),
    ("md", """\
## Evaluate the checkpoint

`valign_jax.evaluate.evaluate` (also `python -m valign_jax.evaluate --workdir=...`) runs the
evaluators the training loop runs on the latest checkpoint and writes
`<workdir>/eval/step_<N>.json` with two plots beside it:
- `*_pca.png`: image and text embeddings along the gap between the two modalities' centroids
  and the main direction of the rest; their distance in the full space is the modality gap,
  `geometry/gap` (`modality_gap.ipynb` closes it).
- `*_ln_shift.png`: how far training moved each layer's LayerNorm scale and bias (LiLT's
  Fig. 4), against depth."""),
    ("code", """\
from IPython.display import Image, display

report = valign_jax.evaluate.evaluate(workdir=WORKDIR)
for key, value in sorted(report["metrics"].items()):
    if key.endswith(("_r1", "_r5", "top1", "/gap", "alignment", "uniformity", "pearson_r")):
        print(f"{key:45s} {value:.4f}")
print("written:", report["file"])
for path in report["plots"].values():
    display(Image(filename=path))"""),
]


# ---------------------------------------------------------------------------------------------
# modality_gap.ipynb


MODALITY_GAP = [
    ("md", """\
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
        --workdir=workdirs/notebook_clip_refine"""),
    ("parameters", SMALL_SWITCH + """

CONFIG = "configs/clip_refine.py:demo"
PRETRAIN_CONFIG = "configs/clip.py:demo,fixed_scale"  # what the refine demo's config.pretrain names
WORKDIR = "workdirs/notebook_clip_refine"  # the refined run; the pretrained one in WORKDIR/pretrain
PRETRAIN_STEPS = 300 if SMALL else None   # None: the pretraining recipe's own (500)
REFINE_STEPS = 100 if SMALL else None     # None: CLIP-Refine's own (400)
NUM_EVAL = 128 if SMALL else None         # held-out images per evaluation (None: 512)
""" + REPO_URL),
    ("code", INSTALL),
    ("code", SETUP),
    ("md", """\
## Stage 1: a pretrained CLIP

The refine demo names its pretraining stage in `config.pretrain`
(`configs/clip.py:demo,fixed_scale`); the command line trains it into `<workdir>/pretrain`
before refining. Here it is a step of its own: the recipe, then the training loop. Both stages
evaluate on the same held-out shapes (`data.num_eval`)."""),
    ("code", """\
pretrain = valign_jax.recipe(PRETRAIN_CONFIG, {"total_steps": PRETRAIN_STEPS,
                                               "data.num_eval": NUM_EVAL})
print(pretrain)"""),
    ("code", """\
PRETRAIN_DIR = f"{WORKDIR}/pretrain"
pretrained = valign_jax.train.train_and_evaluate(pretrain.config, PRETRAIN_DIR)
print(f"pretrained CLIP: step {pretrained['step']}, gap {pretrained['geometry/gap']:.3f}, "
      f"t2i R@1 {pretrained['retrieval/t2i_r1']:.3f}")"""),
    ("md", """\
## Stage 2: refine it

All parameters train with RaFA + HyCD (`config.objective.kind = "clip_refine"`, loss weights
CLIP 0, RaFA 1, HyCD 1) at a small constant learning rate, starting from the pretrained run
(`model.init_from`), whose parameters also stay as the frozen HyCD teacher; `pretrain` is
emptied, since stage 1 is done."""),
    ("code", """\
refine = valign_jax.recipe(CONFIG, {"total_steps": REFINE_STEPS, "data.num_eval": NUM_EVAL,
                                    "pretrain": "", "model.init_from": PRETRAIN_DIR})
print(refine)"""),
    ("code", """\
refined = valign_jax.train.train_and_evaluate(refine.config, WORKDIR)
print(f"refined: step {refined['step']}, gap {refined['geometry/gap']:.3f}, "
      f"t2i R@1 {refined['retrieval/t2i_r1']:.3f}")"""),
    ("md", """\
## Before and after

`valign_jax.evaluate.evaluate` runs the same evaluators on each workdir's last checkpoint:
the pretrained CLIP (before) and the refined one (after), on the same held-out shapes. It also
writes each run's PCA plot. (The refine run logged the "before" numbers too, at its step 0.)"""),
    ("code", """\
before = valign_jax.evaluate.evaluate(workdir=PRETRAIN_DIR, out=f"{WORKDIR}/eval/before.json")
after = valign_jax.evaluate.evaluate(workdir=WORKDIR, out=f"{WORKDIR}/eval/after.json")

rows = ["geometry/gap", "geometry/alignment", "geometry/uniformity", "retrieval/i2t_r1",
        "retrieval/t2i_r1", "retrieval/t2i_r5", "zeroshot/synthetic/top1"]
print(f"{'metric':28s} {'before':>8s} {'after':>8s}")
for key in rows:
    print(f"{key:28s} {before['metrics'][key]:8.3f} {after['metrics'][key]:8.3f}")"""),
    ("md", """\
- **gap**: the distance between the image and text centroids; lower is a smaller gap.
- **alignment**: the mean squared distance between an image and its caption (lower: closer).
- **uniformity**: log of the mean Gaussian potential over all pairs of embeddings (lower:
  spread more evenly over the sphere).
- Retrieval and zero-shot accuracy should hold or improve: HyCD keeps the model's knowledge."""),
    ("code", """\
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, (name, report) in zip(axes, (("before: pretrained CLIP", before),
                                     ("after: CLIP-Refine", after))):
    ax.imshow(plt.imread(report["plots"]["pca"]))  # the plot's own title gives the gap
    ax.set_title(name)
    ax.axis("off")
fig.tight_layout()
plt.show()"""),
    ("md", """\
The plots' first axis is the direction from the text centroid to the image centroid, so the
two centroids lie exactly the gap apart along it; the second is the main direction of what is
left.

To refine a real CLIP, run `configs/clip_refine.py` (OpenAI's ViT-B/32 on COCO captions; needs
the hub and `tfds build coco_captions`), and compare with the checkpoint as it was:

    python -m valign_jax.evaluate --hf=openai/clip-vit-base-patch32 \\
        --config=configs/clip_refine.py --out=before.json"""),
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
