"""Where a run's numbers go: ``metrics.jsonl`` (one JSON line per logged step, validation and
evaluation) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_text, disk_full


def _parse(line: str) -> dict | None:
    """A metrics line, or None for an empty or torn one (a run killed in the middle of an append)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Appends JSON lines; on resume drops lines beyond the checkpoint so the file has no repeats,
    and lines that are not JSON records (a torn append after a crash or a full disk), with a warning."""

    def __init__(self, path: Path, resume_step: int, warn=print):
        self.path = path
        if path.exists():
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror or e}") from None
            records = [(line, _parse(line)) for line in lines if line.strip()]
            torn = sum(record is None for _, record in records)
            if torn:
                warn(f"warning: dropped {torn} unreadable line(s) of {path} (a write cut short by a crash or a full disk)")
            keep = [line for line, record in records if record is not None and record.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            full = disk_full(e, self.path)
            if full is not None:
                raise full from None
            raise


class TensorBoard:
    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(log_dir))
            except ImportError:  # tensorboard not installed: JSONL metrics still have everything
                pass

    def scalars(self, record: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
