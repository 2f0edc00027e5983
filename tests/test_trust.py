"""What tunebook writes can be believed: resume never mixes runs, a kill or a failure leaves the previous
outputs whole, exports are swapped in together, and the console carries tunebook's words only."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_tunebook, tree_digest

import tunebook.export
import tunebook.outputs
from tunebook.config import load_recipe
from tunebook.errors import RecipeError
from tunebook.evaluate import evaluate
from tunebook.export import ExportCheckFailed, export
from tunebook.outputs import checkpoints_dir, fine_tuned_dir, gguf_dir, merged_dir
from tunebook.runs import NOT_IN_FINGERPRINT, read_fingerprint, run_fingerprint
from tunebook.train import train

HAS_CONVERTER = tunebook.export.CONVERTER_DIR.joinpath("convert_hf_to_gguf.py").exists()
needs_converter = pytest.mark.skipif(not HAS_CONVERTER, reason="llama.cpp converter not extracted")


def losses(out_dir: Path) -> dict[int, float]:
    history = json.loads((out_dir / "loss_log.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


# ---------------------------------------------------------------- resume only the same run


def test_edited_recipe_never_replaces_a_finished_run_and_starts_fresh_keeping_checkpoints(tiny_recipe, capsys):
    path = tiny_recipe(training__resume_from_checkpoint="auto")
    recipe = load_recipe(path)
    train(recipe)
    old_checkpoint = checkpoints_dir(recipe.name) / "checkpoint-4"
    assert read_fingerprint(old_checkpoint) == run_fingerprint(recipe)
    finished = tree_digest(fine_tuned_dir(recipe.name))
    capsys.readouterr()

    path.write_text(path.read_text().replace("learning_rate: 0.001", "learning_rate: 1.0e-05"))
    with pytest.raises(RecipeError) as info:
        train(load_recipe(path))
    message = str(info.value)
    assert "holds a finished run" in message and "training.learning_rate: 0.001 -> 1e-05" in message
    assert "--force" in message and "--name LABEL" in message
    assert tree_digest(fine_tuned_dir(recipe.name)) == finished, "refused before anything moved"

    shutil.rmtree(fine_tuned_dir(recipe.name))  # as if the first run had died after its last checkpoint
    out = train(load_recipe(path))
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("starting fresh"))
    assert "training.learning_rate: 0.001 -> 1e-05" in line and "--force-resume" in line
    stale = [p for p in checkpoints_dir(recipe.name).parent.iterdir() if p.name.startswith(f"{recipe.name}.stale-")]
    assert len(stale) == 1 and (stale[0] / "checkpoint-4" / "optimizer.pt").exists(), "stale checkpoints kept"
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"] is None and info["fingerprint"]["training.learning_rate"] == 1e-5
    history = json.loads((out / "loss_log.json").read_text())
    assert [h["learning_rate"] for h in history if "learning_rate" in h][0] == pytest.approx(1e-5)


def test_changing_only_logging_resumes(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(training__resume_from_checkpoint="auto", training__max_steps=4))
    train(recipe)
    shutil.rmtree(fine_tuned_dir(recipe.name))  # as if the run died after its last checkpoint
    assert {"logging_steps", "save_steps", "report_to"} <= NOT_IN_FINGERPRINT
    relogged = load_recipe(recipe.source, ["training.logging_steps=2"])
    out = train(relogged)
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "run_info.json").read_text())["resumed_from"].endswith("checkpoint-4")


def test_finished_run_is_not_retrained_and_explicit_mismatch_is_refused(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(training__max_steps=2))
    out = train(recipe)
    before = tree_digest(out)
    capsys.readouterr()
    train(recipe)
    printed = capsys.readouterr().out
    assert "already trained" in printed and "--force` retrains" in printed
    assert tree_digest(out) == before, "the finished adapter was not rewritten"

    checkpoint = checkpoints_dir(recipe.name) / "checkpoint-2"
    other = load_recipe(recipe.source, ["training.learning_rate=1e-4", f"training.resume_from_checkpoint={checkpoint}"])
    with pytest.raises(RecipeError) as info:
        train(other)
    assert "training.learning_rate: 0.001 -> 0.0001" in str(info.value) and "--force-resume" in str(info.value)
    resumed = train(other, force_resume=True)
    assert json.loads((resumed / "run_info.json").read_text())["resumed_from"] == str(checkpoint)


# ---------------------------------------------------------------- SIGKILL at the worst moments


def test_sigkill_during_checkpoint_save_and_between_checkpoints_then_resume(tiny_recipe, tmp_path):
    settings = dict(training__resume_from_checkpoint="auto", training__max_steps=6, training__save_steps=2)
    reference = losses(train(load_recipe(tiny_recipe(name="reference", **settings))))

    killed_in_save = str(tiny_recipe(name="killed-in-save", **settings))
    done = run_tunebook(tmp_path, "train", killed_in_save, fault=("train-in-save", 4))
    assert done.returncode == -9
    ckpts = checkpoints_dir("killed-in-save")
    assert (ckpts / "checkpoint-4").exists() and read_fingerprint(ckpts / "checkpoint-4") is None
    assert not fine_tuned_dir("killed-in-save").exists()
    again = run_tunebook(tmp_path, "train", killed_in_save)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "checkpoint-2" in again.stdout
    assert "interrupted saves" in again.stdout
    stale = [p for p in ckpts.parent.iterdir() if p.name.startswith("killed-in-save.stale-")]
    assert len(stale) == 1 and (stale[0] / "checkpoint-4" / "adapter_model.safetensors").exists()
    resumed = losses(fine_tuned_dir("killed-in-save"))
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5)

    killed_between = str(tiny_recipe(name="killed-between", **settings))
    done = run_tunebook(tmp_path, "train", killed_between, fault=("train-between", 5))
    assert done.returncode == -9
    again = run_tunebook(tmp_path, "train", killed_between)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "checkpoint-4" in again.stdout
    resumed = losses(fine_tuned_dir("killed-between"))
    for step in (5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5)


def test_sigkill_during_eval_keeps_previous_report(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(training__max_steps=2))
    train(recipe)
    report = evaluate(recipe, which="base")
    before = tree_digest(report)

    done = run_tunebook(tmp_path, "eval", recipe.source, "--model", "base", fault=("eval-in-write", 1))
    assert done.returncode == -9
    assert tree_digest(report) == before
    leftovers = [p.name for p in report.parent.iterdir() if p.name.startswith(f".{report.name}.tmp")]
    assert leftovers, "the killed run left its temp directory"

    again = run_tunebook(tmp_path, "eval", recipe.source, "--model", "base")
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted run" in again.stdout
    assert "all 6 answers kept from an earlier run" in again.stdout, "the killed run's answers were kept"
    assert not [p for p in report.parent.iterdir() if p.name.startswith(f".{report.name}.")]


@needs_converter
def test_sigkill_during_export_and_failing_conversion_keep_previous_export(tiny_recipe, tmp_path, monkeypatch):
    recipe = load_recipe(tiny_recipe(training__max_steps=2, lora__init_lora_weights=False,
                                     export__gguf=["f16", "q8_0"]))
    train(recipe)
    export(recipe, verify=False)
    merged_before, gguf_before = tree_digest(merged_dir(recipe.name)), tree_digest(gguf_dir(recipe.name))
    # A different adapter, so a re-merge that slipped into place would show.
    source = Path(recipe.source)
    source.write_text(source.read_text().replace("seed: 7", "seed: 8"))
    recipe = load_recipe(source)
    train(recipe, force=True)

    # Killed inside the second conversion, and in the swap after 3 renames (its manifest in place, both old
    # outputs moved aside, no new one yet). Every other point of the swap: test_a_swap_killed_or_failing_...
    for fault in (("export-convert", 2), ("export-swap", 3)):
        done = run_tunebook(tmp_path, "export", recipe.source, "--no-verify", fault=fault)
        assert done.returncode == -9, done.stderr
        if fault[0] == "export-convert":
            assert tree_digest(merged_dir(recipe.name)) == merged_before
            assert tree_digest(gguf_dir(recipe.name)) == gguf_before
        # The next run cleans up (and for a kill mid-swap restores the previous export) before it starts.
        from tunebook.outputs import clean_leftovers

        notes = clean_leftovers(merged_dir(recipe.name), gguf_dir(recipe.name))
        assert notes, fault
        assert tree_digest(merged_dir(recipe.name)) == merged_before, fault
        assert tree_digest(gguf_dir(recipe.name)) == gguf_before, fault

    def failing_convert(*args, **kwargs):
        raise RuntimeError("convert_hf_to_gguf.py failed (q8_0): injected")

    real_convert = tunebook.export.convert
    monkeypatch.setattr(tunebook.export, "convert",
                        lambda m, o, t, *rest: real_convert(m, o, t, *rest) if t == "f16" else failing_convert())
    with pytest.raises(RuntimeError, match="injected"):
        export(recipe, verify=False)
    assert tree_digest(merged_dir(recipe.name)) == merged_before
    assert tree_digest(gguf_dir(recipe.name)) == gguf_before
    assert not [p for p in merged_dir(recipe.name).parent.parent.iterdir() if p.name.startswith(".") and p.name != ".locks"]

    monkeypatch.setattr(tunebook.export, "convert", real_convert)
    real_summary = tunebook.export.gguf_summary
    monkeypatch.setattr(tunebook.export, "gguf_summary", lambda p: {**real_summary(p), "eos_token_id": 12345})
    with pytest.raises(ExportCheckFailed, match="eos_matches_tokenizer"):
        export(recipe, verify=False)
    assert tree_digest(gguf_dir(recipe.name)) == gguf_before

    monkeypatch.setattr(tunebook.export, "gguf_summary", real_summary)
    export(recipe, verify=False)
    assert tree_digest(merged_dir(recipe.name)) != merged_before, "the new adapter is exported once all passes"
    assert tree_digest(gguf_dir(recipe.name)) != gguf_before


SWAP_CHILD = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[3])
from faults import install

install("export-swap", int(sys.argv[1]))
from tunebook.outputs import swap_in_together, temp_sibling

pairs = []
for name in ("merged", "gguf", "new-kind"):
    final = Path(sys.argv[2]) / name
    tmp = temp_sibling(final)
    tmp.mkdir()
    (tmp / "weights").write_text("new " + name)
    pairs.append((tmp, final))
swap_in_together(pairs)
"""


def test_a_swap_killed_or_failing_at_any_rename_leaves_the_previous_outputs(tmp_path, monkeypatch):
    """`swap_in_together` as export calls it (two outputs that exist and one that does not yet), killed after each
    of its renames in a child process, then failing at each rename in this one: the previous outputs come back
    whole and the new output without a predecessor goes."""
    import subprocess
    import sys

    from tunebook.outputs import clean_leftovers, swap_in_together, temp_sibling

    root = tmp_path / "out"
    finals = [root / "merged", root / "gguf", root / "new-kind"]

    def previous_outputs() -> dict[str, str]:
        shutil.rmtree(root, ignore_errors=True)
        for final in finals[:2]:
            (final / "sub").mkdir(parents=True)
            (final / "weights").write_text("old " + final.name)
            (final / "sub" / "tokenizer.json").write_text("{}")
        return tree_digest(root)

    renames = 1 + 2 + 3 + 1  # manifest, two old outputs aside, three new in place, the old directory discarded
    for kill_after in range(renames):
        before = previous_outputs()
        child = subprocess.run([sys.executable, "-c", SWAP_CHILD, str(kill_after), str(root),
                                str(Path(__file__).parent)], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(Path(tunebook.outputs.__file__).parents[1])})
        assert child.returncode == -9, (kill_after, child.stderr)
        assert clean_leftovers(*finals), kill_after
        assert tree_digest(root) == before, kill_after
        assert sorted(p.name for p in root.iterdir()) == ["gguf", "merged"], kill_after
    finished = subprocess.run([sys.executable, "-c", SWAP_CHILD, str(renames), str(root), str(Path(__file__).parent)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(tunebook.outputs.__file__).parents[1])})
    assert finished.returncode == 0, finished.stderr
    assert {f.name: (f / "weights").read_text() for f in finals} == {f.name: "new " + f.name for f in finals}

    for failing in range(2, renames):  # the first rename only puts the manifest in place
        before = previous_outputs()
        pairs = []
        for final in finals:
            tmp = temp_sibling(final)
            tmp.mkdir()
            (tmp / "weights").write_text("new")
            pairs.append((tmp, final))
        monkeypatch.setattr(tunebook.outputs, "os", OsFailingRename(on_call=failing))
        with pytest.raises(OSError, match="cross-device"):
            swap_in_together(pairs)
        monkeypatch.setattr(tunebook.outputs, "os", os)
        for tmp, _ in pairs:  # the caller (`atomic_dir`, export) removes its own temp directories
            shutil.rmtree(tmp, ignore_errors=True)
        assert tree_digest(root) == before, failing
        assert sorted(p.name for p in root.iterdir()) == ["gguf", "merged"], failing


class OsFailingRename:
    """The os module, except that its Nth `replace` fails like a rename across filesystems (mid-swap)."""

    def __init__(self, on_call: int):
        self.calls, self.on_call = 0, on_call

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        self.calls += 1
        if self.calls == self.on_call:
            raise OSError(18, "Invalid cross-device link (injected)")
        return os.replace(src, dst)


@needs_converter
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the control needs llama-cpp-python")
def test_gpu_style_recipe_with_cached_hub_model_exports_with_control(tmp_path, tiny_recipe, tokenizer, monkeypatch):
    """A hub-id recipe (llama3's registry name) whose weights sit in the local Hugging Face cache."""
    import huggingface_hub.constants
    from conftest import make_tiny_model

    cache = tmp_path / "hub"
    snapshot = cache / "models--meta-llama--Meta-Llama-3-8B-Instruct" / "snapshots" / "0123abcd"
    make_tiny_model(snapshot, tokenizer)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    recipe = load_recipe(tiny_recipe(name="llama3-tiny", model__name="llama3-8b-instruct", training__max_steps=2,
                                     export__gguf=["f16"], export__verify_prompts=2))
    train(recipe)
    result = export(recipe, verify=True)
    assert (gguf_dir(recipe.name) / "llama3-tiny-f16.gguf").exists()
    assert "control_base_without_adapter" in result
    assert not [n for n in result["notes"] if "control" in n]

    monkeypatch.setattr(tunebook.export, "local_model_dir", lambda name: None)
    result = export(recipe, verify=True)
    assert "control_base_without_adapter" not in result
    assert any("control skipped" in note for note in result["notes"])


# ---------------------------------------------------------------- a quiet console


def test_console_carries_no_library_noise_unless_verbose(tiny_recipe, tmp_path):
    recipe = str(tiny_recipe(training__max_steps=1))
    quiet = run_tunebook(tmp_path, "train", recipe)
    assert quiet.returncode == 0, quiet.stderr
    log = (tmp_path / "logs" / Path(recipe).stem / "train.log").read_text()
    noise = ("Loading weights", "FutureWarning", "kernels-community", "Writing model shards", "it/s]")
    assert not [n for n in noise if n in quiet.stderr + quiet.stdout], quiet.stderr
    assert "adapter: models/fine-tuned/" in quiet.stdout
    assert "FutureWarning" in log or "WARNING" in log, "library warnings go to the log file"

    loud = run_tunebook(tmp_path, "train", recipe, "--force", "-v")
    assert loud.returncode == 0, loud.stderr
    assert "INFO transformers" in loud.stderr and "Loading weights" in loud.stderr
