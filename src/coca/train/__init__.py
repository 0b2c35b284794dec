"""Training: the trainer (``loop.py``), engines per backend (``engines.py``), the step with
GradCache (``step.py``), optimiser and schedule, checkpoints, and data-parallel plumbing
(``distributed.py``)."""


def train(cfg, log=print) -> dict:
    """Train (or resume) the run in ``cfg.train.run_dir``; see ``coca.train.loop.Trainer``."""
    from .loop import (
        train as _train,  # imported here: coca.losses imports coca.train.distributed
    )
    return _train(cfg, log)


__all__ = ["train"]
