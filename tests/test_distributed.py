"""Distributed training on CPU over gloo, 2 processes: the loss and the parameter update of one
step equal the single-process ones on the same global batch (DDP and DeepSpeed ZeRO-2, with and
without GradCache accumulation, with equal and unequal rows per rank, with the text towers padded
and packed against the padded single-process reference)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import single_process_step  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, accum: int, split: str, out: Path, world_size: int = 2, nan_rank: int = -1,
           pack: bool = False) -> dict:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), engine, str(accum), split, str(out), str(nan_rank), str(int(pack))], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        output = p.communicate(timeout=300)[0].decode(errors="replace")
        assert p.returncode == 0, output[-4000:]
    return torch.load(out, weights_only=True)


def check_matches_single_process(result: dict) -> None:
    ref_losses, ref_params = single_process_step()
    for k, v in ref_losses.items():
        assert result[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    moved = 0
    for name, ref in ref_params.items():
        torch.testing.assert_close(result["params"][name], ref, rtol=1e-4, atol=2e-6, msg=name)
        moved += int(not torch.equal(ref, single_process_initial()[name]))
    assert moved > 10  # the step really changed the weights


_initial = {}


def single_process_initial():
    if not _initial:
        from dist_common import build
        _initial.update(build()[0].state_dict())
    return _initial


def needs_deepspeed() -> None:
    """DeepSpeed and the compiler its C++ op needs (a skip locally, a failure under CI=true)."""
    from conftest import require_program
    pytest.importorskip("deepspeed")
    require_program("g++", why="DeepSpeed compiles a C++ op on first use")
    require_program("ninja", why="DeepSpeed compiles a C++ op on first use")


@pytest.mark.parametrize("accum, split, pack", [(1, "4,4", False), (1, "5,3", True), (2, "4,4", True)])
def test_ddp_step_equals_single_process(tmp_path, accum, split, pack):
    check_matches_single_process(launch("ddp", accum, split, tmp_path / "out.pt", pack=pack))


@pytest.mark.parametrize("accum, split, pack", [(1, "4,4", False), (2, "4,4", True)])
def test_deepspeed_zero2_step_equals_single_process(tmp_path, accum, split, pack):
    needs_deepspeed()
    check_matches_single_process(launch("deepspeed", accum, split, tmp_path / "out.pt", pack=pack))


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_a_nonfinite_loss_with_accumulation_is_skipped_before_any_update(tmp_path, engine):
    """Rank 1's loss is NaN in the first step (GradCache, 2 micro-batches per rank): no rank may
    update. DeepSpeed steps inside the last backward, so the check must come before it; it runs in
    BF16 with DeepSpeed's own overflow check off, so only ours protects the weights. Under DDP the
    next, clean step equals the single-process step from the initial weights."""
    if engine == "deepspeed":
        needs_deepspeed()
    result = launch(engine, 2, "4,4", tmp_path / "out.pt", nan_rank=1)
    assert result["first_step_finite"] is False and result["unchanged_after_skip"]
    if engine == "ddp":  # fp32: the next step equals the reference bitwise-close
        check_matches_single_process(result)


@pytest.mark.parametrize("pack", [False, True])
def test_grad_cache_in_one_process_equals_the_whole_batch(tmp_path, pack):
    """Four micro-batches of two in one process give the step of the batch of eight (padded), with
    the text towers padded or packed."""
    from dist_common import build, global_batch

    from coca.losses import CoCaLoss
    from coca.train.distributed import World
    from coca.train.engines import build_engine
    from coca.train.step import StepOptions
    model, optimizer, scheduler = build()
    images, tokens = global_batch()
    engine = build_engine("single", model, optimizer, scheduler, torch.device("cpu"), World())
    step = engine.run_step(list(zip(images.chunk(4), tokens.chunk(4))), CoCaLoss(1.0, 1.0, 0), StepOptions(pack_text=pack))
    check_matches_single_process({**step.losses.as_floats(), "params": model.state_dict()})


# ------------------------------------------------------------------- `coca train` under torchrun

TRAIN = ["model.text.vocab_size=64", "data.tokenizer_vocab_size=64", "data.tokenizer_model_type=bpe",
         "data.tokenizer_train_captions=2000", "data.batch_size=8", "data.workers=0", "train.progress=false",
         "train.log_every=1", "train.tensorboard=false", "train.threads=1", "train.precision=fp32",
         "train.val_every=0", "train.steps=8", "train.checkpoint_every=3", "optim.lr=1e-3"]


def torchrun(run_dir: Path, *extra: str) -> subprocess.Popen:
    overrides = TRAIN + [f"train.run_dir={run_dir}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "coca.cli", "train"] + sum((["--set", o] for o in overrides), [])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    import json
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") != "val"}


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_train_command_resumes_after_sigkill_on_two_ranks(tmp_path, engine):
    """`coca train` on 2 ranks, killed (SIGKILL, whole process group) after its step-3 checkpoint and
    started again, logs the same losses as an uninterrupted run and writes one consolidated model."""
    import signal
    import time
    if engine == "deepspeed":
        needs_deepspeed()
    extra = [f"train.engine={engine}", "train.accum_steps=2"]
    full = torchrun(tmp_path / "full", *extra)
    out = full.communicate(timeout=300)[0].decode(errors="replace")
    assert full.returncode == 0, out[-3000:]
    reference = losses_by_step(tmp_path / "full")
    assert sorted(reference) == list(range(1, 9))

    run_dir = tmp_path / "killed"
    proc = torchrun(run_dir, *extra)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses_by_step(run_dir), default=0) >= 4:
            break
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()  # killed mid-run, not after it finished
    resumed = torchrun(run_dir, *extra)
    out = resumed.communicate(timeout=300)[0].decode(errors="replace")
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert (run_dir / "deepspeed_config.json").is_file() == (engine == "deepspeed")
    got = losses_by_step(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    import coca
    model = coca.load(run_dir / "model")
    assert model.tokenizer is not None
    reference_model = coca.load(tmp_path / "full" / "model")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference_model.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_deepspeed_config_from_the_run_config(tmp_path):
    import json

    from coca.config import ConfigError, load_run_config
    from coca.train.distributed import World, deepspeed_config
    cfg = load_run_config("configs/coca-large-v2.yaml", ["optim.grad_clip=0.5", "train.accum_steps=8"])
    ds = deepspeed_config(cfg, World(0, 8, 0))
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["gradient_clipping"] == 0.5
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (256, 8, 16384)
    assert "optimizer" not in ds  # our torch AdamW is passed in: no DeepSpeed-built optimiser
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 999}))
    with pytest.raises(ConfigError, match="train_batch_size=999 disagrees"):
        deepspeed_config(cfg, World(0, 8, 0), str(own))
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(cfg, World(0, 8, 0), str(own))["train_batch_size"] == 16384
    with pytest.raises(ConfigError, match="train.engine"):
        load_run_config(None, ["train.engine=horovod"])


def test_plan_for_the_described_run(capsys):
    from coca.cli import main
    from coca.config import load_run_config
    from coca.plan import plan
    assert main(["plan", "--config", "configs/coca-large-v2.yaml", "--gpus", "64", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "global batch 16,384" in out and "GPU-hours" in out and "fits in 80 GiB" in out
    p = plan(load_run_config("configs/coca-large-v2.yaml"), 64, 80, 312, 0.5)
    P = p["params"]
    assert P == 1_096_310_785
    assert p["memory_bytes"]["optimiser states (fp32 master, Adam m, v; partition)"] == pytest.approx(12 * P / 64)
    assert p["activations_checkpointed_bytes"] < p["activations_bytes"] / 5
    assert p["train_flops_per_step"] == pytest.approx(3 * p["forward_flops_per_sample"] * 16384)
    assert p["gpu_hours"] == pytest.approx(p["step_time_s"] * p["steps"] * 64 / 3600)
    assert p["samples"] == 250_000 * 16384
    assert main(["plan", "--config", "configs/coca-large-v2.yaml", "--mfu", "0"]) == 2
    # GradCache's extra encoder pass: the forward without the text decoder, once more per sample
    from coca.models.coca import create_model
    from coca.summary import forward_flops
    acc = plan(load_run_config("configs/coca-large-v2.yaml", ["train.accum_steps=8"]), 8, 80, 312, 0.5)
    # the recipe packs its text towers at data.mean_caption_tokens (22) per caption
    f = forward_flops(create_model("coca-large-v2", device="meta"), 1, 22.0)
    # the recipe runs DeepSpeed, whose first GradCache pass runs the decoder too (to check the loss
    # before the backward that updates); DDP's skips it
    assert acc["grad_cache_flops_per_step"] == pytest.approx(f["total"] * 16384)
    ddp = plan(load_run_config("configs/coca-large-v2.yaml", ["train.accum_steps=8", "train.engine=ddp"]), 8, 80, 312, 0.5)
    assert ddp["grad_cache_flops_per_step"] == pytest.approx((f["total"] - f["text_decoder"]) * 16384)


def test_deepspeed_bf16_with_accumulation_checkpointing_and_validation(tmp_path):
    """The recipe's switches together (BF16 weights with fp32 master copies, GradCache, activation
    checkpointing, validation and evaluation on rank 0 while the other rank waits, a frozen tower,
    the best model kept) run, and the merged model holds the fp32 master weights."""
    needs_deepspeed()
    import json

    import coca
    from coca.evaluate.synthetic import write_eval_sets
    sets = write_eval_sets(tmp_path / "eval", n_classify=18, n_caption=4)
    zeroshot = {"task": "zeroshot", "images": sets["classify"], "classnames": sets["classnames"],
                "templates": sets["templates"], "workers": 0}
    run_dir = tmp_path / "bf16"
    proc = torchrun(run_dir, "train.engine=deepspeed", "train.precision=bf16", "train.accum_steps=2",
                    "train.activation_checkpointing=true", "train.steps=3", "train.val_every=3",
                    "train.val_batches=1", "data.synthetic_val_size=16", "optim.freeze=[temperature]",
                    "train.eval=" + json.dumps([zeroshot]), "train.eval_every=2", "train.best_metric=zeroshot.top1")
    out = proc.communicate(timeout=300)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") not in ("val", "eval")] == [1, 2, 3]
    assert any(r.get("split") == "val" and r["val_loss"] > 0 for r in rows)
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all(r["zeroshot.n_images"] == 18 for r in evals)
    assert out.count("eval zeroshot:") == 2  # once per evaluation step, by rank 0 only
    assert json.loads((run_dir / "best" / "eval.json").read_text())["value"] == max(r["zeroshot.top1"] for r in evals)
    model = coca.load(run_dir / "model")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # fp32 master weights, not bf16-rounded copies: some value is not representable in bf16
    w = model.visual.conv1.weight
    assert not torch.equal(w, w.to(torch.bfloat16).float())


def test_plan_finds_the_fewest_checkpointed_blocks_that_fit():
    from coca.config import load_run_config
    from coca.plan import GIB, plan, saved_activation_bytes
    cfg = load_run_config(None, ["data.batch_size=64", "data.kind=webdataset", "data.train=s/{0..3}.tar",
                                 "data.workers=4", "train.activation_checkpointing=2", "train.pack_text=false"])
    P = plan(cfg, 2, 1.0, 312, 0.5)["params"]
    static = 2 * P + 2 * P + 4 * P / 2 + 12 * P / 2
    act = [saved_activation_bytes(cfg.model, 64, 77, n) for n in range(5)]  # coca-tiny: 4 + 3 + 3 blocks
    assert act == sorted(act, reverse=True) and act[0] > act[-1]
    cap = (static + (act[1] + act[2]) / 2) / 0.9  # between 1 and 2 checkpointed blocks per stack
    p = plan(cfg, 2, cap / GIB, 312, 0.5)
    assert p["fewest_checkpointed_blocks"] == 2  # 1 does not fit, 2 does (checked against the bytes above)
    assert p["total_configured_bytes"] == pytest.approx(static + act[2])
    # recompute: the forward of 2 of 4 ViT blocks and 2 of 3 blocks of each text stack, per sample
    from coca.models.coca import create_model
    from coca.summary import forward_flops
    f = forward_flops(create_model(cfg.model, device="meta"))
    expected = (f["visual"] * 2 / 4 + f["text_encoder"] * 2 / 3 + f["text_decoder"] * 2 / 3) * 64 * 2
    assert p["recompute_flops_per_step"] == pytest.approx(expected)
    assert any("4 shards for 2 GPUs x 4 data workers" in w for w in p["warnings"])
    assert plan(cfg, 2, 1e-3, 312, 0.5)["fewest_checkpointed_blocks"] is None


# Unit roundoff of bf16: 8 significant bits, round to nearest, so one rounding is within 2^-8 relative.
BF16_U = 2.0 ** -8
# CPU kernel restrictions of other x86-64 CPUs, applied to this one: without AMX, and without AVX-512.
RESTRICTED_ISA = {"default": {}, "no-avx512": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                              "ATEN_CPU_CAPABILITY": "avx2"}}


def bf16_roundings_in_series(model) -> dict[str, int]:
    """bf16 roundings between the input and each loss along the longest path, for a BF16 step.
    Per transformer layer: the norm's output, q/k/v, attention's output, the output projection,
    the second norm's output, the MLP's first projection, its activation, its second projection
    (8), plus 2 where the residual stream itself is bf16 (DeepSpeed's bf16 weights); a decoder
    layer adds cross-attention's 4. The patch embedding and its input add 2, the attentional
    pooler 4, each projection to the embedding 1, the LM head 1."""
    v, t = model.vision, model.text
    vision = 2 + 10 * v.layers + 4
    return {"contrastive": vision + 1 + (2 + 10 * t.encoder_layers + 1),  # the two towers' errors add
            "caption": vision + 2 + 10 * t.encoder_layers + 14 * t.decoder_layers + 1}


def bf16_loss_tolerance(loss_fp32: float, roundings: int) -> float:
    """|loss_bf16 - loss_fp32| bound for a loss ``roundings`` bf16 roundings away from the fp32 one.
    Each rounding is within u = 2^-8 relative, uniform in +-u (standard deviation u/sqrt(3)), and
    independent roundings add as a random walk: after k of them a value is off by u*sqrt(k/3)
    relative at one standard deviation, u*sqrt(3k) at three. A mean loss over many such values
    is no more sensitive than one of them. For coca-tiny (80 and 121 roundings) that is 6-7% of the
    loss: wide enough for any CPU's rounding (measured 0.02-0.16% with and without AVX-512, no AMX)
    and narrow enough to catch a broken forward (a tower dropped, a loss scaled); the checks after
    it and test_model's fp32 checks catch the subtler bugs."""
    return abs(loss_fp32) * BF16_U * (3 * roundings) ** 0.5


@pytest.mark.parametrize("isa", list(RESTRICTED_ISA))
def test_bf16_losses_of_the_single_and_deepspeed_engines_agree_with_fp32(tmp_path, isa):
    """BF16 means autocast over fp32 weights in one process and bf16 weights under DeepSpeed; the two
    cannot round identically (autocast keeps the residual stream in fp32, and the CPU's kernels
    pick the accumulation order), so each is compared with an fp32 run from the same weights, within
    a bound derived from bf16's precision, under this CPU's kernels and restricted to an ISA without
    AVX-512. Checks that would still fail on a real bug: each engine's loss is exactly
    contrastive + caption (the weights of 1), the losses fall by as much as fp32's over the first
    steps (a lost update or a dead optimiser), and test_model's checks that norms and losses run
    in fp32 over bf16 inputs."""
    needs_deepspeed()
    import json

    from coca.config import load_run_config
    common = [o for o in TRAIN if not o.startswith(("train.precision", "train.steps"))] + ["train.steps=3"]
    runs = {"fp32": ["train.precision=fp32"], "single": ["train.precision=bf16"],
            "deepspeed": ["train.precision=bf16", "train.engine=deepspeed"]}
    env = {**os.environ, **RESTRICTED_ISA[isa], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    rows = {}
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "coca.cli", "train"] + sum(
            (["--set", o] for o in common + extra + [f"train.run_dir={tmp_path / name}"]), [])
        done = subprocess.run(cmd, env={**env, "COCA_MASTER_PORT": str(free_port())}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [r for r in map(json.loads, lines) if "split" not in r]
        assert [r["step"] for r in rows[name]] == [1, 2, 3]
    roundings = bf16_roundings_in_series(load_run_config(None, common).model)
    ref = rows["fp32"][0]
    for name in ("single", "deepspeed"):
        first = rows[name][0]
        for part in ("contrastive", "caption"):
            key = f"{part}_loss"
            tol = bf16_loss_tolerance(ref[key], roundings[part])
            assert abs(first[key] - ref[key]) <= tol, (isa, name, part, first[key], ref[key], tol)
        for r in rows[name] + rows["fp32"]:  # loss = 1.0 * contrastive + 1.0 * caption, to fp32 rounding
            assert r["loss"] == pytest.approx(r["contrastive_loss"] + r["caption_loss"], rel=1e-6, abs=1e-6), (name, r)
        # three steps at lr 1e-3 take the loss down by more than a unit; Adam's normalised updates
        # carry bf16's few-percent gradient error into the weights, not more
        drop, drop_fp32 = first["loss"] - rows[name][-1]["loss"], ref["loss"] - rows["fp32"][-1]["loss"]
        assert drop == pytest.approx(drop_fp32, rel=0.1), (isa, name, drop, drop_fp32)


def test_deepspeed_run_of_zero_steps_exports_the_loaded_model(tmp_path):
    """No checkpoint exists to merge: the module's weights (whole on every rank at ZeRO <= 2) are saved."""
    needs_deepspeed()
    from safetensors.torch import load_file

    import coca
    tok = coca.Tokenizer.train(["a small red circle", "a large blue square"] * 50, vocab_size=30,
                               out_dir=tmp_path / "tok", model_type="bpe")
    torch.manual_seed(3)
    cfg = coca.config.load_run_config(None, ["model.text.vocab_size=64"]).model
    coca.create_model(cfg).save_pretrained(tmp_path / "init", tokenizer=tok)
    cmd = [sys.executable, "-m", "coca.cli", "train"] + sum((["--set", o] for o in [
        f"train.run_dir={tmp_path / 'run'}", f"train.init_from={tmp_path / 'init'}", "train.steps=0",
        "train.engine=deepspeed", "train.precision=fp32", "train.progress=false", "data.workers=0"]), [])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "COCA_MASTER_PORT": str(free_port())}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    a, b = load_file(str(tmp_path / "init/model.safetensors")), load_file(str(tmp_path / "run/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
