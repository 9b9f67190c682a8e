"""The compositional and few-shot evaluator types on real tiny models, against brute force: the
model applied image by image and caption by caption, and the metrics' definitions written out as
loops (Winoground's text / image / group scores, "the true caption scores strictly highest",
the ridge probe of test_fewshot). Their checks name a missing file before any model is built."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from valign_jax import config_checks, sharding, train
from valign_jax.data import synthetic
from valign_jax.data.relations import RelationTwins, captions, negative_scenes
from valign_jax.evaluation import fewshot
from valign_jax.evaluation.build import make_evaluator
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.recipes import eval_entry
from valign_jax.run_setup import build_model, input_setup

from test_fewshot import _loop_probe
from train_helpers import tiny_config


def built(recipe, evals):
    """(config, model, host params, evaluators, placed params, make) of a freshly initialised
    tiny model whose config.evals is `evals`; make() builds its evaluators again (after a
    change to the config)."""
    config = tiny_config(recipe)
    config.evals = ml_collections.ConfigDict(evals)
    config_checks.check_config(config)
    model = build_model(config)
    init = jax.jit(lambda rng: model.init(rng, **model.dummy_inputs())["params"])
    params = jax.device_get(init(jax.random.PRNGKey(1)))
    mesh = sharding.make_mesh(1, 1)
    param_sh = sharding.tree_shardings(params, mesh, config.mesh.min_fsdp_size)
    image_size, collate = input_setup(config, model)

    def make():
        return make_evaluator(config, model, mesh, param_sh, collate, image_size)
    return config, model, params, make(), sharding.put(params, param_sh), make


class Apply:
    """The model one example at a time, as the brute force uses it (each method jitted, each
    image and caption encoded once)."""

    def __init__(self, config, model, params):
        self.model, self.params = model, params
        self.tokenizer = synthetic.WordTokenizer(config.model.text.max_length)
        self._jitted, self._memo = {}, {}

    def __call__(self, method, *args):
        if method not in self._jitted:
            self._jitted[method] = jax.jit(
                lambda p, *a: self.model.apply({"params": p}, *a, method=method))
        return self._jitted[method](self.params, *args)

    def _once(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def pixels(self, image):
        return ((np.asarray(image, np.float32) / 255 - 0.5) / 0.5)[None]

    def image_tokens(self, image):
        """(feature float64, tokens) of one image."""
        return self._once(("image", np.asarray(image).tobytes()), lambda: (
            lambda f, t: (np.asarray(f, np.float64)[0], t))(
                *self(DualEncoder.encode_image_tokens, self.pixels(image))))

    def text_tokens(self, caption):
        """(feature float64, tokens, mask) of one caption."""
        def compute():
            t = self.tokenizer([caption])
            f, tokens = self(DualEncoder.encode_text_tokens, t["input_ids"], t["attention_mask"])
            return np.asarray(f, np.float64)[0], tokens, t["attention_mask"]
        return self._once(("text", caption), compute)

    def cosine(self, image, caption):
        x, y = self.image_tokens(image)[0], self.text_tokens(caption)[0]
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    def rerank(self, image, caption, weight):
        """Match head logit + weight * cosine, the pair alone through the model."""
        _, itok = self.image_tokens(image)
        _, ttok, mask = self.text_tokens(caption)
        logit = float(np.asarray(self(DualEncoder.match_logits, itok, ttok, mask)).reshape(-1)[0])
        return logit + weight * self.cosine(image, caption)


def pooled(module, pixel_values):
    """The image tower's pooled output."""
    return module.vision_model(pixel_values)["pooled"]


def loop_choice(items, score):
    """Share of (image, caption, negatives) whose caption scores strictly above every negative."""
    hits = 0
    for image, caption, negatives in items:
        s = score(image, caption)
        hits += all(s > score(image, n) for n in negatives)
    return hits / len(items)


def loop_groups(groups, score):
    """Winoground's scores of ((I0, I1), (C0, C1)) groups, written as the paper defines them."""
    text = image = group = 0
    for (i0, i1), (c0, c1) in groups:
        t = score(i0, c0) > score(i0, c1) and score(i1, c1) > score(i1, c0)
        i = score(i0, c0) > score(i1, c0) and score(i1, c1) > score(i0, c1)
        text, image, group = text + t, image + i, group + (t and i)
    n = len(groups)
    return {"text": text / n, "image": image / n, "group": group / n}


def relation_sets(num_groups, image_size, seed):
    twins = RelationTwins(num_groups, image_size, seed)
    items = [(twins[i], captions(twins.scene(i))[0],
              [captions(s)[0] for s in negative_scenes(twins.scene(i))])
             for i in range(len(twins))]
    groups = [((twins[2 * g], twins[2 * g + 1]),
               (captions(twins.scene(2 * g))[0], captions(twins.scene(2 * g + 1))[0]))
              for g in range(num_groups)]
    return items, groups


def write_sets(root):
    """A choice JSONL and a groups JSONL over rendered shapes, each with a row whose image is
    missing and one whose image does not decode."""
    root.mkdir()
    data = synthetic.SyntheticImageText("eval", 12, 32, seed=4)
    records = [data[i] for i in range(12)]
    for i, r in enumerate(records):
        Image.fromarray(r["image"]).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"image": f"{i}.png", "caption": r["caption"],
             "negatives": [records[(i + 1) % 12]["caption"], records[(i + 5) % 12]["caption"]]}
            for i, r in enumerate(records) if r["caption"] not in (
                records[(i + 1) % 12]["caption"], records[(i + 5) % 12]["caption"])]
    rows += [{"image": "missing.png", "caption": "a", "negatives": ["b"]},
             {"image": "broken.png", "caption": "a", "negatives": ["b"]}]
    (root / "choice.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    groups = [{"images": [f"{2 * g}.png", f"{2 * g + 1}.png"],
               "captions": [records[2 * g]["caption"], records[2 * g + 1]["caption"]]}
              for g in range(6) if records[2 * g]["caption"] != records[2 * g + 1]["caption"]]
    groups.append({"images": ["0.png", "broken.png"], "captions": ["a", "b"]})
    (root / "groups.jsonl").write_text("\n".join(json.dumps(r) for r in groups))
    return root, rows[:-2], groups[:-1]


def test_compositional_evaluator_equals_the_definitions_on_a_tiny_clip(tmp_path):
    root, choice_rows, group_rows = write_sets(tmp_path / "sets")
    config, model, params, evaluators, placed, _ = built("clip", {
        "relations": eval_entry("compositional", data="synthetic:relations", num_groups=5),
        "choice": eval_entry("compositional", data=str(root / "choice.jsonl")),
        "groups": eval_entry("compositional", data=str(root / "groups.jsonl"))})
    got = evaluators(placed)
    apply = Apply(config, model, params)
    items, groups = relation_sets(5, 32, config.data.seed)
    want = {"compositional/relations/accuracy": loop_choice(items, apply.cosine),
            **{f"compositional/relations/{k}": v
               for k, v in loop_groups(groups, apply.cosine).items()}}
    png = lambda name: np.asarray(Image.open(root / name).convert("RGB"))
    want["compositional/choice/accuracy"] = loop_choice(
        [(png(r["image"]), r["caption"], r["negatives"]) for r in choice_rows], apply.cosine)
    want.update({f"compositional/groups/{k}": v for k, v in loop_groups(
        [((png(a), png(b)), tuple(r["captions"])) for r in group_rows
         for a, b in [r["images"]]], apply.cosine).items()})
    assert got == want   # exact: the same decisions, counted the same way


def test_fusion_models_also_report_the_reranking_score():
    config, model, params, _, placed, make = built("fusion", {
        "relations": eval_entry("compositional", data="synthetic:relations", num_groups=3)})
    apply = Apply(config, model, params)
    items, groups = relation_sets(3, config.model.image.image_size, config.data.seed)
    plain = {"compositional/relations/accuracy": loop_choice(items, apply.cosine),
             **{f"compositional/relations/{k}": v
                for k, v in loop_groups(groups, apply.cosine).items()}}
    for rule, weight in (("itm+contrastive", float(np.exp(params["logit_scale"]))),
                         ("itm", 0.0)):
        config.eval.rerank_score = rule
        got = make()(placed)
        score = lambda image, caption: apply.rerank(image, caption, weight)
        want = {"compositional_reranked/relations/accuracy": loop_choice(items, score),
                **{f"compositional_reranked/relations/{k}": v
                   for k, v in loop_groups(groups, score).items()}, **plain}
        assert got == want, rule


def test_fewshot_evaluator_equals_the_probe_written_out():
    config, model, params, evaluators, placed, _ = built("clip", {
        features: eval_entry("fewshot", data="synthetic:shapes", limit=240, shots="1,3",
                             seed=2, features=features) for features in ("tower", "embedding")})
    apply = Apply(config, model, params)
    pool = synthetic.SyntheticImageText("train", 240, 32, seed=config.data.seed)
    test = synthetic.SyntheticImageText("eval", 240, 32, seed=config.data.seed)
    for evaluator in evaluators.evaluators:   # one entry per kind of feature
        got = evaluator(placed)

        def feature(image, kind=evaluator.entry_name):
            if kind == "embedding":
                return apply.image_tokens(image)[0]
            return np.asarray(apply(pooled, apply.pixels(image)), np.float64)[0]
        pool_x = np.stack([feature(pool[i]["image"]) for i in range(len(pool))])
        pool_y = np.array([pool[i]["label"] for i in range(len(pool))])
        test_x = np.stack([feature(test[i]["image"]) for i in range(len(test))])
        test_y = np.array([test[i]["label"] for i in range(len(test))])
        for k in (1, 3):
            want, _ = _loop_probe(pool_x, pool_y, test_x, test_y, k, 2, False, fewshot.REGS,
                                  fewshot.MAX_FOLDS)
            assert got[f"fewshot/synthetic/{k}shot"] == pytest.approx(want, abs=1e-12), k
        assert set(got) == {"fewshot/synthetic/1shot", "fewshot/synthetic/3shot"}


def test_fewshot_reports_a_class_with_too_few_shots_by_its_entry():
    with pytest.raises(ValueError, match=r"config.evals.shapes .*limit=30.*fewer than k=10"):
        built("clip", {"shapes": eval_entry("fewshot", data="synthetic:shapes", limit=30)})


def test_missing_data_is_named_before_any_model_is_built(tmp_path):
    config = tiny_config("clip")
    config.evals.comp = eval_entry("compositional", data=str(tmp_path / "nope.jsonl"))
    config.evals.rel = eval_entry("compositional", data="synthetic:relations", num_groups=0)
    config.evals.probe = eval_entry("fewshot", data=str(tmp_path / "no_folder"),
                                    test="synthetic:relations", shots="1,x")
    config.evals.empty = eval_entry("fewshot")
    with pytest.raises(ValueError) as err:
        train.train_and_evaluate(config, tmp_path / "run")
    message = str(err.value)
    for expected in ("config.evals.comp.data=", "nope.jsonl': no such file",
                     "config.evals.rel.num_groups=0", "config.evals.probe.data=",
                     "no_folder does not exist",
                     "config.evals.probe.test='synthetic:relations'",
                     "config.evals.probe.shots='1,x'", "config.evals.empty.data is empty"):
        assert expected in message, (expected, message)
    assert not (tmp_path / "run").exists()   # refused before the workdir, let alone a model
