"""The plain baseline `make bench` compares tunebook's training path against.

What a user would write without tunebook: `transformers.Trainer` + PEFT LoRA, each batch padded to its longest
example, fp32, loss on the answer only. Same base model, rows, LoRA settings and steps as the recipe.
Prints one JSON line: tokens/s (non-padding), median step time and peak RSS.

    python bench/baseline_train.py RECIPE STEPS TOKENS_PER_STEP

The batch size is the number of examples that holds TOKENS_PER_STEP on average (tunebook's packed steps), so
both runs train the same number of steps on about the same tokens.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tunebook.bench import padded_collator
from tunebook.config import load_recipe
from tunebook.data import read_split, select_rows
from tunebook.models import load_tokenizer, resolve_model_path
from tunebook.prompts import encode_example
from tunebook.train import peak_memory_mb


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def main(recipe_name: str, steps: int, tokens_per_step: int) -> dict:
    recipe = load_recipe(recipe_name)
    path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(path)
    rows = read_split(recipe.data.train)
    if recipe.data.where:
        rows = select_rows(rows, recipe.data.where, recipe.data.train, recipe.source)
    encoded = [e for r in rows[: steps * 64]
               if (e := encode_example(tokenizer, r, recipe.data.system_prompt, recipe.data.max_length))]
    mean_length = sum(len(e["input_ids"]) for e in encoded) / len(encoded)
    batch_size = max(1, round(tokens_per_step / mean_length))
    encoded = encoded[: steps * batch_size]
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **recipe.lora))
    timer = StepTimer()
    args = TrainingArguments(output_dir="/tmp/tunebook-bench-baseline", max_steps=steps,
                             per_device_train_batch_size=batch_size, learning_rate=recipe.training["learning_rate"],
                             report_to=[], save_strategy="no", logging_steps=steps, use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=encoded, callbacks=[timer],
                      data_collator=padded_collator(tokenizer.pad_token_id))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(e["input_ids"]) for e in encoded)
    return {"batch_size": batch_size, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "step_s_median": round(sorted(timer.times)[len(timer.times) // 2], 3),
            "peak_rss_mb": peak_memory_mb(use_cuda=False)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
