"""One engine per backend: a single process, PyTorch DDP, DeepSpeed ZeRO. Each owns how it runs the
forward and backward pass, steps the optimiser, saves and loads a checkpoint and exports the
final model, so the trainer never asks which one it has.

``engine.model`` is always the plain CoCa module (for evaluation, GradCache's first pass and
saving); ``engine.wrapped`` is what runs the training forward pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ..cpu import isolate_inductor_cache
from ..errors import UserError
from ..layout import step_name
from ..models.attention import set_attention
from .checkpoint import (
    DS_TAG,
    consolidated_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_deepspeed_checkpoint,
)
from .distributed import World, barrier
from .precision import training_attention


def base_lr(optimizer) -> float:
    """The scheduled base rate (optim.lr x schedule), whatever a group's own multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


class SingleEngine:
    """One process (also the base of DDP): autocast with fp32 master weights for BF16."""

    def __init__(self, model, optimizer, scheduler, device: torch.device, world: World, precision: str = "fp32",
                 compile: bool = False):
        self.model, self.wrapped, self.optimizer, self.scheduler = model, model, optimizer, scheduler
        self.device, self.world, self.precision = device, world, precision
        self.input_dtype = None  # images stay fp32; autocast casts inside the matmuls
        self.steps_in_backward = False  # the optimiser steps in step(), after the finiteness check
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

    def forward(self, images, tokens, return_logits: bool = True):
        return self.wrapped(images, tokens, return_logits=return_logits)

    def no_sync(self, skip_sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP)."""
        return nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        loss.backward()

    def _clip(self, grad_clip: float, always_norm: bool = False):
        """Clip the trainable gradients to ``grad_clip`` (0: no clipping); returns their norm before
        clipping (None without clipping unless ``always_norm``)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]) if always_norm else None

    def step(self, grad_clip: float = 0.0):
        """Clip, optimiser step, schedule step. Returns the gradient norm before clipping (or None)."""
        norm = self._clip(grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return norm

    @property
    def skips_on_device(self) -> bool:
        """The optimiser can skip a non-finite step on the device (fused AdamW's ``found_inf``), so
        the step needs no host synchronisation to decide."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False) and self.optimizer.defaults.get("fused"))

    def step_unless_nonfinite(self, grad_clip: float, loss_finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and step, the update skipped on the device when the loss or the (all-reduced)
        gradient norm is not finite. Returns (gradient norm, step applied) as device tensors."""
        norm = self._clip(grad_clip, always_norm=True)
        # under DDP the norm is of the all-reduced gradients, the same on every rank: decide on it
        # alone there, so that every rank skips the same steps
        ok = torch.isfinite(norm) if self.world.parallel else torch.isfinite(norm) & loss_finite
        self.optimizer.found_inf, self.optimizer.grad_scale = (~ok).float(), None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        self.scheduler.step()
        return norm, ok

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
    fp32 master copies in the optimiser, so no autocast and bf16 images."""

    def __init__(self, model, optimizer, scheduler, device: torch.device, world: World, ds_config: dict,
                 compile: bool = False):
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine as _DSEngine

        self.model, self.device, self.world = model, device, world
        bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
        self.input_dtype = torch.bfloat16 if bf16 else None
        self.steps_in_backward = True  # DeepSpeed updates inside the accumulation boundary's backward

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

    def forward(self, images, tokens, return_logits: bool = True):
        return self.wrapped(images, tokens, return_logits=return_logits)

    def no_sync(self, skip_sync: bool):
        return nullcontext()  # DeepSpeed reduces only at the accumulation boundary by itself

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes its (partitioned) gradients in step()

    def backward(self, loss) -> None:
        # our losses already carry the accumulation scaling; DeepSpeed must not divide again.
        # DeepSpeed counts micro-batches in step(): called after every backward, it reduces and
        # updates only at the last micro-batch of a step (gradient_accumulation_steps).
        self.wrapped.backward(loss, scale_wrt_gas=False)
        self.wrapped.step()

    skips_on_device = False  # DeepSpeed steps inside backward: the trainer checks the loss before it

    def step(self, grad_clip: float = 0.0):
        """DeepSpeed has already stepped in the last ``backward``; its clipping is in its config."""
        norm = self.wrapped.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

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
                 precision: str = "fp32", ds_config: dict | None = None, compile: bool = False):
    set_attention(model, training_attention(device, precision))  # before compiling: traced as chosen
    if kind == "deepspeed":
        return DeepSpeedEngine(model, optimizer, scheduler, device, world, ds_config or {}, compile)
    engine = DDPEngine if kind == "ddp" else SingleEngine
    return engine(model, optimizer, scheduler, device, world, precision, compile)
