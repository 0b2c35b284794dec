"""One rank of a distributed training step, for tests/test_distributed.py (started once per rank
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun does).

    python tests/dist_worker.py ENGINE ACCUM_STEPS SPLIT OUT_FILE

Builds the test model and the fixed global batch (tests/dist_common.py), takes this rank's rows
(SPLIT: comma-separated row counts per rank), runs one optimiser step through coca's Engine and
writes the global loss and the updated parameters (rank 0) to OUT_FILE.
"""

import os
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import build, global_batch, run_config  # noqa: E402

from coca.train.distributed import (  # noqa: E402
    Engine,
    GlobalCoCaLoss,
    deepspeed_config,
    global_sum,
    grad_cache_step,
    init_world,
    shutdown,
)


def main() -> None:
    engine_kind, accum, split, out_file = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], sys.argv[4]
    torch.set_num_threads(1)
    world = init_world(engine_kind, "cpu")
    model, optimizer, scheduler = build()
    images, tokens = global_batch()
    start = sum(split[:world.rank])
    mine = slice(start, start + split[world.rank])
    images, tokens = images[mine], tokens[mine]
    cfg = run_config(micro=max(1, split[world.rank] // accum), accum=accum)
    ds = deepspeed_config(cfg, world) if engine_kind == "deepspeed" else None
    engine = Engine(engine_kind, model, optimizer, scheduler, torch.device("cpu"), ds)
    loss_fn = GlobalCoCaLoss(1.0, 1.0, 0, world)
    engine.zero_grad()
    if accum == 1:
        losses = loss_fn(engine.forward(images, tokens), tokens)
        engine.backward(losses["loss"])
    else:
        micro = list(zip(images.chunk(accum), tokens.chunk(accum)))
        losses = grad_cache_step(engine, micro, loss_fn, nullcontext)
    engine.step(0.0)
    result = {k: global_sum(losses[k].item(), world, "cpu") / world.world_size
              for k in ("loss", "contrastive_loss", "caption_loss")}
    if world.is_main:
        result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(result, out_file)
    shutdown(world)


if __name__ == "__main__":
    main()
