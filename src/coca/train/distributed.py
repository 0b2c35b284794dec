"""Data parallelism: the process group, DDP and DeepSpeed ZeRO-2 engines, the contrastive loss
over the global batch, and gradient accumulation that keeps the global contrastive batch.

- Every rank all-gathers image and text embeddings *with gradients* and computes the loss of its
  own rows against all gathered columns, so the negatives are the whole global batch. Each rank's
  loss is a sum over its rows scaled by world_size / global_rows (and the caption loss a sum over
  its tokens scaled by world_size / global_tokens), so the engines' gradient average over ranks is
  exactly the gradient of the single-process loss on the global batch, also when ranks hold
  different numbers of samples (skipped bad samples).
- With ``train.accum_steps`` > 1 each step is GradCache (Gao et al. 2021): embed every micro-batch
  without a graph, compute the contrastive loss over all of them (and all ranks) against leaf
  copies of the embeddings to get d loss / d embedding, then re-run each micro-batch with a graph
  and back-propagate ``<embedding, its gradient>`` plus its share of the caption loss. The global
  contrastive batch is micro_batch x accum_steps x world_size, in the memory of one micro-batch.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError

ENGINES = ("single", "ddp", "deepspeed")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def init_world(engine: str, device_type: str) -> World:
    """Join the process group that torchrun / the deepspeed launcher described in the environment."""
    if engine not in ENGINES:
        raise ConfigError(f"train.engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "single":
        return World()
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in keys if k not in os.environ]
    if len(missing) == len(keys):  # started without a launcher: a group of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("COCA_MASTER_PORT", "29500"))
    elif missing:
        raise ConfigError(f"train.engine={engine} needs a launcher: {', '.join(missing)} not set; start with "
                          "`torchrun --nproc-per-node N -m coca.cli train ...` or `deepspeed --num_gpus N ...`")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if engine == "deepspeed":
            import deepspeed
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        else:
            dist.init_process_group(backend, init_method="env://")
    return World(rank, world_size, local_rank)


def row_counts(n: int, world: World, device) -> list[int]:
    """Rows each rank holds this step (they differ when bad samples were skipped)."""
    if not world.parallel:
        return [n]
    size = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world.world_size)]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gather_rows(x: torch.Tensor, sizes: list[int], world: World) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather [B_r, ...] from every rank with gradients; ``sizes`` from ``row_counts``.

    Returns (rows of all ranks [W * max_B, ...] padded, valid-row mask [W * max_B], offset of this
    rank's rows)."""
    if not world.parallel:
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    pad = max(sizes)
    padded = F.pad(x, (0, 0, 0, pad - x.shape[0])) if x.shape[0] < pad else x
    gathered = _GatherWithGrad.apply(padded, world.rank, world.world_size)
    valid = torch.cat([torch.arange(pad, device=x.device) < s for s in sizes])
    return gathered, valid, world.rank * pad


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (an all-reduce
    then a slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, rank: int, world_size: int):
        ctx.rank, ctx.world_size = rank, world_size
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world_size)[ctx.rank], None, None


def shutdown(world: World) -> None:
    """Leave the process group (gloo aborts at interpreter exit if it is still up)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def global_sum(value: float | torch.Tensor, world: World, device) -> float:
    if not world.parallel:  # no tensor round trip (and no device sync) for one process
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return float(t)


def contrastive_share(image_embeds, text_embeds, logit_scale, world: World) -> torch.Tensor:
    """This rank's share of the global symmetric InfoNCE: sum over its rows x world / global rows."""
    sizes = row_counts(image_embeds.shape[0], world, image_embeds.device)
    all_text, valid, offset = gather_rows(text_embeds.float(), sizes, world)
    all_image, _, _ = gather_rows(image_embeds.float(), sizes, world)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    i2t = (logit_scale * image_embeds.float() @ all_text.T).masked_fill(~valid, float("-inf"))
    t2i = (logit_scale * text_embeds.float() @ all_image.T).masked_fill(~valid, float("-inf"))
    loss_sum = (F.cross_entropy(i2t, labels, reduction="sum") + F.cross_entropy(t2i, labels, reduction="sum")) / 2
    return loss_sum * world.world_size / sum(sizes)


def caption_share(logits, tokens, pad_id: int, world: World, global_tokens: float | None = None) -> torch.Tensor:
    """This rank's share of the global token-mean caption cross-entropy."""
    if global_tokens is None:
        global_tokens = global_sum((tokens != pad_id).sum(), world, tokens.device)
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), ignore_index=pad_id, reduction="sum")
    return loss_sum * world.world_size / max(global_tokens, 1.0)


class GlobalCoCaLoss:
    """Contrastive + caption loss over the global batch; with one process it equals ``CoCaLoss``."""

    def __init__(self, contrastive_weight: float, caption_weight: float, pad_id: int, world: World):
        self.wc, self.wcap, self.pad_id, self.world = contrastive_weight, caption_weight, pad_id, world

    def __call__(self, out: dict, tokens: torch.Tensor) -> dict:
        con = contrastive_share(out["image_embeds"], out["text_embeds"], out["logit_scale"], self.world)
        cap = caption_share(out["logits"], tokens, self.pad_id, self.world)
        return {"loss": self.wc * con + self.wcap * cap, "contrastive_loss": con, "caption_loss": cap}


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def grad_cache_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss: GlobalCoCaLoss,
                    precision_ctx) -> dict:
    """Forward + backward of one optimiser step over several micro-batches (see the module doc).

    Returns the step's losses (this rank's shares, detached) and the last micro-batch's outputs."""
    model, world = engine.model, loss.world
    states, images_e, texts_e = [], [], []
    with torch.no_grad():  # pass 1: embeddings only, no graph
        for images, tokens in micro_batches:
            states.append(_rng_state())
            with precision_ctx():
                img = model.encode_image(images)
                txt = model.encode_text(tokens)
            images_e.append(img.float())
            texts_e.append(txt.float())
    img_leaf = torch.cat(images_e).requires_grad_(True)
    txt_leaf = torch.cat(texts_e).requires_grad_(True)
    scale = model.logit_scale.detach().exp().clamp(max=model.cfg.max_logit_scale).requires_grad_(True)
    con = contrastive_share(img_leaf, txt_leaf, scale, world)
    con.backward()
    d_img, d_txt = img_leaf.grad.split([e.shape[0] for e in images_e]), txt_leaf.grad.split([e.shape[0] for e in texts_e])
    d_scale = scale.grad
    tokens_global = global_sum(sum(int((t != loss.pad_id).sum()) for _, t in micro_batches), world, img_leaf.device)

    cap_total = 0.0
    n = len(micro_batches)
    for m, (images, tokens) in enumerate(micro_batches):  # pass 2: re-run with a graph, inject gradients
        _set_rng_state(states[m])
        with engine.no_sync(m < n - 1), precision_ctx():
            out = engine.forward(images, tokens)
            cap = caption_share(out["logits"], tokens, loss.pad_id, world, tokens_global)
            surrogate = loss.wc * ((out["image_embeds"].float() * d_img[m]).sum()
                                   + (out["text_embeds"].float() * d_txt[m]).sum()
                                   + out["logit_scale"] * d_scale / n) + loss.wcap * cap
        with engine.no_sync(m < n - 1):
            engine.backward(surrogate)
        cap_total += cap.item()
    con_v = con.item()
    return {"loss": torch.tensor(loss.wc * con_v + loss.wcap * cap_total), "contrastive_loss": torch.tensor(con_v),
            "caption_loss": torch.tensor(cap_total), "_out": out}


class Engine:
    """One interface over a single process, DDP and DeepSpeed: forward, backward, step, state.

    ``model`` is always the plain CoCa module (for saving, evaluation and GradCache's first pass).
    """

    def __init__(self, kind: str, model, optimizer, scheduler, device: torch.device, ds_config: dict | None = None):
        self.kind, self.model, self.optimizer, self.scheduler = kind, model, optimizer, scheduler
        self.wrapped = model
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=ids)
        elif kind == "deepspeed":
            import deepspeed
            from deepspeed.runtime.engine import DeepSpeedEngine

            # DeepSpeed's initial broadcast views every parameter as bytes, which fails for 0-dim
            # tensors (the temperature); broadcast rank 0's parameters ourselves instead (one data-
            # parallel group: no expert or sequence parallelism here).
            def broadcast_params(engine_self):
                for p in engine_self.module.parameters():
                    dist.broadcast(p.data, src=0)

            original = DeepSpeedEngine._broadcast_model
            DeepSpeedEngine._broadcast_model = broadcast_params
            try:
                self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
                    model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
            finally:
                DeepSpeedEngine._broadcast_model = original

    def forward(self, images, tokens):
        return self.wrapped(images, tokens)

    def no_sync(self, skip_sync: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
        return self.wrapped.no_sync() if skip_sync and self.kind == "ddp" else nullcontext()

    def zero_grad(self) -> None:
        if self.kind != "deepspeed":  # DeepSpeed zeroes its (partitioned) gradients in step()
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        if self.kind == "deepspeed":
            # our losses already carry the accumulation scaling; DeepSpeed must not divide again.
            # DeepSpeed counts micro-batches in step(): called after every backward, it reduces
            # and updates only at the last micro-batch of a step (gradient_accumulation_steps).
            self.wrapped.backward(loss, scale_wrt_gas=False)
            self.wrapped.step()
        else:
            loss.backward()

    def step(self, grad_clip: float = 0.0):
        """Clip, optimiser step, schedule step. Returns the gradient norm before clipping (or None).
        (DeepSpeed has already stepped in the last ``backward``; its clipping is in its config.)"""
        if self.kind == "deepspeed":
            norm = self.wrapped.get_global_grad_norm()
            return None if norm is None else torch.as_tensor(float(norm))
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip) if grad_clip > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        return norm

    def last_lr(self) -> float:
        """The scheduled base rate (optim.lr x schedule), whatever a group's own multiplier."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)


def deepspeed_config(cfg, world: World, user_file: str = "") -> dict:
    """The DeepSpeed JSON for a run: ZeRO-2, BF16 (fp32 master weights), fp32 gradient accumulation,
    explicit clipping; batch sizes from data.batch_size x train.accum_steps x world size. A user's
    own JSON (``train.deepspeed_config``) is read instead, with the batch keys checked."""
    micro, accum = cfg.data.batch_size, cfg.train.accum_steps
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {user_file!r} not found")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    else:
        ds = {
            "zero_optimization": {"stage": cfg.train.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
            "bf16": {"enabled": cfg.train.precision == "bf16"},
            "data_types": {"grad_accum_dtype": "fp32"},
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_allow_untested_optimizer": True,  # our torch AdamW: no JIT-built fused optimiser needed
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
    # GradCache does its own accumulation: DeepSpeed sees one "micro-batch" per backward call
    expect = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": micro * accum * world.world_size}
    for key, value in expect.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"DeepSpeed config {key}={ds[key]} disagrees with the run config ({value} from "
                              "data.batch_size x train.accum_steps x world size); remove it or make them match")
        ds[key] = value
    return ds
