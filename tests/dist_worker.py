"""One rank of a distributed training step, for tests/test_distributed.py (started once per rank
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun does).

    python tests/dist_worker.py ENGINE ACCUM_STEPS SPLIT OUT_FILE [NAN_RANK [PACK]]

Builds the test model and the fixed global batch (tests/dist_common.py), takes this rank's rows
(SPLIT: comma-separated row counts per rank), runs one optimiser step through coca's real training
step (``run_step`` of the engine the trainer would build) and
writes the global loss and the updated parameters (rank 0) to OUT_FILE. With NAN_RANK, that rank's
second decoder call returns NaN, so the first step's loss is not finite there: the step must be
skipped on every rank without touching the weights, and a second, clean step must then equal the
single-process step (the engine's accumulation state survived the skip). PACK=1 runs the text
towers packed (``train.pack_text``) against the padded single-process reference.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import build, global_batch, run_config  # noqa: E402

from coca.losses import CoCaLoss  # noqa: E402
from coca.train.distributed import deepspeed_config, global_sum, init_world, shutdown  # noqa: E402
from coca.train.engines import build_engine  # noqa: E402
from coca.train.step import StepOptions  # noqa: E402


def main() -> None:
    engine_kind, accum, split, out_file = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], sys.argv[4]
    nan_rank = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    options = StepOptions(pack_text=len(sys.argv) > 6 and sys.argv[6] == "1")
    torch.set_num_threads(1)
    world = init_world(engine_kind, "cpu")
    model, optimizer, scheduler = build()
    images, tokens = global_batch()
    start = sum(split[:world.rank])
    mine = slice(start, start + split[world.rank])
    images, tokens = images[mine], tokens[mine]
    cfg = run_config(micro=max(1, split[world.rank] // accum), accum=accum)
    ds = deepspeed_config(cfg, world) if engine_kind == "deepspeed" else None
    if ds is not None and nan_rank >= 0:
        # BF16 without DeepSpeed's own overflow check: only our check before the backward can
        # keep a non-finite step from being applied
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    engine = build_engine(engine_kind, model, optimizer, scheduler, torch.device("cpu"), world, "fp32", ds)
    micro = list(zip(images.chunk(accum), tokens.chunk(accum)))
    loss_fn = CoCaLoss(1.0, 1.0, 0, world)
    skipped = None
    if nan_rank >= 0:
        calls = {"n": 0}

        def poison(module, args, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] == 2 and world.rank == nan_rank else output
        model.text_decoder.register_forward_hook(poison)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if engine.input_dtype is not None:
            micro = [(i.to(engine.input_dtype), t) for i, t in micro]
        engine.run_step(micro, loss_fn, options)
        skipped = engine.streak.value() == 1
        if not skipped:
            raise AssertionError("the poisoned step was not counted as non-finite")
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        if changed:
            raise AssertionError(f"the skipped step changed {len(changed)} tensors, e.g. {changed[:3]}")
        if engine.input_dtype is not None:  # BF16: no bitwise comparison with the fp32 reference step
            if world.is_main:
                torch.save({"first_step_finite": False, "unchanged_after_skip": True}, out_file)
            shutdown(world)
            return
    step = engine.run_step(micro, loss_fn, options)
    assert step.counted and engine.streak.value() == 0
    result = {k: global_sum(v, world, "cpu") / world.world_size for k, v in step.losses.as_floats().items()}
    result["first_step_finite"] = None if skipped is None else not skipped
    result["unchanged_after_skip"] = None if skipped is None else True
    if world.is_main:
        result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(result, out_file)
    shutdown(world)


if __name__ == "__main__":
    main()
    # The result is written and the process group is gone. Skip interpreter teardown: gloo's
    # threads can still abort it ("terminate called without an active exception", rc -6) at
    # random, which would fail a step that was checked already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
