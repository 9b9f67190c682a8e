"""The first hour with one's own data: captions in the user's own words reach the text tower,
mistakes print one FATAL line and leave nothing behind, and a run's log opens quietly."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from valign_jax.data import synthetic

from conftest import REPO
from reliability_helpers import child_env

# Rendered shapes named in words the embedded data never uses.
CLASSES = {"tomato": ("red", "circle"), "sky": ("blue", "square"),
           "banana": ("yellow", "triangle")}
CAPTIONS = ("a {}", "a photo of a {}", "there is a {} in the picture", "one {} here")


def render_dataset(root, per_class: int, seed: int):
    """<root>/pairs.jsonl (images with captions naming their class) and the same images as
    class folders <root>/classes/<name>/."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (colour, shape) in CLASSES.items():
        folder = root / "classes" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            attributes = {"count": "one", "size": str(rng.choice(synthetic.SIZES)),
                          "colour": colour, "shape": shape,
                          "position": str(rng.choice(synthetic.POSITIONS))}
            Image.fromarray(synthetic.render(attributes, 32, rng)).save(folder / f"{i}.png")
            caption = CAPTIONS[i % len(CAPTIONS)].format(name)
            rows.append({"image": f"classes/{name}/{i}.png", "caption": caption})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_the_users_own_words_reach_the_text_tower(tmp_path):
    """configs/clip.py:demo trained on a pairs.jsonl captioned "a tomato", "a sky", "a banana"
    (rendered red circles, blue squares, yellow triangles): the run learns a vocabulary from
    those captions (the log says how many tokens are unknown: none), and zero-shot top-1 on the
    class folders named the same ends well above chance (1/3; measured 0.975). With the embedded
    data's word list instead, the three prompts would be the same tokens, so zero-shot could
    only sit at chance."""
    data = render_dataset(tmp_path / "data", per_class=40, seed=0)
    workdir = tmp_path / "run"
    flags = {"data.train": data / "pairs.jsonl", "data.eval": data / "pairs.jsonl",
             "eval.zeroshot": data / "classes", "eval.templates": "single",
             "total_steps": 150, "eval_every": 150, "checkpoint_every": 150,
             "batch_size": 30, "eval.batch_size": 60, "log_every": 50}
    proc = subprocess.run([sys.executable, "-m", "valign_jax.main",
                           "--config=configs/clip.py:demo", f"--workdir={workdir}",
                           *[f"--config.{k}={v}" for k, v in flags.items()]],
                          cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of the training captions' tokens are unknown to it" in proc.stderr
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 150 and last["zeroshot/classes/top1"] >= 0.8, last

    words = synthetic.WordTokenizer(16)
    prompts = words([f"a photo of a {name}." for name in CLASSES])["input_ids"]
    assert (prompts == prompts[0]).all()  # the old behaviour: three identical class prompts


def test_the_learned_vocabulary_knows_the_users_words(tmp_path):
    """A vocabulary learned from captions in words outside the embedded list: no caption token
    is unknown, while the embedded word list loses every class word."""
    from valign_jax.data import tokenizer as tok
    captions = [t.format(name) for name in CLASSES for t in CAPTIONS] * 5
    tok.learn_tokenizer(captions, 512, tmp_path / "tok")
    learned = tok.Tokenizer(tmp_path / "tok", 16)
    share, lost = tok.unknown_words(learned, captions)
    assert share == 0 and lost == []
    ids = learned([f"a photo of a {name}" for name in CLASSES])["input_ids"]
    assert len({tuple(row) for row in ids}) == 3
    assert ids[0, 0] == synthetic.BOS_ID and synthetic.EOS_ID in ids[0]
    share, lost = tok.unknown_words(synthetic.WordTokenizer(16), captions)
    assert share > 0.1 and set(CLASSES) <= set(lost)


def run_main(*args, timeout=60):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "valign_jax.main", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("args, named", [
    (["--config=configs/lilt.py:nope"], "unknown config argument 'nope'"),
    (["--config=configs/nowhere.py:demo"], "config file 'configs/nowhere.py' not found"),
    (["--config=configs/clip.py:demo", "--config.eval.zeroshot=/no/such/classes"],
     "config.eval.zeroshot='/no/such/classes': /no/such/classes does not exist"),
    (["--config=configs/clip.py:demo", "--config.optim.warmup_step=5"],
     "unknown config key 'config.optim.warmup_step'"),
], ids=["argument", "path", "zeroshot-folder", "misspelt-key"])
def test_a_mistake_is_one_fatal_line_and_leaves_no_files(tmp_path, args, named):
    """Each mistake: exit 1 within 15 s, one FATAL line naming the problem, no traceback, and
    the workdir (existing, holding one file) gets no new file."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    proc, seconds = run_main(*args, f"--workdir={workdir}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and named in fatal[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert seconds < 15, seconds
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def test_a_failed_start_removes_what_it_made(tmp_path):
    """A start that fails after the checks (a zero-shot folder whose class folders hold no
    image, found only when the evaluator opens it) removes the workdir it created."""
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("no image here")
    workdir = tmp_path / "new"
    proc, _ = run_main("--config=configs/clip.py:demo", f"--workdir={workdir}",
                       f"--config.eval.zeroshot={tmp_path / 'classes'}", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "FATAL" in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())


def test_a_run_opens_quietly(tmp_path):
    """A demo run's first 20 log lines: no TPU probe, no TensorFlow banner, none over 300
    characters."""
    proc, _ = run_main("--config=configs/clip.py:demo", f"--workdir={tmp_path / 'run'}",
                       "--config.total_steps=2", "--config.eval_every=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stderr.splitlines()[:20]
    assert not [line for line in first if "Unable to initialize backend" in line
                or "oneDNN" in line or len(line) > 300], "\n".join(first)
