"""AdamW parameter groups (weight decay, frozen components, per-component and layer-wise learning
rates) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import functools
import math
import re
import warnings

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import UserError
from ..components import COMPONENTS, component_of

# the open_clip family's decoder layer i is its self_blocks.i and cross_blocks.i; its text tower
# ends in ln_final
_BLOCK = re.compile(r"^(visual|text_encoder|text_decoder)\.(?:blocks|self_blocks|cross_blocks)\.(\d+)\.")
_TOP = ("visual.ln_post.", "text_encoder.final_norm.", "text_encoder.ln_final.", "text_decoder.final_norm.",
        "text_decoder.lm_head.")


def freeze(model: nn.Module, components: list[str]) -> int:
    """Stop gradients for every parameter of ``components``; returns how many parameters that froze.

    A frozen tower whose inputs need no gradient (the vision tower always; the text towers when the
    token embedding is frozen too) records no autograd graph: it runs as if under ``no_grad``."""
    n = 0
    for name, p in model.named_parameters():
        if component_of(name) in components:
            p.requires_grad_(False)
            n += p.numel()
    return n


def layer_depth(name: str, cfg) -> tuple[int, int] | None:
    """(depth, tower depth) for layer-wise decay, or None outside the three towers.

    In a tower of N blocks: the inputs (patch/token embeddings, positions, relative-position bias,
    ln_pre) are depth 0, block i is depth i + 1, the output norms (and the LM head) depth N + 1."""
    tower = name.split(".", 1)[0]
    layers = {"visual": cfg.vision.layers, "text_encoder": cfg.text.encoder_layers,
              "text_decoder": cfg.text.decoder_layers}.get(tower)
    if layers is None:
        return None
    m = _BLOCK.match(name)
    if m:
        return int(m.group(2)) + 1, layers
    if name.startswith(_TOP):
        return layers + 1, layers
    return 0, layers


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: one per (component, layer-wise scale, decay or not), frozen parameters left out.

    Weight decay on Linear/Conv weights only: norms, biases, embeddings (token, position,
    relative-position), pooler queries, class token and the temperature are not decayed. Each
    group's ``lr`` is ``optim.lr x lr_mult[component] x layer_decay ** (N + 1 - depth)``, kept as
    ``lr_scale`` so the schedule and the logs can show the base rate."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():  # shared parameters are yielded once
        if not p.requires_grad:
            continue
        comp = component_of(name)
        scale, layer = cfg.lr_mult.get(comp, 1.0), ""
        depth = layer_depth(name, model.cfg) if cfg.layer_decay != 1.0 else None
        if depth is not None:
            d, n = depth
            scale *= cfg.layer_decay ** (n + 1 - d)
            layer = f" depth {d}/{n + 1}"
        decays = id(p) in decay_ids
        key = (comp, layer, decays)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": cfg.weight_decay if decays else 0.0,
                           "lr": cfg.lr * scale, "lr_scale": scale,
                           "name": f"{comp}{layer}{'' if decays else ' (no decay)'}"}
        groups[key]["params"].append(p)
    if not groups:
        raise UserError("no parameter is trainable: optim.freeze covers the whole model")
    order = list(COMPONENTS)
    return [groups[k] for k in sorted(groups, key=lambda k: (order.index(k[0]), k[1], not k[2]))]


def describe_groups(groups: list[dict], model: nn.Module, cfg: OptimConfig) -> list[str]:
    """The table a run prints and logs first: each group's tensors, parameters, rate and decay."""
    lines = [f"{'parameter group':<36} {'tensors':>7} {'parameters':>12} {'lr':>10} {'weight decay':>12}"]
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<36} {len(g['params']):>7} {n:>12,} {g['lr']:>10.3g} {g['weight_decay']:>12.3g}")
    frozen = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen[component_of(name)] = frozen.get(component_of(name), 0) + p.numel()
    for comp, n in frozen.items():
        lines.append(f"{comp + ' (frozen)':<36} {'':>7} {n:>12,} {'-':>10} {'-':>12}")
    trainable = sum(p.numel() for g in groups for p in g["params"])
    lines.append(f"trainable {trainable:,} of {trainable + sum(frozen.values()):,} parameters")
    return lines


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Fused AdamW (CUDA and CPU): one kernel per step, and it can skip a non-finite step on the
    device (``found_inf``), so the training step never waits for the host."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=True)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()``, the update skipped on the device when ``ok`` (a bool tensor) is False.

    Fused AdamW reads ``found_inf`` and ``grad_scale`` as ``torch.amp.GradScaler`` sets them and
    skips on the device, so the step never waits for the host; this is the one place that uses
    that protocol. An optimiser without it (not fused, or a PyTorch that lacks it) decides on the
    host instead: a synchronisation every step, with a warning once."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
        optimizer.found_inf, optimizer.grad_scale = (~ok).float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        return
    _warn_host_decides(type(optimizer).__name__)
    if bool(ok):
        optimizer.step()


@functools.cache
def _warn_host_decides(optimizer_name: str) -> None:
    warnings.warn(f"{optimizer_name} cannot skip a non-finite update on the device: every step synchronises "
                  "with the host to decide", stacklevel=3)


def lr_factor(step: int, total_steps: int, warmup_frac: float, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up to 1, then cosine to ``min_lr_ratio``."""
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_frac, cfg.min_lr_ratio))
