"""Recipe schema: YAML -> typed, validated dataclasses.

The `lora` and `training` sections are checked against the fields of `peft.LoraConfig` and `trl.SFTConfig`
themselves, so the libraries' documentation applies word for word and a new library option needs no change
here. Everything tunebook owns (`model`, `data`, `eval`, `export`) is a dataclass below.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunebook.errors import RecipeError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
RECIPES_DIR = Path("recipes")
# Recipe names (file stems), run labels and task names become folder names: letters, digits, '-' and '_'.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Fields whose values are secrets: never written into outputs (recipe.yaml, model cards, run_info.json).
SECRET_FIELDS = {"training": ("hub_token", "push_to_hub_token")}
REDACTED = "<redacted>"
# GGUF types `tunebook export` writes: the converter's own outtypes, then llama.cpp's quantiser's (LLAMA_FTYPE_*).
GGUF_DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s",
                    "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs",
                    "iq3_xs", "iq3_s", "iq3_m", "iq1_s", "iq1_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")
GGUF_TYPES = GGUF_DIRECT_TYPES + GGUF_QUANT_TYPES
UNQUANTISED_GGUF_TYPES = ("f32", "f16", "bf16")
# `eval.max_new_tokens` when a recipe does not set it; also the app's starting value.
DEFAULT_MAX_NEW_TOKENS = 128
# llama.cpp's quantizer (llama-cpp-python 0.3.36) refuses these without an importance matrix, which tunebook does
# not compute: each was tried on a tiny model, and these alone returned an error.
GGUF_IMATRIX_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")

# SFTConfig fields tunebook derives itself; a recipe that sets them would fight the one place they live.
TRAINING_OWNED = {
    "output_dir": "outputs go to models/fine-tuned/<recipe>/ (checkpoints and TensorBoard events under models/checkpoints/<recipe>/)",
    "max_length": "set `data.max_length` instead",
}


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    name: str
    dtype: str = "float32"
    quantization: str = "none"
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
class DataConfig:
    """Where the splits are and how examples become token sequences."""

    train: str
    val: str
    test: str
    max_length: int = 512
    system_prompt: str | None = None
    train_limit: int | None = None
    val_limit: int | None = 64
    # Train and validate only on rows whose fields have these values, e.g. {source: [spider, chinook]}.
    # The test split is never filtered: the report scores all of it, with its subsets.
    where: dict[str, list] | None = None
    # Show matching training rows this many times per epoch, e.g. {shape: {join1: 2}}: a mix chosen by measuring.
    repeat: dict[str, dict] | None = None
    # Training rows sharing this field and their input's opening paragraphs (a schema) become conversations of
    # up to `turns` questions, e.g. {by: db_id, turns: 4}: the context is read once for several answers.
    share_context: dict[str, Any] | None = None


@dataclass
class EvalConfig:
    """Generation settings for `tunebook eval`."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 16
    limit: int | None = None
    metrics: list[str] = field(default_factory=list)  # names in metrics.METRICS; empty: the task's defaults
    main_metric: str | None = None  # the report column that headlines; None: the task's, else the first column
    where: dict[str, list] | None = None  # evaluate only rows with these field values (before `limit`)
    limit_per: str | None = None  # `limit` rows for each value of this field (e.g. source), instead of in all
    # plain: greedy; verified: also a pass constrained to what can exist and checked without the reference
    decoding: list[str] = field(default_factory=lambda: ["plain"])


@dataclass
class ExportConfig:
    """What `tunebook export` writes."""

    gguf: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    verify_prompts: int = 6
    # The LoRA adapter alone as GGUF too, applied by llama.cpp to the base model's GGUF (one base file serves
    # every run of that base); the base is written in the smallest type of `gguf`.
    adapter_gguf: bool = True


METHODS = ("sft", "dpo", "grpo")
# The section a method's trainer settings live in, and the TRL config class they are checked against.
METHOD_SECTIONS = {"sft": "training", "dpo": "dpo", "grpo": "grpo"}


@dataclass
class StageConfig:
    """A training stage after SFT (`stage:`): TRL's DPO or GRPO, starting from another recipe's adapter."""

    method: str = "sft"
    parent: str | None = None  # the recipe (name or path) whose adapter this stage starts from
    rewards: list[str] = field(default_factory=list)  # GRPO's rewards / DPO's pair judge: rewards.py names or module:function
    # DPO: pairs made from the parent's own answers on training prompts, judged by stage.rewards or the task's metric
    samples: int = 4  # answers sampled per prompt
    temperature: float = 0.8
    prompts: int | None = 400  # training prompts to sample from (None: all)
    # DPO: where a pair's chosen answer comes from: a full-marks sample, else the reference (`sample_or_reference`),
    # or a full-marks sample only, so both answers of every pair are the parent's own (`sample`: on-policy pairs),
    # or the prompt's best-scoring answers, full marks or not, over its lower-scoring ones (`best`: with a shaped
    # judge, a query that runs is preferred to one that fails even where no answer was right)
    chosen: str = "sample_or_reference"
    # DPO: which answer is rejected: the lowest-scoring sample (`worst`), or the one of the samples not at full marks
    # whose length is nearest the chosen answer's (`nearest_length`), so that length does not tell the pair apart, or
    # the parent's greedy answer (the one eval scores) where it is wrong, else as `nearest_length` (`greedy`)
    rejected: str = "worst"
    # DPO: pairs per prompt, each rejecting another distinct wrong answer: more pairs from the same samples
    pairs_per_prompt: int = 1
    # DPO: no pair whose two answers differ by more than this many tokens (None: any gap). Where the wrong answers
    # run longer than the right ones, the far-apart pairs teach that short is right (docs/stages.md)
    max_length_gap: int | None = None
    # DPO: also judge the task's repair of each wrong answer (SQL: its columns put on the tables that have them,
    # joining along foreign keys; never from the reference), a right repair becoming a chosen answer: a pair that
    # differs from the parent's own wrong answer just where it went wrong
    repair: bool = False


@dataclass
class Recipe:
    """A whole recipe, resolved and validated."""

    name: str
    source: str
    model: ModelConfig
    task: str
    data: DataConfig
    lora: dict[str, Any]
    training: dict[str, Any]
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    overrides: list[str] = field(default_factory=list)  # the dotted overrides it was loaded with
    run_label: str | None = None  # `--name LABEL`: the run's outputs go to <name>@LABEL

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, in the same shape as the YAML (written beside every output); secrets redacted."""
        out = {
            "model": dataclasses.asdict(self.model),
            "task": self.task,
            "data": dataclasses.asdict(self.data),
            "lora": dict(self.lora),
            "training": dict(self.training),
            "eval": dataclasses.asdict(self.eval),
            "export": dataclasses.asdict(self.export),
        }
        if self.method != "sft":
            out["stage"] = dataclasses.asdict(self.stage)
            out[METHOD_SECTIONS[self.method]] = out.pop("training")
        for section, keys in SECRET_FIELDS.items():
            if section == "training" and self.method != "sft":
                section = METHOD_SECTIONS[self.method]
            for key in keys:
                if out[section].get(key) is not None:
                    out[section][key] = REDACTED
        return out

    @property
    def command_name(self) -> str:
        """How to name this recipe on the command line: its stem if it lives in recipes/, else its path."""
        return self.name if Path(self.source).parent == RECIPES_DIR else self.source

    @property
    def seed(self) -> int:
        return int(self.training.get("seed", 42))

    @property
    def method(self) -> str:
        """sft, dpo or grpo: which TRL trainer trains this recipe (`training` holds that trainer's settings)."""
        return self.stage.method


SECTIONS: dict[str, type | None] = {
    "model": ModelConfig,
    "task": None,
    "data": DataConfig,
    "lora": None,
    "training": None,
    "stage": StageConfig,
    "dpo": None,
    "grpo": None,
    "eval": EvalConfig,
    "export": ExportConfig,
}


# ---------------------------------------------------------------- locating and loading


def redacted_overrides(overrides: list[str]) -> list[str]:
    """Overrides as they may be written into outputs: the value of a secret field replaced."""
    secret = {f"{section}.{key}" for section, keys in SECRET_FIELDS.items() for key in keys}
    return [f"{item.split('=', 1)[0]}={REDACTED}" if item.split("=", 1)[0].strip() in secret else item
            for item in overrides]


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe named by path (`recipes/smollm2-sql.yaml`) or by stem (`smollm2-sql`)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise RecipeError(str(p), None, "recipe file not found.", "Check the path, or name a recipe by its stem.")
        if not NAME_RULE.fullmatch(p.stem):
            raise RecipeError(str(p), None, f"'{p.stem}' is not a recipe name: the name becomes the folder of "
                              "the recipe's outputs.", "Rename the file to letters, digits, '-' and '_' "
                              "(e.g. my-recipe.yaml).")
        return p
    if not NAME_RULE.fullmatch(str(name_or_path)):
        raise RecipeError(str(name_or_path), None, "is not a recipe name or a .yaml path.",
                          "Name a recipe by its stem (letters, digits, '-' and '_') or by its path.")
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(str(name_or_path), known, n=1)
    fix = f"Did you mean '{hint[0]}'?" if hint else f"Known recipes: {', '.join(known) or 'none'}."
    raise RecipeError(str(candidate), None, f"no recipe named '{name_or_path}'.", fix)


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe's schema (no files opened beyond the YAML, no model loaded)."""
    path = recipe_path(name_or_path)
    source = str(path)
    try:
        raw = yaml.load(read_utf8(path), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKey as exc:
        raise RecipeError(source, f"line {exc.line}", f"repeats '{exc.key}' (first on line {exc.first}); YAML would "
                          "keep only the last one, silently.", "Merge the two into one.") from None
    except yaml.YAMLError as exc:
        raise RecipeError(source, None, f"is not valid YAML ({exc}).", "Fix the YAML syntax.") from None
    if not isinstance(raw, dict):
        raise RecipeError(source, None, "must be a mapping of sections.", f"Use the sections {', '.join(SECTIONS)}.")
    for item in overrides or []:
        apply_override(raw, item, source)
    recipe = parse_recipe(raw, name=path.stem, source=source)
    recipe.overrides = list(overrides or [])
    return recipe


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line}")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key a mapping already has (PyYAML keeps the last, so a second `training:`
    section would silently replace the first)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
        return super().construct_mapping(node, deep)


def read_utf8(path: Path) -> str:
    """A text file's contents; bytes that are not UTF-8 are an error naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not content
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(str(path), f"line {line}", f"is not UTF-8 (byte 0x{data[exc.start]:02x}).",
                          "Save the file as UTF-8.") from None


def apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    """Apply one dotted `section.key=value` override; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in item:
        raise RecipeError(source, item, "override must look like section.key=value.", "Example: lora.r=32")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    target = raw
    for key in keys[:-1]:
        if target.get(key) is None:
            target[key] = {}  # absent, or written as an empty `eval:`
        if not isinstance(target[key], dict):
            raise RecipeError(source, dotted, f"'{key}' is not a section.", "Override a key inside a section.")
        target = target[key]
    try:
        parsed = yaml.safe_load(value) if value != "" else None
        if isinstance(parsed, str) and not value.lstrip().startswith(("'", '"')):
            parsed = value.strip()  # text as typed: YAML would cut `Answer briefly #no-fluff` at its ` #`
        target[keys[-1]] = parsed
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise RecipeError(
            source, dotted, f"the override value {value!r} is not valid YAML ({problem}).",
            f"Quote it (`{dotted}='{value}'`) or complete it (lists look like `[a, b]`).",
        ) from None


def parse_recipe(raw: dict[str, Any], name: str, source: str) -> Recipe:
    """Turn the YAML mapping into a typed Recipe, raising RecipeError on the first problem found."""
    unknown_keys(raw, SECTIONS, source, prefix="")
    stage = build_section(StageConfig, raw.get("stage") or {}, source, "stage")
    check_choice(stage.method, METHODS, source, "stage.method")
    section = METHOD_SECTIONS[stage.method]
    required = ("model", "task", "data", "lora", "training") if stage.method == "sft" else ("model", "task", "data",
                                                                                          section)
    for needed in required:
        if needed not in raw:
            raise RecipeError(source, needed, "is missing.", f"A {stage.method} recipe needs the sections "
                              f"{', '.join(required)}.")
    for other in set(METHOD_SECTIONS.values()) - {section}:
        if other in raw:
            raise RecipeError(source, other, f"is the settings of another method (this recipe's stage.method is "
                              f"{stage.method}).", f"Put the trainer's settings under `{section}:`.")
    check_stage(stage, source)
    task = raw["task"]
    if not isinstance(task, str) or not NAME_RULE.fullmatch(task):
        raise RecipeError(source, "task", f"{task!r} is not a task name.",
                          "Name the task in letters, digits, '-' or '_' (e.g. `task: translate`).")
    model = build_section(ModelConfig, raw["model"], source, "model")
    check_choice(model.dtype, DTYPES, source, "model.dtype")
    check_choice(model.quantization, QUANTIZATIONS, source, "model.quantization")
    data = build_section(DataConfig, raw["data"], source, "data")
    check_counts(data, source, "data", at_least={"max_length": 16, "train_limit": 1, "val_limit": 0})
    data.where = where_clause(data.where, source, "data.where")
    data.repeat = repeat_clause(data.repeat, source)
    data.share_context = share_context_clause(data.share_context, source)
    # A stage trains its parent's adapter further: that adapter's LoRA settings are the stage's.
    lora = library_section(raw.get("lora") or {}, lora_fields(), source, "lora", "peft.LoraConfig")
    check_lora_values(lora, source)
    owner = {"sft": "trl.SFTConfig", "dpo": "trl.DPOConfig", "grpo": "trl.GRPOConfig"}[stage.method]
    training = library_section(raw[section], trainer_fields(stage.method), source, section, owner)
    check_training_values(training, source, section)
    for key, where in TRAINING_OWNED.items():
        if key in training:
            raise RecipeError(source, f"{section}.{key}", "is set by tunebook.", f"Remove it: {where}.")
    resume = training.get("resume_from_checkpoint")
    if resume not in (None, "auto") and not Path(str(resume)).is_dir():
        raise RecipeError(
            source, f"{section}.resume_from_checkpoint", f"'{resume}' is not a checkpoint directory.",
            "Use 'auto' (last complete checkpoint) or a path to a checkpoint-N directory.",
        )
    eval_cfg = build_section(EvalConfig, raw.get("eval") or {}, source, "eval")
    check_counts(eval_cfg, source, "eval", at_least={"max_new_tokens": 1, "batch_size": 1, "limit": 1})
    eval_cfg.where = where_clause(eval_cfg.where, source, "eval.where")
    eval_cfg.metrics, eval_cfg.main_metric = chosen_metrics(eval_cfg, task, source)
    eval_cfg.decoding = decoding_choice(eval_cfg, source)
    export = build_section(ExportConfig, raw.get("export") or {}, source, "export")
    if isinstance(export.gguf, str):
        export.gguf = [export.gguf]  # `gguf: q8_0` means one type
    if export.verify_prompts is not None and export.verify_prompts < 1:
        raise RecipeError(source, "export.verify_prompts", f"{export.verify_prompts} is too small: the GGUF files are "
                          "compared with the merged model on this many test prompts.",
                          "Use 1 or more; `tunebook export --no-verify` skips the comparison.")
    for qtype in export.gguf:
        if qtype not in GGUF_TYPES:
            hint = difflib.get_close_matches(str(qtype).lower(), GGUF_TYPES, n=1)
            raise RecipeError(source, "export.gguf", f"'{qtype}' is not a GGUF type llama.cpp writes.",
                              f"Did you mean '{hint[0]}'?" if hint else f"Use e.g. {', '.join(GGUF_TYPES[:8])} …")
        if qtype in GGUF_IMATRIX_TYPES:
            raise RecipeError(source, "export.gguf", f"'{qtype}' needs an importance matrix (llama.cpp refuses it "
                              "without one), and tunebook does not compute one.",
                              "Use a k-quant instead: q2_k, q3_k_m or q4_k_m for small files.")
    return Recipe(
        name=name,
        source=source,
        model=model,
        task=task,
        data=data,
        lora=lora,
        training=training,
        eval=eval_cfg,
        export=export,
        stage=stage,
    )


CHOSEN_FROM = ("sample_or_reference", "sample", "best")  # StageConfig.chosen
REJECTED_BY = ("worst", "nearest_length", "greedy")  # StageConfig.rejected


def check_stage(stage: StageConfig, source: str) -> None:
    """A DPO/GRPO stage names its parent recipe and only rewards that exist (metric names or module:function):
    GRPO at least one, DPO at most one (the judge of its pairs)."""
    if stage.method == "sft":
        if stage.parent or stage.rewards:
            raise RecipeError(source, "stage", "parent and rewards belong to a dpo or grpo stage.",
                              "Set stage.method: dpo or grpo, or remove them.")
        return
    if not stage.parent:
        raise RecipeError(source, "stage.parent", f"a {stage.method} stage starts from another recipe's adapter.",
                          "Name it, e.g. `stage: {method: " + stage.method + ", parent: smollm2-sql}`.")
    from tunebook.rewards import REWARDS

    if stage.method == "grpo" and not stage.rewards:
        raise RecipeError(source, "stage.rewards", "GRPO needs at least one reward.",
                          f"Name metric rewards ({', '.join(REWARDS)}) or your own as module:function.")
    if stage.method == "dpo" and len(stage.rewards) > 1:
        raise RecipeError(source, "stage.rewards", f"names {len(stage.rewards)} rewards; DPO pairs are judged by one.",
                          "Name one reward, or none to judge by the task's first metric.")
    for name in stage.rewards:
        if name not in REWARDS and ":" not in str(name) and "." not in str(name):
            hint = difflib.get_close_matches(str(name), list(REWARDS), n=1)
            raise RecipeError(source, "stage.rewards", f"'{name}' is not a reward.",
                              (f"Did you mean '{hint[0]}'? " if hint else "") +
                              f"Rewards: {', '.join(REWARDS)}, or module:function for your own.")
    if stage.samples < 2:
        raise RecipeError(source, "stage.samples", f"{stage.samples} is too few to make pairs.", "Use 2 or more.")
    if stage.chosen not in CHOSEN_FROM:
        raise RecipeError(source, "stage.chosen", f"'{stage.chosen}' is not a source of chosen answers.",
                          f"Use one of: {', '.join(CHOSEN_FROM)}.")
    if stage.rejected not in REJECTED_BY:
        raise RecipeError(source, "stage.rejected", f"'{stage.rejected}' is not a way to pick the rejected answer.",
                          f"Use one of: {', '.join(REJECTED_BY)}.")
    if stage.pairs_per_prompt < 1:
        raise RecipeError(source, "stage.pairs_per_prompt", f"{stage.pairs_per_prompt} makes no pairs.",
                          "Use 1 or more: each pair of a prompt rejects another of its wrong answers.")
    if not isinstance(stage.repair, bool):
        raise RecipeError(source, "stage.repair", f"{stage.repair!r} is not true or false.",
                          "Use `repair: true` to judge the task's repair of each wrong answer, or leave it out.")
    if stage.max_length_gap is not None and (not isinstance(stage.max_length_gap, int) or stage.max_length_gap < 0):
        raise RecipeError(source, "stage.max_length_gap", f"{stage.max_length_gap!r} is not a number of tokens.",
                          "Use a whole number of 0 or more (0: only answers of the same length), or leave it out.")


# ---------------------------------------------------------------- checks


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_lora_values(lora: dict[str, Any], source: str) -> None:
    """Values peft would only refuse after the model has loaded (or silently train nothing with)."""
    r = lora.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise RecipeError(source, "lora.r", f"{r!r} is not a rank.", "Use a whole number >= 1 (8, 16 and 32 are usual).")
    alpha = lora.get("lora_alpha")
    if alpha is not None and _number(alpha) and alpha <= 0:
        raise RecipeError(source, "lora.lora_alpha", f"{alpha} must be positive.", "Use e.g. twice lora.r.")
    dropout = lora.get("lora_dropout")
    if dropout is not None and _number(dropout) and not 0 <= dropout < 1:
        raise RecipeError(source, "lora.lora_dropout", f"{dropout} is not a dropout probability.",
                          "Use a value from 0 up to (not including) 1, e.g. 0.05.")
    layers = lora.get("layers_to_transform")
    indices = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if layers is not None and not (isinstance(indices, list) and indices
                                   and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
        raise RecipeError(source, "lora.layers_to_transform", f"{layers!r} is not a layer index or a list of them.",
                          "Write the decoder layers to adapt by index from 0, e.g. [15, 16, 17], or leave it out "
                          "to adapt every layer.")
    targets = lora.get("target_modules")
    if isinstance(targets, list) and not targets:
        raise RecipeError(source, "lora.target_modules", "is empty: the adapter would train nothing.",
                          "List the layers to adapt (e.g. [q_proj, v_proj]), or write 'all-linear'.")
    if isinstance(targets, list) and not all(isinstance(t, str) and t for t in targets):
        raise RecipeError(source, "lora.target_modules", f"{targets!r} is not a list of layer names.",
                          "Write e.g. [q_proj, k_proj, v_proj, o_proj].")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            raise RecipeError(source, "lora.target_modules", f"'{targets}' is neither a list nor a valid regular "
                              f"expression ({exc}).", "Write a list, e.g. [q_proj, v_proj], or 'all-linear'.") from None


# Counts that must be at least 1 when set, and sizes that must be positive (TrainingArguments treats
# logging/save/eval steps below 1 as a fraction of the run).
_AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
_POSITIVE = ("learning_rate", "num_train_epochs", "logging_steps", "save_steps", "eval_steps")


def check_training_values(training: dict[str, Any], source: str, section: str = "training") -> None:
    """Values the Trainer would only refuse after the model has loaded."""
    for key in _AT_LEAST_ONE:
        value = training.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RecipeError(source, f"{section}.{key}", f"{value!r} is not a whole number >= 1.", "Use 1 or more.")
    for key in _POSITIVE:
        value = training.get(key)
        if value is not None and _number(value) and value <= 0:
            raise RecipeError(source, f"{section}.{key}", f"{value} must be positive.", "Use a value above 0.")
    for key in ("warmup_ratio", "weight_decay"):
        value = training.get(key)
        if value is not None and _number(value) and not 0 <= value <= 1:
            raise RecipeError(source, f"{section}.{key}", f"{value} is outside 0-1.", "Use a value from 0 to 1.")


def where_clause(where: Any, source: str, name: str) -> dict[str, list] | None:
    """`data.where`/`eval.where` as {field: [allowed values]}; a single value means a list of one."""
    if where is None:
        return None
    if not isinstance(where, dict) or not where:
        raise RecipeError(source, name, "must map field names to allowed values.",
                          "Write e.g. `where: {source: [spider, chinook]}`.")
    out = {}
    for key, values in where.items():
        values = values if isinstance(values, list) else [values]
        if not values or any(isinstance(v, dict | list) or v is None for v in values):
            raise RecipeError(source, f"{name}.{key}", f"{values!r} is not a list of values.",
                              f"Write e.g. `{key}: [a, b]`.")
        out[str(key)] = values
    return out


def share_context_clause(value: Any, source: str) -> dict[str, Any] | None:
    """`data.share_context` as {"by": field, "turns": whole number >= 2}."""
    if value is None:
        return None
    example = "Write e.g. `share_context: {by: db_id, turns: 4}` (up to 4 questions per schema)."
    if not isinstance(value, dict) or set(value) != {"by", "turns"}:
        raise RecipeError(source, "data.share_context", "must have exactly the keys `by` and `turns`.", example)
    if not isinstance(value["by"], str) or not value["by"]:
        raise RecipeError(source, "data.share_context.by", f"{value['by']!r} is not a field name.", example)
    turns = value["turns"]
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 2:
        raise RecipeError(source, "data.share_context.turns", f"{turns!r} is not a whole number >= 2.", example)
    return {"by": value["by"], "turns": turns}


def repeat_clause(repeat: Any, source: str) -> dict[str, dict[str, int]] | None:
    """`data.repeat` as {field: {value: times}} with whole times >= 1."""
    if repeat is None:
        return None
    example = "Write e.g. `repeat: {shape: {join1: 2}}` (rows with shape join1 appear twice)."
    if not isinstance(repeat, dict) or not repeat:
        raise RecipeError(source, "data.repeat", "must map a field to {value: times}.", example)
    out: dict[str, dict[str, int]] = {}
    for key, times_by_value in repeat.items():
        if not isinstance(times_by_value, dict) or not times_by_value:
            raise RecipeError(source, f"data.repeat.{key}", "must map values to whole numbers.", example)
        for value, times in times_by_value.items():
            if isinstance(times, bool) or not isinstance(times, int) or times < 1:
                raise RecipeError(source, f"data.repeat.{key}.{value}", f"{times!r} is not a whole number >= 1.",
                                  example)
        out[str(key)] = {str(v): t for v, t in times_by_value.items()}
    return out


DECODINGS = ("plain", "verified")


def decoding_choice(eval_cfg: EvalConfig, source: str) -> list[str]:
    """`eval.decoding` as a list of known modes; `verified` needs a metric that can judge one answer alone."""
    from tunebook.metrics import METRICS

    modes = [eval_cfg.decoding] if isinstance(eval_cfg.decoding, str) else list(eval_cfg.decoding)
    for mode in modes:
        if mode not in DECODINGS:
            raise RecipeError(source, "eval.decoding", f"'{mode}' is not a decoding.", f"Use {' and/or '.join(DECODINGS)}.")
    if "plain" not in modes:
        raise RecipeError(source, "eval.decoding", "has no 'plain': the report always scores greedy answers first.",
                          "Write [plain] or [plain, verified].")
    checkable = [name for name, m in METRICS.items() if m.check is not None]
    if "verified" in modes and not any(METRICS[name].check is not None for name in eval_cfg.metrics):
        raise RecipeError(source, "eval.decoding", "'verified' needs a metric that can check an answer on its own.",
                          f"Add one of {', '.join(checkable)} to eval.metrics, or use decoding: [plain].")
    return modes


def chosen_metrics(eval_cfg: EvalConfig, task: str, source: str) -> tuple[list[str], str]:
    """`eval.metrics` (or the task's defaults) checked against the named metrics, and the headline column."""
    from tunebook.metrics import METRICS
    from tunebook.tasks import get_task

    defaults = get_task(task)
    chosen = [eval_cfg.metrics] if isinstance(eval_cfg.metrics, str) else eval_cfg.metrics
    metrics = list(chosen) if chosen else list(defaults.metrics)
    columns: dict[str, str] = {}
    for name in metrics:
        if not isinstance(name, str) or name not in METRICS:
            hint = difflib.get_close_matches(str(name), list(METRICS), n=1)
            raise RecipeError(source, "eval.metrics", f"'{name}' is not a metric.",
                              (f"Did you mean '{hint[0]}'? " if hint else "") + f"Metrics: {', '.join(METRICS)}.")
        for column in METRICS[name].columns:
            if column in columns:
                raise RecipeError(source, "eval.metrics", f"'{columns[column]}' and '{name}' both write the "
                                  f"column '{column}'.", "Keep one of them.")
            columns[column] = name
    main = eval_cfg.main_metric
    if main is None:
        main = defaults.main_metric if defaults.main_metric in columns else next(iter(columns), "perplexity")
    elif main not in columns:
        hint = difflib.get_close_matches(str(main), list(columns), n=1)
        raise RecipeError(source, "eval.main_metric", f"'{main}' is not a column of eval.metrics "
                          f"({', '.join(metrics)}).", f"Did you mean '{hint[0]}'?" if hint else
                          f"Use one of {', '.join(columns)}, or add the metric that writes it to eval.metrics.")
    return metrics, main


def did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"Did you mean '{match[0]}'?" if match else "Remove it or check the spelling."


def unknown_keys(section: dict[str, Any], known: typing.Iterable[str], source: str, prefix: str) -> None:
    known = list(known)
    for key in section:
        if key not in known:
            raise RecipeError(source, f"{prefix}{key}", "unknown key.", did_you_mean(str(key), known))


def check_counts(section: Any, source: str, name: str, at_least: dict[str, int]) -> None:
    """Counts and sizes must be at least their minimum (None means 'no limit' where a field allows it)."""
    for key, minimum in at_least.items():
        value = getattr(section, key)
        if value is not None and value < minimum:
            raise RecipeError(source, f"{name}.{key}", f"{value} is too small.", f"Use {minimum} or more.")


def check_choice(value: Any, choices: tuple[str, ...], source: str, field_name: str) -> None:
    if value not in choices:
        raise RecipeError(source, field_name, f"'{value}' is not allowed.", f"Use one of {', '.join(choices)}.")


def build_section(cls: type, raw: Any, source: str, name: str) -> Any:
    """Build one of tunebook's own dataclasses from a mapping, checking keys, presence and types."""
    if not isinstance(raw, dict):
        raise RecipeError(source, name, "must be a mapping.", f"Write `{name}:` followed by indented keys.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown_keys(raw, fields, source, prefix=f"{name}.")
    values = {}
    for fname, f in fields.items():
        if fname in raw:
            values[fname] = coerce(raw[fname], hints[fname], source, f"{name}.{fname}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(source, f"{name}.{fname}", "is missing.", f"Add `{fname}:` under `{name}:`.")
    return cls(**values)


def library_section(raw: Any, hints: dict[str, Any], source: str, name: str, owner: str) -> dict[str, Any]:
    """Check a section that maps onto a library dataclass: every key must be one of its fields, of its type."""
    if not isinstance(raw, dict):
        raise RecipeError(source, name, "must be a mapping.", f"Its keys are the fields of {owner}.")
    out = {}
    for key, value in raw.items():
        if key not in hints:
            raise RecipeError(source, f"{name}.{key}", f"is not a field of {owner}.", did_you_mean(str(key), hints))
        out[key] = coerce(value, hints[key], source, f"{name}.{key}")
        choices = enum_choices(hints[key])
        if choices and isinstance(out[key], str) and out[key] not in choices:
            hint = difflib.get_close_matches(out[key], choices, n=1)
            raise RecipeError(source, f"{name}.{key}", f"'{out[key]}' is not one of {owner}'s choices.",
                              f"Did you mean '{hint[0]}'?" if hint else f"Use one of {', '.join(choices)}.")
    return out


def enum_choices(annotation: Any) -> list[str]:
    """The values of a string enum in an annotation (e.g. `SchedulerType | str`), the library's own list."""
    args = typing.get_args(annotation) or (annotation,)
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(member.value) for member in arg]
    return []


def coerce(value: Any, annotation: Any, source: str, field_name: str) -> Any:
    """Check `value` against a type annotation; accept the usual YAML slips (`2e-4` read as a string)."""
    allowed = simple_types(annotation)
    if not allowed or value is None and type(None) in allowed:
        return value
    if value is None:
        raise RecipeError(source, field_name, "must not be empty.", f"Give a value of type {type_names(allowed)}.")
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, int | float) and float in allowed:
        return finite(float(value), source, field_name)
    elif isinstance(value, str):
        if str in allowed:
            return value
        if float in allowed or int in allowed:
            try:
                number = finite(float(value), source, field_name)
            except ValueError:
                pass
            else:
                if float in allowed:
                    return number
                if number.is_integer():
                    return int(number)
    elif isinstance(value, list) and list in allowed or isinstance(value, dict) and dict in allowed:
        return value
    if isinstance(value, str) and list in allowed:
        return value
    raise RecipeError(
        source, field_name, f"{value!r} is a {type(value).__name__}, expected {type_names(allowed)}.",
        "Fix the value's type.",
    )


def finite(number: float, source: str, field_name: str) -> float:
    """A number a trainer can use: NaN and infinity (`.nan`, `.inf` in YAML) are refused."""
    if not math.isfinite(number):
        raise RecipeError(source, field_name, f"{number} is not a finite number.", "Give a real value.")
    return number


def simple_types(annotation: Any) -> set[type]:
    """The plain YAML-representable types an annotation admits; empty when it cannot be told."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: set[type] = set()
        for arg in typing.get_args(annotation):
            inner = simple_types(arg)
            if not inner:
                return set()
            out |= inner
        return out
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        return {list}
    if origin is dict or annotation is dict:
        return {dict}
    if annotation is type(None) or annotation is None:
        return {type(None)}
    if annotation in (bool, int, float, str):
        return {annotation}
    if isinstance(annotation, type) and issubclass(annotation, str):  # str-valued enums
        return {str}
    return set()


def type_names(allowed: set[type]) -> str:
    return " or ".join(sorted("null" if t is type(None) else t.__name__ for t in allowed))


def dataclass_hints(cls: type) -> dict[str, Any]:
    """Field name -> annotation, falling back to the default value's type where a hint will not resolve."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference the library never exports: fall back per field
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in hints:
            out[f.name] = hints[f.name]
        elif f.default is not dataclasses.MISSING and f.default is not None:
            out[f.name] = type(f.default)
        else:
            out[f.name] = Any
    return out


def lora_fields() -> dict[str, Any]:
    from peft import LoraConfig

    hints = dataclass_hints(LoraConfig)
    hints.pop("task_type", None)  # always CAUSAL_LM here
    return hints


def sft_fields() -> dict[str, Any]:
    from trl import SFTConfig

    return dataclass_hints(SFTConfig)


def trainer_config_class(method: str) -> type:
    """The TRL config class of a method: SFTConfig, DPOConfig or GRPOConfig."""
    import trl

    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[method]


def trainer_fields(method: str) -> dict[str, Any]:
    return dataclass_hints(trainer_config_class(method))
