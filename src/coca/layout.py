"""A training run directory's layout, in one place: every file name and the checkpoint directory
name are spelled here, so the trainer, a resumed run's config and the tools that read a run agree.

    RUN_DIR/config.yaml              the resolved run config
    RUN_DIR/tokenizer.model          the run's tokenizer
    RUN_DIR/metrics.jsonl            one JSON line per logged step, validation and evaluation
    RUN_DIR/tb/                      TensorBoard events
    RUN_DIR/checkpoints/step_N/      checkpoints, ``step_00000500`` (8 digits); ``.step_N...`` while written,
                                     ``step_N.damaged`` once set aside
    RUN_DIR/model/                   the final model
    RUN_DIR/init.json                with train.init_from: what was loaded
    RUN_DIR/best/                    with train.best_metric: the best model so far
    RUN_DIR/deepspeed_config.json    with train.engine=deepspeed: the config DeepSpeed was given
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STEP_PREFIX = "step_"
STEP_NAME = re.compile(rf"^{STEP_PREFIX}(\d{{8}})$")  # a complete checkpoint


def step_name(step: int) -> str:
    """The checkpoint directory name of ``step``: ``step_00000500``."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a complete checkpoint's directory name, None for any other name."""
    m = STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def is_temporary(name: str) -> bool:
    """A checkpoint directory still being written, or an old one being replaced (hidden names)."""
    return name.startswith(f".{STEP_PREFIX}")


class Entry:
    """A layout's attribute that is a fixed path under its ``root``."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, layout, owner=None):
        return self if layout is None else layout.root.joinpath(*self.parts)


@dataclass(frozen=True)
class Layout:
    """A directory whose paths are its attributes (``Entry``) and methods."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))


class RunLayout(Layout):
    """The paths of one run directory (``train.run_dir``)."""

    config = Entry("config.yaml")
    tokenizer = Entry("tokenizer.model")
    metrics = Entry("metrics.jsonl")
    tensorboard = Entry("tb")
    checkpoints = Entry("checkpoints")
    model = Entry("model")
    init_report = Entry("init.json")
    best = Entry("best")
    deepspeed_config = Entry("deepspeed_config.json")

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def has_started(self) -> bool:
        """Whether the run has saved a checkpoint (complete or set aside as damaged): from then on
        it resumes with the architecture in its ``config.yaml``."""
        return self.config.is_file() and any(self.checkpoints.glob(f"{STEP_PREFIX}*"))
