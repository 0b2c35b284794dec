"""Atomic training checkpoints that a run directory resumes from by itself.

Layout: ``RUN_DIR/checkpoints/step_00000500/{model.safetensors, state.pt}`` (the name: ``coca.layout``). A checkpoint is
written into a hidden temporary directory, every file fsynced, then renamed into place, so a
crash at any moment leaves either the previous complete checkpoint or the new one. ``state.pt``
(optimiser, scheduler, RNG, data position) holds only tensors and plain Python values and is
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..errors import UserError
from ..io import _fsync_dir, atomic_write_bytes, disk_full
from ..layout import is_temporary, step_name, step_of
from ..models.coca import load_checked, unique_state


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, model, state: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in unique_state(model).items()}
        atomic_write_bytes(tmp / "model.safetensors", save(tensors))
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, final)
        if full is not None:  # the previous checkpoints are untouched
            raise full from None
        raise
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``. A ``final`` already there (the same step saved again) is first
    renamed to a hidden name and deleted only after the new one is in place, so a crash at any
    moment leaves a complete ``final`` or a complete older checkpoint (hidden names are cleaned up
    by ``clean_temporaries``)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, device) -> dict:
    """Load weights into ``model`` and return the training state dict."""
    load_checked(model, load_file(str(path / "model.safetensors"), device=str(device)), str(path))
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


# What a truncated, garbled or half-deleted checkpoint raises while loading: safetensors' own error
# (a subclass of Exception only), a missing file, a cut zip archive or pickle in state.pt, a key the
# state lacks. A UserError (the checkpoint does not fit the run's config) is not among them: that
# checkpoint is fine and the settings are wrong, so it is never moved aside.
def is_damage(error: BaseException) -> bool:
    if isinstance(error, UserError) and not isinstance(error, FileNotFoundError):
        return False
    return isinstance(error, (OSError, EOFError, RuntimeError, KeyError, ValueError, TypeError,
                              pickle.UnpicklingError)) or type(error).__name__ == "SafetensorError"


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the resume order (``step_N.damaged``); nothing is deleted."""
    target = path.with_name(f"{path.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def clean_temporaries(root: Path) -> None:
    """Remove half-written checkpoints left by a killed run."""
    if root.is_dir():
        for p in root.iterdir():
            if is_temporary(p.name):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------- DeepSpeed

DS_TAG = "deepspeed"  # RUN_DIR/checkpoints/step_N/deepspeed/: DeepSpeed's own layout (one optimiser shard per rank)


def save_deepspeed_checkpoint(root: Path, step: int, engine, state: dict, keep: int, world) -> Path:
    """Every rank writes its ZeRO shard into a temporary directory; rank 0 then renames it into
    place (after all ranks finished), so a complete ``step_N`` is all a resumed run ever sees."""
    import torch.distributed as dist
    final = root / step_name(step)
    tmp = root / f".{final.name}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if world.parallel:
        dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=state, save_latest=False)
    if world.parallel:
        dist.barrier()
    if world.is_main:
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
        _replace_dir(tmp, final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world.parallel:
        dist.barrier()
    return final


def consolidated_model(checkpoint: Path, model_cfg):
    """The fp32 model of a ZeRO checkpoint (master weights merged from every rank's shard)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ..models.coca import create_model
    model = create_model(model_cfg)
    names = unique_state(model)  # DeepSpeed lists a shared tensor under each of its names; keep one
    state = {k: v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG).items()
             if k in names}
    load_checked(model, state, str(checkpoint))
    return model.eval()
