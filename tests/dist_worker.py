"""One rank of a distributed training step, for tests/test_distributed.py (started once per rank
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun does).

    python tests/dist_worker.py ENGINE ACCUM_STEPS SPLIT OUT_FILE

Builds the test model and the fixed global batch (tests/dist_common.py), takes this rank's rows
(SPLIT: comma-separated row counts per rank), runs one optimiser step through coca's real training
step (coca.train.step.train_step on the engine the trainer would build) and
writes the global loss and the updated parameters (rank 0) to OUT_FILE.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import build, global_batch, run_config  # noqa: E402

from coca.losses import CoCaLoss  # noqa: E402
from coca.train.distributed import deepspeed_config, global_sum, init_world, shutdown  # noqa: E402
from coca.train.engines import build_engine  # noqa: E402
from coca.train.step import train_step  # noqa: E402


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
    engine = build_engine(engine_kind, model, optimizer, scheduler, torch.device("cpu"), world, "fp32", ds)
    step = train_step(engine, list(zip(images.chunk(accum), tokens.chunk(accum))), CoCaLoss(1.0, 1.0, 0, world))
    assert step.finite
    engine.step(0.0)
    result = {k: global_sum(v, world, "cpu") / world.world_size for k, v in step.losses.as_floats().items()}
    if world.is_main:
        result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(result, out_file)
    shutdown(world)


if __name__ == "__main__":
    main()
