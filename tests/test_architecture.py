"""The package's shape: layers that import one way only, and objectives, tower families and
evaluators that a user adds from their own file, through the registries alone.

The layer table below is the one docs/architecture.md draws; a module may import from its own
layer or lower ones (imports inside functions count too), and the whole graph has no cycle.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import ml_collections
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from train_helpers import tiny_config

PACKAGE = REPO / "valign_jax"

# lowest first: a module imports only from its own layer and the ones above it in this list
LAYERS = [
    ("base", ["storage", "sharding", "losses", "ring_losses", "special_tokens"]),
    ("models", ["models", "models.*"]),
    ("core", ["peft", "optim", "hf", "hf_files", "build", "batched", "train_step",
              "checkpointing", "checkpoint_integrity"]),
    ("objectives", ["objectives", "objectives.*"]),
    ("data", ["data", "data.*"]),
    ("evaluators", ["evaluation", "evaluation.*"]),
    ("run", ["", "schema", "config_checks", "recipes", "workdir", "logs", "run_setup",
             "frozen_towers", "workdir_lock", "preemption", "cli", "train", "evaluate",
             "suite", "main", "api", "figures"]),
]


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int:
    short = module[len("valign_jax."):] if module != "valign_jax" else ""
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if short == pattern or (pattern.endswith(".*")
                                    and short.startswith(pattern[:-1])):
                return index
    raise AssertionError(f"{module} is in no layer of the table: add it")


def imports_of(path: Path, modules: dict) -> set[str]:
    """Every valign_jax module `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: the submodule a.b.c where there is one, else a.b itself
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        found |= {n for n in names if n == "valign_jax" or n.startswith("valign_jax.")}
    return found


def test_imports_go_one_way_and_have_no_cycle():
    modules = module_names()
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(sorted(upward))

    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle.extend(stack[stack.index(dep):] + [dep])
                return True
            if dep not in state and visit(dep, stack + [dep]):
                return True
        state[node] = "done"
        return False
    for module in sorted(graph):
        if module not in state and visit(module, [module]):
            break
    assert not cycle, " -> ".join(cycle)


# ---------------------------------------------------------------------------------------------
# A new objective


def test_a_toy_objective_registers_and_trains_through_the_one_loop(tmp_path):
    """Registers a hinge (triplet) objective with an option of its own, chooses it by name and
    trains two steps through train_and_evaluate: the loss it defines is what the run logs, its
    metric reaches the log, and the parameters moved. The loop and the step name no
    objective."""
    from valign_jax import objectives, train
    from valign_jax.objectives import Objective, ObjectiveKind

    def build(cfg, mesh):
        def loss(out, batch, rng):
            img, txt = objectives.unit(out["image"]), objectives.unit(out["text"])
            sim = img @ txt.T
            positive = jnp.diagonal(sim)
            hardest = jnp.max(sim - 10.0 * jnp.eye(sim.shape[0]), axis=1)
            value = jnp.mean(jax.nn.relu(cfg.toy_margin - positive + hardest))
            return value, {"toy_positive": positive.mean()}
        return Objective(loss)
    objectives.register(ObjectiveKind("toy_hinge", build, options={"toy_margin": 0.25}))
    try:
        config = tiny_config("clip", steps=2)
        config.objective.kind = "toy_hinge"
        with config.unlocked():
            config.objective.toy_margin = 0.5
        final = train.train_and_evaluate(config, tmp_path)
        assert final["step"] == 2
        events = (tmp_path / "metrics.jsonl").read_text()
        assert '"train/loss"' in events and final["train/loss"] > 0
        import valign_jax
        trained = valign_jax.load_trained(tmp_path)[1]
        start = json.loads((tmp_path / "config.json").read_text())["objective"]
        assert start["kind"] == "toy_hinge" and start["toy_margin"] == 0.5
        assert not np.allclose(trained["text_projection"]["kernel"], 0)
    finally:
        objectives.base._KINDS.pop("toy_hinge")
    for name in ("train.py", "train_step.py"):
        text = (PACKAGE / name).read_text()
        named = [k for k in ("softmax", "sigmoid", "clip_refine", "itm", "toy_hinge")
                 if re.search(rf"\b{k}\b", text)]
        assert not named, f"{name} names objectives {named}"


def test_an_objective_option_of_the_wrong_type_is_named():
    from valign_jax import objectives
    from valign_jax.config_checks import find_problems
    from valign_jax.objectives import Objective, ObjectiveKind
    objectives.register(ObjectiveKind("toy_hinge", lambda cfg, mesh: Objective(None),
                                      options={"toy_margin": 0.25}))
    try:
        values = tiny_config("clip").to_dict()  # a plain dict: ml_collections pins no types
        assert values["objective"]["toy_margin"] == 0.25  # the registered default
        values["objective"]["toy_margin"] = "wide"
        assert "config.objective.toy_margin: expected a number, got str 'wide'" in \
            find_problems(ml_collections.ConfigDict(values), devices=False)
    finally:
        objectives.base._KINDS.pop("toy_hinge")


# ---------------------------------------------------------------------------------------------
# A new tower family


def _toy_family():
    import dataclasses
    from typing import ClassVar

    from valign_jax.models.config import TowerConfig
    from valign_jax.models.registry import TowerFamily

    @dataclasses.dataclass(frozen=True)
    class ToyImageConfig(TowerConfig):
        """Pixels -> a linear layer per patch row -> LayerNorm -> mean."""
        model_type: ClassVar[str] = "toy_image"
        hidden_size: int = 16
        image_size: int = 8
        num_channels: int = 3

    class ToyImageTower(nn.Module):
        config: ToyImageConfig
        LAYER_PATHS: ClassVar[tuple] = ()

        @nn.compact
        def __call__(self, pixel_values):
            cfg = self.config
            rows = pixel_values.reshape(pixel_values.shape[0], cfg.image_size, -1)
            hidden = nn.Dense(cfg.hidden_size, name="embed")(rows)
            hidden = nn.LayerNorm(name="toy_norm")(hidden)
            return {"last_hidden_state": hidden, "pooled": hidden.mean(axis=1)}

    return TowerFamily(config=ToyImageConfig, module=ToyImageTower, modality="image",
                       hf_class="ToyImageModel", weight_prefixes=("", "toy"),
                       norm_names=("toy_norm",), presets={"toy_tiny": ToyImageConfig})


@pytest.fixture
def toy_family():
    from valign_jax.models import registry
    family = registry.register(_toy_family())
    yield family
    registry._FAMILIES.pop(family.name)
    registry._BY_CONFIG.pop(family.config)


def test_a_toy_tower_family_gives_a_dry_run_report_a_train_step_and_hf_files(toy_family,
                                                                              tmp_path):
    """Registers a toy image-tower family (config, module, HF mapping, norm names, a preset)
    and uses it by preset name: the dry run's parameter report shows its LayerNorm trainable
    under LN tuning and nothing else of it; one train step runs; save_tower writes an HF
    directory that load_tower reads back to the same parameters."""
    from valign_jax import hf, sharding, train
    from valign_jax.main import dry_run
    from valign_jax.models.layout import abstract_params
    from valign_jax.run_setup import build_model, initial_params

    config = tiny_config("clip")
    config.model.image = config.model.image.copy_and_resolve_references()
    config.model.image.preset = "toy_tiny"
    config.model.image.image_size = 8
    config.peft.recipe = "lilt_ln"
    report = dry_run(config)
    image_rows = [line for line in report.splitlines() if line.startswith("vision_model")]
    assert image_rows and all(" 0.00%" not in r or "embed" in r for r in image_rows), report
    model = build_model(config)
    shapes = abstract_params(model)
    from valign_jax import peft
    labels = peft.make_labels(shapes, "lilt_ln")
    assert labels["vision_model"]["toy_norm"]["scale"] == peft.TRAINABLE
    assert labels["vision_model"]["embed"]["kernel"] == peft.FROZEN

    mesh = sharding.make_mesh(1, 1)
    trainer = train.make_trainer(config, model, mesh, total_steps=2)
    state = trainer.init_state(initial_params(config, model, trainer.param_sh))
    rng = np.random.default_rng(0)
    batch = {"pixel_values": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
             "input_ids": rng.integers(4, 100, size=(8, 16)).astype(np.int32),
             "attention_mask": np.ones((8, 16), np.int32)}
    before = np.asarray(state.params["vision_model"]["toy_norm"]["scale"])
    state, metrics = trainer.train_step(state, sharding.global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(state.params["vision_model"]["toy_norm"]["scale"], before)

    tower = toy_family.module(toy_family.presets["toy_tiny"]())
    params = jax.device_get(state.params["vision_model"])
    hf.save_tower(tower, params, tmp_path / "toy", formats=("safetensors",))
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["architectures"] == [
        "ToyImageModel"]
    _, loaded = hf.load_tower(tmp_path / "toy")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ---------------------------------------------------------------------------------------------
# A new evaluator


def test_an_evaluator_from_the_config_runs_on_its_own_schedule(tmp_path):
    """Registers an evaluator type (the mean norm of the projected image features of a few
    fixed images), adds it through config.evals with every=3 in a 6-step run that evaluates
    the others every 2: its metric is in metrics.jsonl at steps 0, 3 and 6 only, the others
    at 0, 2, 4 and 6."""
    from valign_jax import schema, train
    from valign_jax.evaluation import registry

    class MeanNorm:
        def __init__(self, ctx, entry):
            self.encoder, self.scale = ctx.encoder, entry.scale
            self.images = np.random.default_rng(0).normal(
                size=(4, ctx.image_size, ctx.image_size, 3)).astype(np.float32)

        def __call__(self, params):
            features = self.encoder.images(params, self.images)
            return {"toy/mean_norm": self.scale * float(np.linalg.norm(features, axis=1).mean())}
    registry.register_evaluator(registry.EvaluatorType("toy_mean_norm", MeanNorm,
                                                       options={"scale": 1.0}))
    try:
        config = tiny_config("clip", steps=6)
        config.eval_every, config.checkpoint_every = 2, 6
        config.eval.zeroshot = ""
        with config.unlocked():
            config.evals.toy = schema.eval_entry("toy_mean_norm", every=3, scale=2.0)
        train.train_and_evaluate(config, tmp_path)
    finally:
        registry._TYPES.pop("toy_mean_norm")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "toy/mean_norm" in m] == [0, 3, 6]
    assert [m["step"] for m in lines if "retrieval/t2i_r1" in m] == [0, 2, 4, 6]
    assert all(m["toy/mean_norm"] > 0 for m in lines if "toy/mean_norm" in m)


def test_an_unknown_evaluator_type_or_option_is_named():
    from valign_jax.config_checks import find_problems
    config = tiny_config("clip")
    config.evals.retrieval.type = "retrieve"
    assert any("config.evals.retrieval.type: unknown evaluator type 'retrieve'" in p
               for p in find_problems(config, devices=False))
    config = tiny_config("clip")
    config.evals.zeroshot.evry = 3
    assert any("config.evals.zeroshot.evry: unknown key; did you mean 'every'?" in p
               for p in find_problems(config, devices=False))


# ---------------------------------------------------------------------------------------------
# Configs, hooks and docs


def test_config_checks_need_no_configs_folder_on_the_path(tmp_path):
    """In a fresh interpreter started elsewhere, with configs/ absent from sys.path, a recipe
    file loads and its config is checked (the schema is in the package); no recipe file
    touches sys.path."""
    script = ("import sys; from valign_jax.recipes import load_config; "
              "from valign_jax.config_checks import check_config; "
              "assert not any(p.endswith('configs') for p in sys.path); "
              f"check_config(load_config({str(REPO / 'configs' / 'fusion.py')!r} + ':demo'), "
              "devices=False); print('checked')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-2000:]
    for recipe in (REPO / "configs").glob("*.py"):
        assert "sys.path" not in recipe.read_text(), recipe


def test_production_code_reads_no_test_hook():
    hooks = [f"{p.relative_to(REPO)}" for p in PACKAGE.rglob("*.py")
             if re.search(r"VALIGN_TEST|sigkill_|SIGKILL_AT", p.read_text())]
    assert not hooks, hooks


def test_the_repository_refers_to_no_file_outside_it():
    """Nothing points to the private design notes; the docs the code cites exist."""
    proc = subprocess.run(["git", "grep", "-n", "-I", "-E", r"METHODS\.md|DESIGN\.md|\.\./shared"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.stdout == "", proc.stdout[:2000]
    cited = set()
    for path in list(PACKAGE.rglob("*.py")) + list((REPO / "configs").glob("*.py")) + [
            REPO / "README.md"]:
        cited |= set(re.findall(r"docs/[a-z_]+\.md", path.read_text()))
    assert cited, "the code cites no docs page"
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, missing


def test_transformers_is_not_capped_for_users():
    """install_requires names transformers without an upper bound (users on transformers 5 keep
    it; only its tokenizers are used at run time); the test extra pins the version whose Flax
    classes the reference tests need."""
    text = (REPO / "setup.cfg").read_text()
    runtime = text.split("[options]")[1].split("[options.packages.find]")[0]
    line = next(l.strip() for l in runtime.splitlines() if l.strip().startswith("transformers"))
    assert "<" not in line, line
    test_extra = text.split("test =")[1].split("\n\n")[0]
    assert re.search(r"transformers.*<4\.58", test_extra), test_extra
