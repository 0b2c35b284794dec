"""Data parallelism's plumbing: the process group, collectives (row counts, an all-gather with
gradients, global sums, barriers) and the DeepSpeed JSON. The loss over the global batch built
on them is in ``coca.losses``; the engines that wrap the model are in ``engines.py``; the step
(with GradCache accumulation) in ``step.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ENGINES, ConfigError
from ..errors import InputNotFound

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

    # the collectives a loss takes (``coca.losses.Collectives``)
    def row_counts(self, n: int, device) -> list[int]:
        return row_counts(n, self, device)

    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return gather_rows(x, sizes, self)

    def global_sum(self, value, device) -> float:
        return global_sum(value, self, device)


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
    """Leave the process group on the normal path (gloo aborts at interpreter exit if it is still
    up). The barrier first: a rank that tears its connections down while a peer is still busy
    (rank 0 writing the model) can make gloo abort with "terminate called without an active
    exception"."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier()


def global_sum(value: float | torch.Tensor, world: World, device) -> float:
    if not world.parallel:  # no tensor round trip (and no device sync) for one process
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return float(t)


def deepspeed_config(cfg, world: World, user_file: str = "") -> dict:
    """The DeepSpeed JSON for a run: ZeRO-2, BF16 (fp32 master weights), fp32 gradient accumulation,
    explicit clipping; batch sizes from data.batch_size x train.accum_steps x world size. A user's
    own JSON (``train.deepspeed_config``) is read instead, with the batch keys checked."""
    micro, accum = cfg.data.batch_size, cfg.train.accum_steps
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise InputNotFound(f"DeepSpeed config {user_file!r} not found")
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
