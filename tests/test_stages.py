"""DPO and GRPO stages on the tiny model: they train from a parent's adapter, evaluate and export like SFT, are
rewarded by the report's own metrics, and bad preference data or rewards are named before any model loads."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import write_recipe

from tunebook.config import load_recipe
from tunebook.errors import RecipeError
from tunebook.rewards import REWARDS, load_reward


@pytest.fixture
def parent(tiny_recipe):
    """A trained SFT parent (the tiny model, 2 steps)."""
    from tunebook.train import train

    recipe = load_recipe(tiny_recipe(name="tiny-parent", training__max_steps=2, lora__init_lora_weights=False))
    train(recipe)
    return recipe


def stage_recipe(parent, tmp_path, method: str, **sections):
    raw = {
        "model": {"name": parent.model.name, "dtype": "float32"},
        "task": "sql",
        "data": {"train": parent.data.train, "val": parent.data.val, "test": parent.data.test, "max_length": 256,
                 "system_prompt": parent.data.system_prompt},
        "stage": {"method": method, "parent": parent.source, **sections.pop("stage", {})},
        method: {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-4, "logging_steps": 1,
                 "report_to": "none", "seed": 3, **sections.pop(method, {})},
        "eval": {"max_new_tokens": 8, "batch_size": 4, "limit": 4},
        **sections,
    }
    return write_recipe(tmp_path / f"tiny-{method}.yaml", **raw)


def test_dpo_stage_trains_the_parents_adapter_on_verified_pairs_and_evaluates(parent, tmp_path, capsys):
    from tunebook.evaluate import evaluate
    from tunebook.outputs import pairs_file
    from tunebook.runs import identify
    from tunebook.train import train

    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"samples": 2, "prompts": 6, "temperature": 1.0},
                                      dpo={"beta": 0.1}))
    out = train(recipe)
    info = json.loads((out / "run_info.json").read_text())
    assert info["method"] == "dpo" and info["global_steps"] == 2 and info["parent"]["recipe"] == parent.source
    assert info["pairs"]["pairs"] > 0 and (out / "adapter_model.safetensors").exists()
    assert info["shared_prompts"], "each pair's prompt was read once"
    assert not (out / "ref").exists(), "only the trained adapter is saved, not the frozen reference"
    assert identify(recipe).fingerprint["stage.parent adapter (sha256)"]
    pairs = [json.loads(line) for line in pairs_file(recipe.name).read_text().splitlines()[1:]]
    rows = [json.loads(line) for line in Path(recipe.data.train).read_text().splitlines()]
    by_prompt = {render_prompt_of(recipe, row): row for row in rows}
    for pair in pairs:  # only verified answers are ever chosen: the reference, or a sample with the gold's rows
        row = by_prompt[pair["prompt"]]
        db = str(Path(recipe.data.train).parent / "databases" / f"{row['db_id']}.sqlite")
        judged = REWARDS["sql_execution"](None, [pair["chosen"], pair["rejected"]], reference=[row["output"]] * 2,
                                          db_path=[db] * 2)
        assert judged[0] == 1.0 and judged[1] == pair["rejected_score"] < 1.0
        assert pair["chosen_source"] in ("sample", "reference")
    out = evaluate(recipe)
    report = json.loads((out / "report.json").read_text())
    assert "exec_accuracy" in report["fine_tuned"] and "exec_accuracy" in report["sft"], "base -> SFT -> stage"
    assert "| metric | base | SFT (parent) | fine-tuned | delta |" in (out / "report.md").read_text()

    # Another run of the stage (another learning rate) takes the parent's pass as it takes the base's:
    # the SFT column depends on the parent adapter, not on the stage's.
    def answers(report_dir, side):
        return [json.loads(line)[f"{side}_prediction"] for line in (report_dir / "predictions.jsonl").open()]

    other = load_recipe(recipe.source, ["dpo.learning_rate=2e-4"])
    train(other)
    capsys.readouterr()
    again = evaluate(other)
    console = capsys.readouterr().out
    assert "sft: all 4 answers reused from the eval of" in console and "base: all 4 answers reused" in console
    assert answers(again, "sft") == answers(out, "sft") and answers(again, "base") == answers(out, "base")


def test_a_shared_prompt_gives_the_log_probs_and_gradients_of_two_rows(tiny_model_dir, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from tunebook.speedups import SharedPromptRows, share_preference_prompts

    shared_batches = []  # batches that went through the shared rows (through PEFT's forward, as DPOTrainer calls it)
    unshare = SharedPromptRows.unshare
    monkeypatch.setattr(SharedPromptRows, "unshare", lambda self, *a: shared_batches.append(1) or unshare(self, *a))

    def model_and_forward(shared: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        if shared:
            assert share_preference_prompts(model)
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, lora)

    generator = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(5, 1000, (n,), generator=generator).tolist()

    # pairs of unequal prompt and answer lengths, a one-token prompt, an answer longer than its prompt
    pairs = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
             for p, c, r in ((30, 4, 9), (12, 7, 2), (1, 3, 3), (6, 20, 5))]

    def run(shared: bool, examples):
        model = model_and_forward(shared)
        batch = DataCollatorForPreference(pad_token_id=0)(examples)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
        assert len(shared_batches) == (1 if shared else 0)
        shared_batches.clear()
        out.log_probs.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    for examples in (pairs, [pairs[0], {**pairs[1], "rejected_ids": pairs[1]["chosen_ids"][:1]}]):
        two_rows, two_rows_grads = run(False, examples)
        shared, shared_grads = run(True, examples)
        assert shared.log_probs.shape == two_rows.log_probs.shape
        assert torch.equal(shared.label_mask, two_rows.label_mask)
        assert torch.allclose(shared.log_probs, two_rows.log_probs, atol=1e-5)
        assert torch.allclose(shared.entropy, two_rows.entropy, atol=1e-5)
        assert torch.allclose(shared.mean_logits, two_rows.mean_logits, atol=1e-5)
        assert torch.equal(shared.is_top1, two_rows.is_top1)
        assert shared_grads.keys() == two_rows_grads.keys() and len(shared_grads) > 5
        for name, grad in two_rows_grads.items():
            assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name

    # a batch whose rows do not share their pair's prompt runs as TRL runs it
    batch = DataCollatorForPreference(pad_token_id=0)(pairs)
    batch["input_ids"][len(pairs), 0] += 1  # the first rejected row's prompt
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    with torch.no_grad():
        assert torch.equal(model_and_forward(True)(**kwargs, fused_lm_head=True).log_probs,
                           model_and_forward(False)(**kwargs, fused_lm_head=True).log_probs)
    assert not shared_batches


def test_dpo_pairs_are_judged_by_the_stages_reward_else_the_tasks_metric(parent, tmp_path):
    from tunebook.pairs import judge_name

    assert judge_name(load_recipe(stage_recipe(parent, tmp_path, "dpo"))) == "sql_execution"
    strict = load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"rewards": ["exact_match"]}))
    assert judge_name(strict) == "exact_match"
    review = load_recipe("smollm2-review-dpo")
    assert judge_name(review) == "code_fixed"
    assert judge_name(load_recipe("smollm2-review-dpo", ["stage.rewards=[fix_matches_reference]"])) == \
        "fix_matches_reference"


def test_changing_the_pairing_rule_rejudges_the_kept_samples_without_sampling_again(parent, tmp_path):
    from tunebook.data import read_split
    from tunebook.models import load_tokenizer
    from tunebook.outputs import pairs_file, samples_file
    from tunebook.pairs import pair_samples, preference_pairs
    from tunebook.runs import identify, parent_adapter_dir

    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"samples": 2, "prompts": 4}))
    tokenizer = load_tokenizer(str(parent_adapter_dir(recipe)))
    rows = read_split(recipe.data.train)
    preference_pairs(identify(recipe), rows, parent_adapter_dir(recipe), tokenizer)
    kept = samples_file(recipe.name).read_text()
    assert len(kept.splitlines()) == 5, "a key line, then each prompt's sampled answers"
    on_policy = load_recipe(recipe.source, ["stage.chosen=sample"])
    pairs, facts = preference_pairs(identify(on_policy), rows, parent_adapter_dir(on_policy), tokenizer)
    assert samples_file(on_policy.name).read_text() == kept, "the same answers, judged again, not sampled again"
    assert facts["chosen"] == "sample" and facts["chosen_reference"] == 0
    assert json.loads(pairs_file(on_policy.name).read_text().splitlines()[0])["key"]

    # The rule itself, on answers whose verdicts are known: a prompt with a right and a failing answer makes a pair
    # either way; one with no right answer makes a pair only when the reference may be chosen.
    gold = rows[0]["output"]
    sampled = [{"row": 0, "answers": [gold, "SELECT nothing FROM nowhere"]},
               {"row": 1, "answers": ["SELECT nothing FROM nowhere", "DROP TABLE pets"]},
               {"row": 2, "answers": [rows[2]["output"]] * 2}]
    both = pair_samples(recipe, rows, tokenizer, sampled)
    assert [(p["chosen"], p["chosen_source"]) for p in both] == [(gold, "sample"), (rows[1]["output"], "reference")]
    own = pair_samples(on_policy, rows, tokenizer, sampled)
    assert [(p["chosen"], p["rejected"], p["rejected_score"]) for p in own] == [(gold, "SELECT nothing FROM nowhere",
                                                                                0.0)]
    # `best`: where no answer is right, a query that runs is still preferred to one that fails; answers that all
    # score alike make no pair.
    best = pair_samples(load_recipe(recipe.source, ["stage.chosen=best"]), rows, tokenizer,
                        sampled + [{"row": 3, "answers": ["SELECT 1", "SELECT nothing FROM nowhere"]}])
    assert [(p["chosen"], p["chosen_source"]) for p in best] == [(gold, "sample"), ("SELECT 1", "sample")]
    assert best[0]["chosen_score"] == 1.0 and 0 < best[1]["chosen_score"] < 1 and best[1]["rejected_score"] == 0


def test_a_stage_takes_only_prompts_with_room_for_an_answer(parent, tmp_path):
    from tunebook.data import read_split
    from tunebook.models import load_tokenizer
    from tunebook.prompts import encode_prompt
    from tunebook.runs import parent_adapter_dir
    from tunebook.stages import stage_prompts

    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"prompts": 1000}))
    tokenizer = load_tokenizer(str(parent_adapter_dir(recipe)))
    rows = read_split(recipe.data.train)
    lengths = [len(encode_prompt(tokenizer, row, recipe.data.system_prompt)) for row in rows]
    limit = sorted(lengths)[len(lengths) // 2] + recipe.eval.max_new_tokens  # half the prompts fit
    fitting = load_recipe(recipe.source, [f"data.max_length={limit}"])
    answer = recipe.eval.max_new_tokens  # what DPO's pairs sample; GRPO's is grpo.max_completion_length
    chosen = stage_prompts(fitting, rows, tokenizer, answer)
    assert chosen == {i: n for i, n in enumerate(lengths) if n + answer <= limit}
    assert 0 < len(chosen) < len(rows), "TRL would cut or drop the pairs of the others"
    few = stage_prompts(load_recipe(fitting.source, [f"data.max_length={limit}", "stage.prompts=2"]), rows,
                        tokenizer, answer)
    assert len(few) == 2 and set(few) <= set(chosen)
    with pytest.raises(RecipeError, match="data.max_length"):
        stage_prompts(load_recipe(recipe.source, [f"data.max_length={min(lengths)}"]), rows, tokenizer, answer)


def test_greedy_rejects_the_parents_own_wrong_greedy_answer_first(parent, tmp_path):
    from tunebook.data import read_split
    from tunebook.models import load_tokenizer
    from tunebook.outputs import greedy_file, samples_file
    from tunebook.pairs import pair_samples, preference_pairs
    from tunebook.runs import identify, parent_adapter_dir

    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"samples": 2, "prompts": 3, "chosen": "sample",
                                                                      "rejected": "greedy"}))
    tokenizer = load_tokenizer(str(parent_adapter_dir(recipe)))
    rows = read_split(recipe.data.train)
    _, facts = preference_pairs(identify(recipe), rows, parent_adapter_dir(recipe), tokenizer)
    kept = [json.loads(line) for line in greedy_file(recipe.name).read_text().splitlines()]
    sampled = [json.loads(line) for line in samples_file(recipe.name).read_text().splitlines()]
    assert kept[0]["key"] == sampled[0]["key"] and [k["row"] for k in kept[1:]] == [s["row"] for s in sampled[1:]]
    assert "rejected_greedy" in facts

    # The rule on answers whose verdicts are known.
    gold, fails = rows[0]["output"], "SELECT nothing FROM nowhere"
    sampled = [{"row": 0, "answers": [gold, "DROP TABLE pets"], "greedy": fails},  # greedy wrong: it is rejected
               {"row": 1, "answers": [fails, fails], "greedy": fails},  # no right answer: no on-policy pair
               {"row": 2, "answers": ["DROP TABLE pets", rows[2]["output"]], "greedy": rows[2]["output"]}]
    pairs = pair_samples(recipe, rows, tokenizer, sampled)
    assert [(p["chosen"], p["rejected"], p["rejected_source"]) for p in pairs] == [
        (gold, fails, "greedy"), (rows[2]["output"], "DROP TABLE pets", "sample")]
    two = load_recipe(recipe.source, ["stage.pairs_per_prompt=2", "stage.chosen=sample_or_reference"])
    pairs = pair_samples(two, rows, tokenizer, sampled)
    assert [(p["chosen"], p["rejected"], p["rejected_source"]) for p in pairs] == [
        (gold, fails, "greedy"), (gold, "DROP TABLE pets", "sample"), (rows[1]["output"], fails, "greedy"),
        (rows[2]["output"], "DROP TABLE pets", "sample")]


def test_nearest_length_pairs_the_right_answer_with_the_wrong_one_of_its_length(parent):
    from tunebook.models import load_tokenizer
    from tunebook.outputs import fine_tuned_dir
    from tunebook.pairs import pick_pairs

    tokenizer = load_tokenizer(str(fine_tuned_dir(parent.name)))
    right = ["SELECT name FROM pets GROUP BY kind"]
    wrong = [(0.0, "SELECT nme FROM pets AS T1 JOIN owners AS T2 ON T1.owner = T2.id WHERE T2.age > 30"),
             (0.0, "SELECT nme FROM pets GROUP BY kind"), (0.4, "SELECT name FROM pets")]
    assert pick_pairs(right, wrong, "worst", tokenizer) == [(right[0], wrong[0][1], 0.0)]
    assert pick_pairs(right, wrong, "nearest_length", tokenizer) == [(right[0], "SELECT nme FROM pets GROUP BY kind",
                                                                      0.0)]

    # Several pairs per prompt: each distinct wrong answer rejected once, beside the right answer nearest its length.
    long_right = "SELECT T1.name FROM pets AS T1 JOIN owners AS T2 ON T1.owner = T2.id WHERE T2.age > 30"
    pairs = pick_pairs([right[0], right[0], long_right], wrong + [wrong[1]], "nearest_length", tokenizer, n=2)
    assert pairs == [(right[0], wrong[1][1], 0.0), (long_right, wrong[0][1], 0.0)]
    pairs = pick_pairs([right[0], right[0]], wrong + [wrong[1]], "nearest_length", tokenizer, n=5)
    assert [p[1] for p in pairs] == [wrong[1][1], wrong[2][1], wrong[0][1]] and {p[0] for p in pairs} == {right[0]}
    assert pick_pairs([right[0], long_right], wrong, "worst", tokenizer, n=3) == [(right[0], wrong[0][1], 0.0),
                                                                                  (long_right, wrong[1][1], 0.0),
                                                                                  (right[0], wrong[2][1], 0.4)]

    # No pair of answers further apart than max_gap tokens (SmolLM2's tokenizer: right 8 and 35 tokens, wrong 33,
    # 9 and 4); a prompt may then make none.
    size = {a: len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in [right[0], long_right,
                                                                                  *(w[1] for w in wrong)]}
    assert [size[a] for a in [right[0], long_right, *(w[1] for w in wrong)]] == [8, 35, 33, 9, 4]
    assert pick_pairs(right, wrong, "worst", tokenizer, max_gap=4) == [(right[0], wrong[1][1], 0.0)]
    assert pick_pairs(right, wrong, "worst", tokenizer, n=3, max_gap=4) == [(right[0], wrong[1][1], 0.0),
                                                                            (right[0], wrong[2][1], 0.4)]
    assert pick_pairs([right[0], long_right], wrong, "worst", tokenizer, n=3, max_gap=2) == [
        (long_right, wrong[0][1], 0.0), (right[0], wrong[1][1], 0.0)]
    assert pick_pairs(right, wrong[:1], "nearest_length", tokenizer, max_gap=4) == []
    assert pick_pairs(right, wrong[:1], "nearest_length", tokenizer) == [(right[0], wrong[0][1], 0.0)]


def render_prompt_of(recipe, row):
    from tunebook.models import load_tokenizer
    from tunebook.prompts import render_prompt
    from tunebook.runs import parent_adapter_dir

    return render_prompt(load_tokenizer(str(parent_adapter_dir(recipe))), row, recipe.data.system_prompt)


def test_grpo_stage_is_rewarded_by_the_sql_metric(parent, tmp_path):
    from tunebook.train import train

    recipe = load_recipe(stage_recipe(parent, tmp_path, "grpo", stage={"rewards": ["sql_execution"], "prompts": 4},
                                      grpo={"num_generations": 2, "max_completion_length": 8,
                                            "per_device_train_batch_size": 2}))
    out = train(recipe)
    info = json.loads((out / "run_info.json").read_text())
    assert info["method"] == "grpo" and info["global_steps"] == 2 and info["prompts"] == 4
    history = json.loads((out / "loss_log.json").read_text())
    assert any("reward" in h or "rewards/sql_execution/mean" in h for h in history), history[:2]


def test_a_stage_is_a_new_run_when_its_parent_changes(parent, tmp_path):
    from tunebook.runs import identify
    from tunebook.train import train

    path = stage_recipe(parent, tmp_path, "grpo", stage={"rewards": ["exact_match"]})
    before = identify(load_recipe(path)).fingerprint
    source = parent.source
    with open(source) as handle:
        text = handle.read()
    with open(source, "w") as handle:
        handle.write(text.replace("seed: 7", "seed: 9"))
    train(load_recipe(source), force=True)
    after = identify(load_recipe(path)).fingerprint
    assert before["stage.parent adapter (sha256)"] != after["stage.parent adapter (sha256)"]


@pytest.fixture
def pets(tmp_path):
    path = tmp_path / "pets.sqlite"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE pets (name TEXT, age INTEGER); INSERT INTO pets VALUES ('Rex', 3), ('Tom', 5);")
    con.commit()
    con.close()
    return str(path)


def test_metric_rewards_score_known_good_bad_and_hostile_answers(pets):
    gold = "SELECT name FROM pets WHERE age > 4"
    answers = ["SELECT name FROM pets WHERE age > 4", "```sql\nSELECT name FROM pets WHERE age >= 5\n```",
               "SELECT age FROM pets", "SELECT name, age FROM pets", "SELECT * FROM nowhere", "DROP TABLE pets",
               "SELECT zeroblob(300000000)", "SELECT instr(printf('%.*c', 3000000, 'a'), printf('%.*c', 200000, 'a') || 'b')"]
    scores = REWARDS["sql_execution"](None, answers, reference=[gold] * len(answers), db_path=[pets] * len(answers))
    assert scores == [1.0, 1.0, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0]
    assert REWARDS["exact_match"](None, ["a  b", "a c"], reference=["a b"] * 2) == [1.0, 0.0]
    assert REWARDS["json_match"](None, ['{"a": 1}', "[1]", "no"], reference=['{"a":1}'] * 3) == [1.0, 0.2, 0.0]
    chat = [[{"role": "assistant", "content": '{"a": 1}'}]]
    assert REWARDS["json_match"](None, chat, reference=['{"a": 1}']) == [1.0]
    assert load_reward("tunebook.rewards:exact_match") is REWARDS["exact_match"]
    # Review: ruff judges the answer's improved code on the row's rule, as the `code_fixed` metric does.
    snippet = "```python\nif not x in y:\n    pass\n```"
    fixed = "E713 (not-in-test): use `not in`.\n\nImproved code:\n```python\nif x not in y:\n    pass\n```"
    handed_back = "E713: fixed.\n\nImproved code:\n```python\nif not x in y:\n    pass\n```"
    unrelated = "Slow.\n\n```python\ndef check(x, y):\n    return x\n```"
    review = [fixed, handed_back, unrelated, "Looks fine."]
    scores = REWARDS["code_fixed"](None, review, reference=[fixed] * 4, code=[snippet] * 4, rule=["E713"] * 4)
    assert scores == [1.0, 0.0, 0.0, 0.0]
    spaced = fixed.replace("y:", "y :")  # the strict check: the reference fix, formatting aside, and nothing else
    edited = "E713.\n\nImproved code:\n```python\nif x not in y:\n    print(x)\n```"
    strict = REWARDS["fix_matches_reference"](None, [spaced, edited, handed_back], reference=[fixed] * 3,
                                              code=[snippet] * 3, rule=["E713"] * 3)
    assert strict == [1.0, 0.0, 0.0]
    assert REWARDS["code_fixed"](None, [edited], reference=[fixed], code=[snippet], rule=["E713"]) == [1.0]
    with pytest.raises(RecipeError, match="cannot load the reward 'nowhere.fn'"):
        load_reward("nowhere.fn")


def test_bad_stages_and_preference_rows_are_named_before_any_model_loads(parent, tmp_path):
    from tunebook.validate import validate_recipe

    with pytest.raises(RecipeError, match=r"stage.rewards: 'sql_exec' is not a reward. Did you mean 'sql_execution'"):
        load_recipe(stage_recipe(parent, tmp_path, "grpo", stage={"rewards": ["sql_exec"]}))
    with pytest.raises(RecipeError, match=r"stage.rewards: 'code_fix' is not a reward. Did you mean 'code_fixed'"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"rewards": ["code_fix"]}))
    with pytest.raises(RecipeError, match="stage.rewards: names 2 rewards; DPO pairs are judged by one"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"rewards": ["exact_match", "sql_execution"]}))
    with pytest.raises(RecipeError, match="stage.chosen: 'samples' is not a source of chosen answers. Use one of"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"chosen": "samples"}))
    with pytest.raises(RecipeError, match="stage.pairs_per_prompt: 0 makes no pairs. Use 1 or more"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"pairs_per_prompt": 0, "samples": 4}))
    with pytest.raises(RecipeError, match="stage.max_length_gap: -1 is not a number of tokens"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"max_length_gap": -1, "samples": 4}))
    with pytest.raises(RecipeError, match="stage.rejected: 'shortest' is not a way to pick the rejected answer"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"rejected": "shortest"}))
    with pytest.raises(RecipeError, match="stage.parent: a dpo stage starts from another recipe's adapter"):
        load_recipe(write_recipe(tmp_path / "x.yaml", model={"name": "smollm2-135m-instruct"}, task="sql",
                                 data={"train": "a", "val": "b", "test": "c"}, stage={"method": "dpo"}, dpo={}))
    with pytest.raises(RecipeError, match="grpo: is the settings of another method"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", grpo={"num_generations": 2}))
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "", "rejected": "b"}\n')
    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo"), [f"data.train={bad}"])
    with pytest.raises(RecipeError, match=r"prefs.jsonl: line 2: field 'chosen': is empty"):
        validate_recipe(recipe)
    bad.write_text('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(RecipeError, match=r"line 1: prompt"):
        validate_recipe(recipe)
    bad.write_text('{"prompt": "q", "chosen": "same", "rejected": "same"}\n')
    with pytest.raises(RecipeError, match="same chosen and rejected"):
        validate_recipe(recipe)
    # preference rows are a DPO stage's training data only
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    for method, split in (("grpo", "train"), ("dpo", "test")):
        recipe = load_recipe(stage_recipe(parent, tmp_path, method, stage={"rewards": ["exact_match"]}),
                             [f"data.{split}={bad}"])
        with pytest.raises(RecipeError, match=rf"prefs.jsonl: line 1: is a preference row .* data.{split} of a "
                                              rf"{method.upper()} recipe needs prompts with one answer"):
            validate_recipe(recipe)


def score_all(prompts, completions, **kwargs):  # a user's reward, as TRL would call it
    return [1.0 for _ in completions]


def no_kwargs(prompts, completions):
    return [1.0 for _ in completions]


def needs_label(prompts, completions, label, **kwargs):
    return [1.0 for _ in completions]


def test_rewards_and_trainer_settings_are_checked_as_trl_will_use_them(parent, tmp_path):
    from tunebook.validate import validate_recipe

    def check(method: str, **sections):
        if method == "grpo":
            sections["grpo"] = {"num_generations": 2, **sections.get("grpo", {})}
        return validate_recipe(load_recipe(stage_recipe(parent, tmp_path, method, **sections)))

    check("grpo", stage={"rewards": [f"{__name__}:score_all", "sql_execution"]})
    with pytest.raises(RecipeError, match=r"stage.rewards: 'test_stages:no_kwargs' takes no \*\*kwargs"):
        check("grpo", stage={"rewards": [f"{__name__}:no_kwargs"]})
    with pytest.raises(RecipeError, match=r"'test_stages:needs_label' needs label, which the rows of .* do not give "
                                          r"\(they give: db_path, reference\)"):
        check("dpo", stage={"rewards": [f"{__name__}:needs_label"]})
    with pytest.raises(RecipeError, match=r"stage.rewards: 'code_fixed' needs code, rule"):
        check("grpo", stage={"rewards": ["code_fixed"]})
    with pytest.raises(RecipeError, match=r"grpo: TRL refuses these settings: generation_batch_size \(3\) must be "
                                          r"divisible by num_generations \(2\)"):
        check("grpo", stage={"rewards": ["sql_execution"]}, grpo={"per_device_train_batch_size": 3,
                                                                   "num_generations": 2})
    with pytest.raises(RecipeError, match=r"dpo: TRL refuses these settings: .*warmup_steps"):
        check("dpo", dpo={"warmup_steps": -3})
    check("dpo", dpo={"fp16": False})  # setting one precision flag leaves the other off, not in conflict
    check("dpo", dpo={"loss_type": ["ipo", "sft"]})
    with pytest.raises(RecipeError, match=r"dpo.loss_type: 'sigmiod' is not a loss type TRL's DPOConfig knows "
                                          r"\(sigmoid, hinge, ipo.*Did you mean 'sigmoid'\?"):
        check("dpo", dpo={"loss_type": ["sigmiod"]})
    with pytest.raises(RecipeError, match=r"grpo.loss_type: 'dr-grpo' is not a loss type TRL's GRPOConfig knows "
                                          r"\(grpo, dr_grpo, dapo.*Did you mean 'dr_grpo'\?"):
        check("grpo", stage={"rewards": ["sql_execution"]}, grpo={"loss_type": "dr-grpo"})


def test_a_stage_takes_preference_rows_as_they_are(parent, tmp_path):
    from tunebook.train import train

    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant",
             "content": "SELECT 1"}], "rejected": "I do not know."} for i in range(4)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo"), [f"data.train={prefs}"])
    info = json.loads((train(recipe) / "run_info.json").read_text())
    assert info["pairs"] == {"source": str(prefs), "pairs": 4}


def test_repair_chooses_the_fixed_version_of_the_parents_own_wrong_answer(parent, tmp_path):
    """`stage.repair`: a wrong answer's schema repair (the other table's column, joined along the foreign key) is
    judged like any answer; a right repair is chosen over the answer it came from, so the pair differs just where
    the parent went wrong. Repairs never use the reference, and a wrong repair is never made a pair."""
    from conftest import sqlite_file

    from tunebook.models import load_tokenizer
    from tunebook.pairs import pair_samples
    from tunebook.runs import identify, parent_adapter_dir
    from tunebook.validate import check_stage_inputs

    db = sqlite_file(tmp_path / "school.sqlite", """
        CREATE TABLE city (city_id INTEGER PRIMARY KEY, city_name TEXT);
        CREATE TABLE student (stu_id INTEGER PRIMARY KEY, name TEXT, city_id INTEGER REFERENCES city(city_id));
        INSERT INTO city VALUES (1, 'Oslo'), (2, 'Lima');
        INSERT INTO student VALUES (1, 'Ann', 1), (2, 'Bo', 2), (3, 'Cy', 1);""")
    gold = "SELECT T1.name FROM student AS T1 JOIN city AS T2 ON T1.city_id = T2.city_id WHERE T2.city_name = 'Oslo'"
    rows = [{"instruction": "Names of the students from Oslo?", "input": "", "output": gold, "db_path": str(db)},
            {"instruction": "How many students?", "input": "", "output": "SELECT COUNT(*) FROM student",
             "db_path": str(db)}]
    skips_join = "SELECT name FROM student WHERE city_name = 'Oslo'"  # fails: city_name is the city's
    sampled = [{"row": 0, "answers": [skips_join, "SELECT name FROM student"], "greedy": skips_join},
               {"row": 1, "answers": ["SELECT COUNT(*) FROM city", "SELECT nothing FROM nowhere"],
                "greedy": "SELECT nothing FROM nowhere"}]  # nothing to repair into the right answer
    recipe = load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"chosen": "sample", "rejected": "greedy"}))
    tokenizer = load_tokenizer(str(parent_adapter_dir(recipe)))
    assert pair_samples(recipe, rows, tokenizer, sampled) == [], "no sample was right"
    fixed = pair_samples(load_recipe(recipe.source, ["stage.repair=true"]), rows, tokenizer, sampled)
    assert len(fixed) == 1 and fixed[0]["rejected"] == skips_join and fixed[0]["rejected_source"] == "greedy"
    assert fixed[0]["chosen_source"] == "repair" and "JOIN city" in fixed[0]["chosen"]
    assert fixed[0]["chosen_score"] == 1.0
    # the field is in a run's fingerprint only when set, so stage runs trained before it existed still match
    assert "stage.repair" not in identify(recipe).fingerprint
    assert identify(load_recipe(recipe.source, ["stage.repair=true"])).fingerprint["stage.repair"] is True
    with pytest.raises(RecipeError, match="stage.repair"):
        load_recipe(stage_recipe(parent, tmp_path, "dpo", stage={"repair": "yes"}))
    with pytest.raises(RecipeError, match="stage.repair: none of this recipe's metrics"):  # review has no repair
        check_stage_inputs(load_recipe("smollm2-review-dpo", ["stage.repair=true"]), [])
