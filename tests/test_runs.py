"""Run identity: one run's outputs are never silently replaced by another's, and stages load only their own run."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_tunebook, tree_digest, tunebook_command

from tunebook.app import status_line
from tunebook.config import load_recipe
from tunebook.errors import RecipeError
from tunebook.evaluate import evaluate, report_name
from tunebook.outputs import fine_tuned_dir, log_file, report_dir
from tunebook.runs import identify, run_lock
from tunebook.train import git_sha, train


def test_override_runs_get_their_own_outputs_and_eval_finds_them_again(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(training__max_steps=2))
    own = train(recipe)
    before = tree_digest(own)
    capsys.readouterr()

    short = load_recipe(recipe.source, ["training.max_steps=1"])
    out = train(short)
    assert out.name.startswith("tiny-sql@") and len(out.name) == len("tiny-sql@") + 8
    assert f"run {out.name}: outputs go to" in capsys.readouterr().out
    assert tree_digest(own) == before, "the recipe's own adapter was not touched"
    assert identify(load_recipe(recipe.source, ["training.max_steps=1"])).name == out.name, "the same overrides name it"
    assert json.loads((out / "run_info.json").read_text())["overrides"] == ["training.max_steps=1"]
    # Overrides that do not change the trajectory are the recipe's own run.
    assert identify(load_recipe(recipe.source, ["training.logging_steps=3", "eval.limit=2"])).name == "tiny-sql"
    labelled = load_recipe(recipe.source)
    labelled.run_label = "sweep-a"
    assert identify(labelled).name == "tiny-sql@sweep-a"


def test_partial_evals_never_replace_the_full_report(tiny_recipe, tmp_path, sql_data):
    recipe = load_recipe(tiny_recipe(training__max_steps=2, eval__limit=4))
    train(recipe)
    full = evaluate(recipe)
    assert full == report_dir("tiny-sql")
    before = tree_digest(full)
    partial = evaluate(load_recipe(recipe.source, ["eval.limit=2"]))
    assert partial.name == "tiny-sql.limit-2" and json.loads((partial / "report.json").read_text())["n_examples"] == 2
    base_only = evaluate(recipe, which="base")
    assert base_only.name == "tiny-sql.base"
    where = evaluate(load_recipe(recipe.source, ["eval.where={shape: [count, select, where, agg]}"]), which="base")
    assert where.name.startswith("tiny-sql.where-") and where.name.endswith("+base")
    assert tree_digest(full) == before, "the full report is left exactly as it was"
    assert report_name(identify(load_recipe(recipe.source, ["eval.batch_size=2"]))) == "tiny-sql", \
        "a speed-only setting is the same eval"


def test_eval_export_and_app_refuse_or_flag_an_adapter_from_another_run(tiny_recipe):
    from tunebook.export import export

    path = tiny_recipe(training__max_steps=2, eval__limit=2)
    recipe = load_recipe(path)
    train(recipe)
    path.write_text(path.read_text().replace("learning_rate: 0.001", "learning_rate: 0.002"))
    edited = load_recipe(path)
    for command in (lambda: evaluate(edited), lambda: export(edited, verify=False)):
        with pytest.raises(RecipeError) as info:
            command()
        assert "was not trained by this run (training.learning_rate: 0.001 -> 0.002)" in str(info.value)
        assert "--force" in str(info.value)
    report = json.loads((evaluate(edited, force=True) / "report.json").read_text())
    assert any("training.learning_rate: 0.001 -> 0.002" in note for note in report["notes"])
    assert "**Warning:** the adapter was not trained by this recipe as it is now" in status_line(edited)
    assert "Warning" not in status_line(recipe), "the run as it was trained is not flagged"


def test_a_second_writer_of_one_run_is_refused_while_the_first_runs(tiny_recipe, tmp_path):
    """Two `tunebook train` of one recipe at once: the second is refused at once, naming the first's pid; the
    first finishes with its checkpoints, adapter and log whole."""
    recipe = tiny_recipe(training__max_steps=3, training__save_steps=1, training__resume_from_checkpoint="auto")
    mark, release = tmp_path / "at-step-1", tmp_path / "go-on"
    cmd, env = tunebook_command("train", str(recipe), fault=("train-wait", 1))
    env.update(TUNEBOOK_FAULT_MARK=str(mark), TUNEBOOK_FAULT_RELEASE=str(release))
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not mark.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mark.exists(), first.communicate()
        second = run_tunebook(tmp_path, "train", str(recipe))
        assert second.returncode == 2
        assert f"pid {first.pid} (`tunebook train" in second.stderr and "is writing this run's outputs" in second.stderr
        assert "--name LABEL" in second.stderr
        other_eval = run_tunebook(tmp_path, "eval", str(recipe), "--model", "base")
        assert other_eval.returncode == 2 and f"pid {first.pid}" in other_eval.stderr
        labelled = run_tunebook(tmp_path, "train", str(recipe), "training.max_steps=1", "--name", "beside")
        assert labelled.returncode == 0, labelled.stderr  # its own name: trains beside the first
    finally:
        release.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    adapter = tmp_path / fine_tuned_dir("tiny-sql")
    info = json.loads((adapter / "run_info.json").read_text())
    assert info["global_steps"] == 3 and info["resumed_from"] is None
    assert (tmp_path / fine_tuned_dir("tiny-sql@beside") / "adapter_model.safetensors").exists()
    log = (tmp_path / log_file("tiny-sql", "train")).read_text()
    assert log.count("\n==== ") == 3 and f"pid {first.pid}: tunebook train" in log, "no command emptied another's log"
    assert log.index(f"pid {first.pid}: tunebook train") < log.index("--name beside")


def test_the_lock_is_reentrant_in_one_process_and_freed_when_released(tmp_path, monkeypatch):
    import tunebook.outputs

    monkeypatch.setattr(tunebook.outputs, "MODELS_DIR", tmp_path / "models")
    with run_lock("r", "demo r"), run_lock("r", "train r"):
        pass
    with run_lock("r", "eval r"):
        assert json.loads(Path(tmp_path / "models" / ".locks" / "r.lock").read_text())["command"] == "eval r"


def test_an_interrupted_eval_resumes_from_its_answers(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(training__max_steps=2, eval__batch_size=2, eval__limit=6))
    train(recipe)
    first = evaluate(recipe)
    reference = [json.loads(line)["fine_tuned_prediction"]
                 for line in (first / "predictions.jsonl").read_text().splitlines()]
    perplexities = {k: v["perplexity"] for k, v in json.loads((first / "report.json").read_text()).items()
                    if k in ("base", "fine_tuned")}
    (tmp_path / "reports" / "tiny-sql" / "report.json").unlink()
    shutil.rmtree(tmp_path / "reports" / ".kept-passes")  # else the base pass is reused whole, not resumed

    killed = run_tunebook(tmp_path, "eval", recipe.source, fault=("eval-kill-after", 4))
    assert killed.returncode == -9
    journal = tmp_path / "reports" / ".journal" / "tiny-sql"
    assert (journal / "base.jsonl").exists() and (journal / "fine_tuned.jsonl").exists()

    stopped = run_tunebook(tmp_path, "eval", recipe.source, fault=("eval-ctrl-c", 1))
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert [ln for ln in stopped.stderr.splitlines() if ln.strip()] == [next(
        ln for ln in stopped.stderr.splitlines() if ln.startswith("tunebook eval: interrupted."))], stopped.stderr
    assert "base: all 6 answers kept" in stopped.stdout

    again = run_tunebook(tmp_path, "eval", recipe.source)
    assert again.returncode == 0, again.stderr
    assert "base: all 6 answers kept" in again.stdout and "fine_tuned: resuming, " in again.stdout
    resumed = [json.loads(line)["fine_tuned_prediction"]
               for line in (tmp_path / "reports" / "tiny-sql" / "predictions.jsonl").read_text().splitlines()]
    assert resumed == reference
    report = json.loads((tmp_path / "reports" / "tiny-sql" / "report.json").read_text())
    for kind, value in perplexities.items():  # rows scored before the kill, and after it
        assert report[kind]["perplexity"] == pytest.approx(value, rel=1e-4), kind
    assert not journal.exists(), "the report replaces the journal"


def test_eval_without_perplexity_and_with_a_failing_metric_still_writes_its_report(tiny_recipe, monkeypatch):
    import tunebook.metrics

    recipe = load_recipe(tiny_recipe(training__max_steps=1, eval__limit=3, eval__metrics=["sql_execution"]))
    train(recipe)
    report = json.loads((evaluate(recipe) / "report.json").read_text())
    assert "perplexity" not in report["fine_tuned"] and "exec_accuracy" in report["fine_tuned"]

    def broken(*args, **kwargs):
        raise RuntimeError("scorer exploded")

    failing = tunebook.metrics.METRICS["sql_execution"].__class__(("exec_accuracy",), broken)
    monkeypatch.setitem(tunebook.metrics.METRICS, "sql_execution", failing)
    out = evaluate(load_recipe(recipe.source, ["eval.limit=2"]))
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] == ["metric sql_execution could not be scored (RuntimeError: scorer exploded)"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2, "the answers were kept"


def test_git_sha_names_the_code_that_runs_not_the_working_directory(tmp_path, monkeypatch):
    code = Path(git_sha.__code__.co_filename).resolve().parent
    head = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("tunebook is not running from a git checkout")
    other = tmp_path / "other-checkout"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    monkeypatch.chdir(other)
    assert git_sha().removesuffix("-dirty") == head.stdout.strip()
