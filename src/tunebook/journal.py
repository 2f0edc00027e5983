"""What an eval pass has generated so far, kept on disk as it is produced, so an interrupted or failed eval
resumes instead of generating everything again.

One append-only JSONL file per pass (base, fine-tuned, each GGUF): a header line with the key of everything the
answers depend on (rows, prompts, settings, model, adapter), then one line per generated batch. A file whose key
differs is started over; a line cut off by a kill is ignored. The report, once written whole, replaces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    """The answers one eval pass has produced, by row index, and values computed after them (perplexity)."""

    def __init__(self, path: Path, key: str):
        self.path = path
        self.key = key
        self.answers: dict[int, str] = {}
        self.seconds = 0.0
        self.values: dict[str, Any] = {}
        self.nll: dict[int, tuple[float, int]] = {}  # row -> its reference answer's summed NLL and token count
        self._read()

    def _read(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
        if not records or records[0].get("key") != self.key:
            return
        for record in records[1:]:
            if "rows" in record:
                self.answers.update(zip(record["rows"], record["answers"], strict=True))
                self.seconds += record.get("seconds", 0.0)
                if "nll" in record:
                    self.nll.update(zip(record["rows"], map(tuple, record["nll"]), strict=True))
            else:
                self.values.update(record.get("values", {}))

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or (not self.answers and not self.values)
        with self.path.open("w" if fresh else "a", encoding="utf-8") as handle:
            if fresh:
                handle.write(json.dumps({"key": self.key}) + "\n")
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, rows: list[int], answers: list[str], seconds: float,
            nll: list[tuple[float, int]] | None = None) -> None:
        """Record one generated batch (row indices into the eval rows, their answers, the time it took, and when
        they were scored beside it, each row's reference answer (summed NLL, tokens) for perplexity)."""
        record: dict[str, Any] = {"rows": rows, "answers": answers, "seconds": round(seconds, 4)}
        if nll is not None:
            record["nll"] = [list(n) for n in nll]
        self._append(record)
        self.answers.update(zip(rows, answers, strict=True))
        self.seconds += seconds
        if nll is not None:
            self.nll.update(zip(rows, nll, strict=True))

    def set(self, name: str, value: Any) -> None:
        """Record a value computed after generation (e.g. perplexity), so a resumed eval does not redo it."""
        self._append({"values": {name: value}})
        self.values[name] = value
