"""The best model so far by one evaluation metric (``train.best_metric``), kept in ``RUN_DIR/best/``.

``best/`` is replaced as a whole: the new model is written to ``.best.tmp`` (every file fsynced),
the old ``best/`` renamed to ``.best.old``, the new one renamed into place, the old one deleted. A
crash between the two renames leaves ``.best.old``, which the next start puts back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io import _fsync_dir, atomic_write_text

EVAL_FILE = "eval.json"


class BestModel:
    def __init__(self, path: Path, metric: str, mode: str = "max"):
        self.path, self.metric, self.mode = Path(path), metric, mode
        self._tmp, self._old = self.path.with_name(".best.tmp"), self.path.with_name(".best.old")
        if self._old.is_dir():
            if self.path.is_dir():
                shutil.rmtree(self._old)
            else:
                os.replace(self._old, self.path)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.value: float | None = None
        if (self.path / EVAL_FILE).is_file():  # a resumed run competes with the best it already kept
            saved = json.loads((self.path / EVAL_FILE).read_text())
            if saved.get("metric") == metric:
                self.value = saved["value"]

    def update(self, record: dict, step: int) -> bool:
        """True when ``record`` holds a better value of the metric than any before (then remembered)."""
        value = record.get(self.metric)
        if not isinstance(value, (int, float)):
            return False  # the evaluation failed this time
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value = float(value)
        return better

    def save(self, model, tokenizer, record: dict, step: int) -> Path:
        shutil.rmtree(self._tmp, ignore_errors=True)
        model.save_pretrained(self._tmp, tokenizer=tokenizer)
        atomic_write_text(self._tmp / EVAL_FILE, json.dumps(
            {"metric": self.metric, "mode": self.mode, "value": record[self.metric], "step": step,
             "metrics": {k: v for k, v in record.items() if k not in ("step", "split")}}, indent=1) + "\n")
        if self.path.exists():
            os.replace(self.path, self._old)
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        shutil.rmtree(self._old, ignore_errors=True)
        return self.path
