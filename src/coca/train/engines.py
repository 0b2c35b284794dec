"""One engine per backend: a single process, PyTorch DDP, DeepSpeed ZeRO. Each implements
``Engine``: it runs the step (forward, backward, the non-finite decision and the update), saves
and loads a checkpoint and exports the final model, so the trainer never asks which one it has.

``engine.model`` is always the plain CoCa module (for evaluation, GradCache's first pass and
saving); ``engine.wrapped`` is what runs the training forward pass.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..cpu import isolate_inductor_cache
from ..errors import UserError
from ..io import atomic_write_text
from ..layout import RunLayout, step_name
from ..losses import CoCaLoss, Losses
from ..models.attention import set_attention
from .checkpoint import (
    DS_TAG,
    consolidated_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_deepspeed_checkpoint,
)
from .distributed import World, barrier, deepspeed_config
from .optim import step_unless_nonfinite
from .precision import training_attention
from .step import PADDED, StepOptions, forward_backward


@dataclass
class Outcome:
    """What one ``run_step`` did."""
    losses: Losses                   # this rank's shares, detached
    logit_scale: torch.Tensor        # the (clamped) inverse temperature the step used
    rows: int                        # pairs on this rank
    grad_norm: torch.Tensor | None   # before clipping; None when the engine does not report it
    # True: an optimiser step (the schedule advanced; a non-finite update was skipped on the
    # device). False: the loss was not finite on some rank, seen on the host; nothing changed.
    counted: bool


class NonFiniteStreak:
    """Non-finite steps in a row: one counter, on the device where the decision is made, so that
    counting never waits for it; ``value()`` reads it (a synchronisation: log steps, checkpoints)."""

    def __init__(self, device: torch.device, start: int = 0):
        self.count = torch.tensor(start, device=device)

    def record(self, applied) -> None:
        """``applied``: a bool, or a bool tensor on the counter's device."""
        self.count = torch.where(torch.as_tensor(applied, device=self.count.device), 0, self.count + 1)

    def value(self) -> int:
        return int(self.count)

    def restore(self, n: int) -> None:
        """The count a checkpoint saved."""
        self.count = torch.tensor(n, device=self.count.device)


class Engine(Protocol):
    """What the trainer, validation and ``forward_backward`` use of an engine."""
    model: torch.nn.Module           # the plain CoCa module
    device: torch.device
    input_dtype: torch.dtype | None  # what images are cast to (None: left fp32)
    streak: NonFiniteStreak

    def autocast(self) -> AbstractContextManager: ...
    def forward(self, images, tokens, **options) -> dict: ...  # options: the model's forward keywords
    def no_sync(self, skip_sync: bool) -> AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def run_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: CoCaLoss,
                 options: StepOptions = PADDED) -> Outcome: ...
    def last_lr(self) -> float: ...
    def save(self, root: Path, step: int, state: dict, keep: int) -> Path: ...
    def load(self, path: Path) -> dict: ...
    def export(self, model_dir: Path, tokenizer, checkpoint_root: Path, model_cfg) -> Path: ...


def base_lr(optimizer) -> float:
    """The scheduled base rate (optim.lr x schedule), whatever a group's own multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


class SingleEngine:
    """One process (also the base of DDP): autocast with fp32 master weights for BF16. The backward
    always runs; the fused optimiser skips a non-finite update on the device, so no step waits
    for the host."""

    def __init__(self, model, optimizer, scheduler, device: torch.device, world: World, precision: str = "fp32",
                 compile: bool = False, grad_clip: float = 0.0):
        self.model, self.wrapped, self.optimizer, self.scheduler = model, model, optimizer, scheduler
        self.device, self.world, self.precision, self.grad_clip = device, world, precision, grad_clip
        self.input_dtype = None  # images stay fp32; autocast casts inside the matmuls
        self.streak = NonFiniteStreak(device)
        self.wrap()
        if compile:  # after wrapping, as PyTorch recommends for DDP; the plain module stays self.model
            isolate_inductor_cache()
            self.wrapped = torch.compile(self.wrapped)

    def wrap(self) -> None:
        pass

    def autocast(self):
        """BF16 autocast: matmuls in bf16, master weights, optimiser state and reductions in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, images, tokens, **options):
        return self.wrapped(images, tokens, **options)

    def no_sync(self, skip_sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP)."""
        return nullcontext()

    def backward(self, loss) -> None:
        loss.backward()

    def run_step(self, micro_batches, loss_fn: CoCaLoss, options: StepOptions = PADDED) -> Outcome:
        """Forward + backward, clip, and the update unless the loss or the (all-reduced) gradient
        norm is not finite, decided on the device; the schedule advances either way."""
        self.optimizer.zero_grad(set_to_none=True)
        done = forward_backward(self, micro_batches, loss_fn, options)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # under DDP the norm is of the all-reduced gradients, the same on every rank: decide on it
        # alone there, so that every rank skips the same steps
        ok = torch.isfinite(norm) if self.world.parallel else torch.isfinite(norm) & torch.isfinite(done.losses.loss)
        step_unless_nonfinite(self.optimizer, ok)
        self.scheduler.step()
        self.streak.record(ok)
        return Outcome(done.losses, done.logit_scale, done.rows, norm, counted=True)

    def last_lr(self) -> float:
        return base_lr(self.optimizer)

    def save(self, root: Path, step: int, state: dict, keep: int) -> Path:
        """Rank 0 writes weights + optimiser + schedule + ``state``; every rank waits for it."""
        path = root / step_name(step)
        if self.world.is_main:
            state = {**state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            path = save_checkpoint(root, step, self.model, state, keep)
        barrier(self.world)
        return path

    def load(self, path: Path) -> dict:
        """Restore weights, optimiser and schedule; returns the trainer's ``state``."""
        state = load_checkpoint(path, self.model, self.device)
        saved = state.pop("optimizer")
        names = [g.get("name") for g in self.optimizer.param_groups]
        saved_names = [g.get("name") for g in saved["param_groups"]]
        if names != saved_names or any(len(a["params"]) != len(b["params"])
                                       for a, b in zip(self.optimizer.param_groups, saved["param_groups"])):
            raise UserError(f"{path}: the optimiser's parameter groups differ from the checkpoint's "
                            f"({len(saved_names)} saved, {len(names)} now): optim.freeze, lr_mult or layer_decay "
                            "changed since the run started; resume with the settings in its config.yaml, or "
                            "start a new train.run_dir (train.init_from=RUN/model)")
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state

    def export(self, model_dir: Path, tokenizer, checkpoint_root: Path, model_cfg) -> Path:
        """Rank 0 writes the final model (``save_pretrained`` layout)."""
        if self.world.is_main:
            self.model.eval()
            self.model.save_pretrained(model_dir, tokenizer=tokenizer)
        barrier(self.world)
        return model_dir


class DDPEngine(SingleEngine):
    def wrap(self) -> None:
        from torch.nn.parallel import DistributedDataParallel
        device = self.device
        self.wrapped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.ddp = self.wrapped

    def no_sync(self, skip_sync: bool):
        return self.ddp.no_sync() if skip_sync else nullcontext()


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage 0-2) over the run's torch AdamW; BF16 here means bf16 weights with
    fp32 master copies in the optimiser, so no autocast and bf16 images. DeepSpeed updates inside
    the last micro-batch's backward, so a step's loss is checked on the host before any backward;
    its clipping is in its config."""

    def __init__(self, model, optimizer, scheduler, device: torch.device, world: World, ds_config: dict,
                 compile: bool = False):
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine as _DSEngine

        self.model, self.device, self.world = model, device, world
        bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
        self.input_dtype = torch.bfloat16 if bf16 else None
        self.streak = NonFiniteStreak(device)

        # Workaround, kept here alone: DeepSpeed's initial broadcast views every parameter as bytes
        # (p.data.view(torch.uint8)), which fails for 0-dim tensors such as the temperature, and it
        # has no option to skip it. We broadcast rank 0's parameters ourselves instead (one
        # data-parallel group: no expert or sequence parallelism here).
        def broadcast_params(engine_self):
            for p in engine_self.module.parameters():
                torch.distributed.broadcast(p.data, src=0)

        original = _DSEngine._broadcast_model
        _DSEngine._broadcast_model = broadcast_params
        try:
            self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        finally:
            _DSEngine._broadcast_model = original
        if compile:
            self.wrapped.compile()

    def autocast(self):
        return nullcontext()

    def forward(self, images, tokens, **options):
        return self.wrapped(images, tokens, **options)

    def no_sync(self, skip_sync: bool):
        return nullcontext()  # DeepSpeed reduces only at the accumulation boundary by itself

    def backward(self, loss) -> None:
        # our losses already carry the accumulation scaling; DeepSpeed must not divide again.
        # DeepSpeed counts micro-batches in step(): called after every backward, it reduces and
        # updates only at the last micro-batch of a step (gradient_accumulation_steps).
        self.wrapped.backward(loss, scale_wrt_gas=False)
        self.wrapped.step()

    def run_step(self, micro_batches, loss_fn: CoCaLoss, options: StepOptions = PADDED) -> Outcome:
        done = forward_backward(self, micro_batches, loss_fn, options, check_first=True)
        self.streak.record(done.backward_ran)
        norm = self.wrapped.get_global_grad_norm() if done.backward_ran else None
        return Outcome(done.losses, done.logit_scale, done.rows, None if norm is None else torch.as_tensor(float(norm)),
                       counted=done.backward_ran)

    def last_lr(self) -> float:
        return base_lr(self.optimizer)

    def save(self, root: Path, step: int, state: dict, keep: int) -> Path:
        return save_deepspeed_checkpoint(root, step, self.wrapped, state, keep, self.world)

    def load(self, path: Path) -> dict:
        loaded, state = self.wrapped.load_checkpoint(str(path), tag=DS_TAG)
        if loaded is None:  # DeepSpeed only warns when the files are not there
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint {DS_TAG!r} in it")
        return state

    def export(self, model_dir: Path, tokenizer, checkpoint_root: Path, model_cfg) -> Path:
        """The fp32 master weights merged from every rank's shard of the last checkpoint."""
        if self.world.is_main:
            latest = latest_checkpoint(checkpoint_root)
            # no checkpoint (a run of 0 steps): ZeRO stage <= 2 keeps the whole module on every rank
            model = consolidated_model(latest, model_cfg) if latest is not None else self.model.float().eval()
            model.save_pretrained(model_dir, tokenizer=tokenizer)
        barrier(self.world)
        return model_dir


def build_engine(kind: str, model, optimizer, scheduler, device: torch.device, world: World,
                 precision: str = "fp32", ds_config: dict | None = None, compile: bool = False,
                 grad_clip: float = 0.0) -> Engine:
    """The ``kind`` engine (single, ddp, deepspeed) with the attention ``training_attention``
    picks for this device and precision, set before any compile so that it is traced as chosen.
    ``ds_config``: DeepSpeed's JSON (which holds its clipping); ``grad_clip``: the others'."""
    set_attention(model, training_attention(device, precision))
    if kind == "deepspeed":
        return DeepSpeedEngine(model, optimizer, scheduler, device, world, ds_config or {}, compile)
    engine = DDPEngine if kind == "ddp" else SingleEngine
    return engine(model, optimizer, scheduler, device, world, precision, compile, grad_clip)


def engine_for_run(cfg, model, optimizer, scheduler, device: torch.device, world: World, layout: RunLayout) -> Engine:
    """``build_engine`` for a run config; DeepSpeed's JSON is derived from it and written to the
    run directory (``deepspeed_config.json``)."""
    tc, ds_config = cfg.train, None
    if tc.engine == "deepspeed":
        ds_config = deepspeed_config(cfg, world, tc.deepspeed_config)
        if world.is_main:
            atomic_write_text(layout.deepspeed_config, json.dumps(ds_config, indent=1) + "\n")
    return build_engine(tc.engine, model, optimizer, scheduler, device, world, tc.precision, ds_config, tc.compile,
                        cfg.optim.grad_clip)
