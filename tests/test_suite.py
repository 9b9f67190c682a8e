"""`python -m valign_jax.evaluate --suite=FILE`: one checkpoint over two tfds datasets (tfds'
mock data, offline), a class folder and a compositional JSONL, written as one CLIP_benchmark-
style JSON per dataset and a Markdown table; the numbers are the evaluators' own; a bad suite
file is refused before any model loads."""

import json

import pytest

from valign_jax import evaluate, suite

from conftest import REPO
from test_eval_types import write_sets
from test_evaluate import clip_run, reference_top1, run_cli, write_class_folders  # noqa: F401

LAYOUT = {"dataset", "model", "pretrained", "task", "metrics", "step"}


def test_a_suite_over_tfds_a_class_folder_and_a_compositional_file(clip_run, tmp_path):
    import tensorflow_datasets as tfds
    names = ["red circle", "blue square", "green triangle"]
    folder = write_class_folders(tmp_path / "shapes_folders", names)
    sets, _, _ = write_sets(tmp_path / "sets")
    suite_file = tmp_path / "suite.json"
    suite_file.write_text(json.dumps({"datasets": [
        {"task": "zeroshot", "data": "tfds:cifar10/test"},
        {"task": "zeroshot", "data": "tfds:cifar100/test", "templates": "single",
         "limit": 8},
        {"task": "zeroshot", "data": str(folder), "name": "folders"},
        {"task": "compositional", "data": str(sets / "choice.jsonl")},
        {"task": "fewshot", "data": str(folder), "shots": [1, 2]}]}))
    with tfds.testing.mock_data(num_examples=12):
        done = evaluate.evaluate_suite(suite_file, workdir=clip_run, out=tmp_path / "out")
    out = tmp_path / "out"
    assert done["dir"] == str(out)
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(results) == {"cifar10", "cifar100", "folders", "choice", "shapes_folders"}
    for name, r in results.items():
        assert set(r) == LAYOUT and r["dataset"] == name and r["step"] == 4
        assert r["model"] == clip_run.name and r["pretrained"] == str(clip_run)
        assert all(0 <= v <= 1 for v in r["metrics"].values()), r
    assert results["cifar10"]["task"] == "zeroshot_classification"
    assert set(results["cifar100"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert results["folders"]["metrics"]["acc1"] == pytest.approx(
        reference_top1(clip_run, folder, names), abs=1e-9)
    assert set(results["choice"]["metrics"]) == {"acc"}
    assert set(results["shapes_folders"]["metrics"]) == {"1shot_acc1", "2shot_acc1"}
    # the same numbers as the run's own evaluators give through evaluate
    with tfds.testing.mock_data(num_examples=12):
        direct = evaluate.evaluate(workdir=clip_run, out=tmp_path / "e.json",
                                   overrides={"zeroshot": "tfds:cifar10/test"})["metrics"]
    assert results["cifar10"]["metrics"]["acc1"] == direct["zeroshot/cifar10/top1"]
    table = (out / "results.md").read_text()
    for line in ("## zeroshot_classification", "| dataset | acc1 | acc5 | mean_per_class_recall |",
                 "## compositional", "| choice | ", "## fewshot_linear_probe",
                 f"| folders | {results['folders']['metrics']['acc1']:.4f} |"):
        assert line in table, (line, table)


def test_the_example_suite_runs_from_the_command_line(clip_run, tmp_path):
    proc = run_cli(f"--workdir={clip_run}", f"--suite={REPO / 'suites/demo.json'}",
                   f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["relations.json", "results.md", "shapes.json", "shapes_fewshot.json",
                       "shapes_pairs.json"]
    pairs = json.loads((tmp_path / "shapes_pairs.json").read_text())
    assert pairs["task"] == "zeroshot_retrieval"
    assert {"image_retrieval_recall@1", "text_retrieval_recall@10", "gap"} <= set(
        pairs["metrics"])
    assert str(tmp_path) in proc.stdout


@pytest.mark.parametrize("content,message", [
    ("not json", "not valid JSON"),
    ("[]", "non-empty list of entries"),
    ('[{"task": "zeroshot"}]', "entry 0: 'data' must be a non-empty string"),
    ('[{"task": "nope", "data": "x"}]', "entry 0: task: unknown evaluator type 'nope'"),
    ('[{"task": "zeroshot", "data": "a,b"}]', "lists several datasets"),
    ('[{"task": "retrieval", "data": "x", "shots": 3}]', r"unknown keys \['shots'\]"),
    ('[{"task": "zeroshot", "data": "tfds:a/test"}, {"task": "zeroshot", "data": "tfds:a/b"}]',
     "name 'a' is entry 0's too"),
])
def test_bad_suite_files_are_named(tmp_path, content, message):
    path = tmp_path / "suite.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        suite.read_suite(path)


def test_missing_data_is_named_before_the_model_runs(clip_run, tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps([
        {"task": "compositional", "data": str(tmp_path / "gone.jsonl")},
        {"task": "fewshot", "data": "synthetic:shapes", "features": "logits"},
        {"task": "zeroshot", "data": "synthetic:shapes", "class_names": "names.txt",
         "name": "shapes"}]))
    proc = run_cli(f"--workdir={clip_run}", f"--suite={path}", f"--out={tmp_path / 'o'}")
    assert proc.returncode == 1 and "FATAL: the suite's entries have problems" in proc.stderr
    for expected in ("gone.jsonl': no such file", "gone.data=", "features='logits'",
                     "class_names='names.txt': no such file"):
        assert expected in proc.stderr, (expected, proc.stderr[-2000:])
    assert not (tmp_path / "o").exists()
