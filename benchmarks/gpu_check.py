"""One GPU check: everything to measure the day a CUDA GPU is available, as one command.

    .venv/bin/python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json   # one CUDA GPU, < 8 min
    .venv/bin/python benchmarks/gpu_check.py --smoke --json /tmp/gpu_check_smoke.json   # CPU, coca-tiny, < 2 min

It writes one JSON file and prints one table:

1. ``matmul``: the device's measured dense bf16 matmul peak (square matmuls, best of several),
   next to the datasheet peak given with ``--datasheet-tflops`` (H100/H200 SXM: 989, A100: 312).
2. ``train``: our ``coca-large-v2`` training step (forward, contrastive + caption loss, backward,
   AdamW; bf16 autocast with fp32 master weights; the trainer's own step (``run_step``) of the single
   engine) at the largest micro-batch that fits, searched by doubling, with and without
   activation checkpointing: samples/s, MFU against the measured and the datasheet peak (model
   FLOPs = 3 x forward, the recomputed forward not counted), peak memory against ``coca plan``'s
   prediction (its activation estimate + fp32 gradients, over the measured weights and AdamW state).
   ``sample_cost``: at that micro-batch (no checkpointing) with web-shaped captions (median 15
   tokens, 5% at the limit; ``benchmarks/train_step.py --lengths web``): ours padded to 76 tokens,
   packed (``train.pack_text``) and packed + patch dropout 0.5, and open_clip on the same batch,
   with samples/s, model FLOPs per sample, peak memory and the ratio to open_clip; on a GPU also
   packed with FlexAttention's document masks (``train.packed_attention: flex``).
   ``packed_attention``: that kernel's losses and every gradient against the padded step, fp32, on
   a mid-size model with captions of lengths 1..77 (forward only on the CPU).
3. ``open_clip``: open_clip's ``coca_ViT-L-14`` training step at the same micro-batch and precision
   (its own CoCaLoss), side by side, and the samples/s ratio.
4. ``generation``: greedy caption generation, 30 new tokens, tokens/s of ours (KV cache) and of
   open_clip's ``generate`` at batch 1 and 32, bf16 weights.
5. ``resume``: ``coca train`` under torchrun with one process, DDP and DeepSpeed (NCCL on a GPU,
   gloo in the smoke run), 20 steps of ``coca-base`` on synthetic scenes: a straight run, and a run
   killed with SIGKILL after its step-10 checkpoint and started again; the largest relative
   difference between their logged losses.

``--smoke`` runs the same code paths on the CPU with ``coca-tiny`` (and a shrunken open_clip CoCa)
at tiny batches, so the script cannot rot: the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402
from coca.train.step import PADDED, StepOptions  # noqa: E402
from train_step import caption_lengths, make_batch, tokens_of_lengths  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, synchronising the device around each."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return matched.median(times)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- matmul

def matmul_peak(device, n: int, reps: int) -> float:
    """TFLOPS of an n x n x n bf16 matmul (the best of ``reps``): the peak this device reaches."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device, 1) for _ in range(reps))
    return 2 * n ** 3 / best / 1e12


# ------------------------------------------------------------------------------ training steps

def synthetic_batch(batch: int, image_size: int, vocab: int, device, web: bool = False):
    """The training-step benchmark's batch (captions of 8-32 tokens + EOS), on ``device``; ``web``:
    web-shaped caption lengths (median 15, 5% at the limit) padded to open_clip's 76."""
    images, tokens = make_batch(batch, 33, image_size, vocab, seed=0)
    if web:
        tokens = tokens_of_lengths(caption_lengths("web", batch, 76, seed=0), 76, vocab, seed=0)
    return images.to(device), tokens.to(device)


def ours_step_factory(preset: str, device, checkpointing: bool):
    """A function batch -> step callable, over one model built once (the trainer's own step)."""
    import coca
    from coca.config import OptimConfig
    from coca.losses import CoCaLoss
    from coca.train.distributed import World
    from coca.train.engines import build_engine
    from coca.train.optim import build_optimizer, build_scheduler
    torch.manual_seed(0)
    model = coca.create_model(preset).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    opt_cfg = OptimConfig(lr=1e-4)
    optimizer = build_optimizer(model, opt_cfg)
    engine = build_engine("single", model, optimizer, build_scheduler(optimizer, opt_cfg, 1000), device, World(), "bf16",
                          grad_clip=1.0)
    loss_fn = CoCaLoss(1.0, 1.0, model.cfg.text.pad_id)
    cfg = model.cfg

    def make(batch: int, web: bool = False, options: StepOptions = PADDED):
        images, tokens = synthetic_batch(batch, cfg.vision.image_size, cfg.text.vocab_size, device, web)

        def step():
            return engine.run_step([(images, tokens)], loss_fn, options)
        return step
    return model, make


def open_clip_step_factory(smoke: bool, device):
    import open_clip
    from open_clip.coca_model import CoCa
    from open_clip.loss import CoCaLoss
    cfg = open_clip.get_model_config("coca_ViT-L-14")
    if smoke:  # the same architecture, shrunk to run in seconds on a CPU
        cfg["vision_cfg"].update(image_size=64, layers=2, width=128, patch_size=16)
        cfg["text_cfg"].update(width=128, heads=4, layers=2, vocab_size=1024)
        cfg["multimodal_cfg"].update(width=128, heads=4, layers=2, vocab_size=1024, attn_pooler_heads=4)
        cfg["embed_dim"] = 128
    torch.manual_seed(0)
    model = CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"]).to(device).train()
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)  # see matched.py
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss_fn = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0)
    size, vocab = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["vocab_size"]

    def make(batch: int, web: bool = False):
        images, tokens = synthetic_batch(batch, size, vocab, device, web)
        tokens = torch.nn.functional.pad(tokens, (0, 76 - tokens.shape[1]))  # open_clip's fixed context

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                clip, caption = loss_fn(**model(images, tokens), output_dict=False)
            (clip + caption).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return step
    return model, make


def largest_batch(make, candidates: list[int], device) -> int | None:
    """The largest candidate micro-batch whose two training steps fit in memory."""
    best = None
    for b in candidates:
        try:
            step = make(b)
            step()
            step()
            best = b
        except RuntimeError as e:
            if not is_oom(e):
                raise
            break
        finally:
            step = None
            free(device)
    return best


def measure_step(make, batch: int, device, reps: int) -> dict:
    step = make(batch)
    step()
    free(device)
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, reps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"batch": batch, "median_s": seconds, "samples_per_s": batch / seconds,
            "peak_memory_gib": peak / 2 ** 30, "static_memory_gib": static / 2 ** 30}


def train_rows(args, device, peak_tflops: float) -> tuple[list[dict], dict]:
    import coca
    from coca.config import load_run_config
    from coca.plan import plan
    from coca.summary import forward_flops
    preset = "coca-tiny" if args.smoke else "coca-large-v2"
    candidates = [2, 4] if args.smoke else [16, 32, 64, 128, 256, 512, 1024]
    rows, batches = [], {}
    for checkpointing in (False, True):
        model, make = ours_step_factory(preset, device, checkpointing)
        b = largest_batch(make, candidates, device)
        if b is None:
            rows.append({"row": f"ours {preset}", "checkpointing": checkpointing, "error": "smallest batch did not fit"})
            continue
        r = measure_step(make, b, device, args.reps)
        text_len = 33  # the synthetic captions: up to 32 tokens + EOS (the batch is not trimmed further)
        fwd = forward_flops(coca.create_model(preset, device="meta"), 1, text_len)["total"]
        model_flops = 3 * fwd * b
        p = plan(load_run_config(None, [f"model.preset={preset}", f"data.batch_size={b}",
                                        f"train.activation_checkpointing={str(checkpointing).lower()}"]),
                 1, 80, args.datasheet_tflops, 0.5)
        n_params = sum(q.numel() for q in model.parameters())
        act = p["activations_checkpointed_bytes" if checkpointing else "activations_bytes"]
        r.update(row=f"ours {preset}", checkpointing=checkpointing,
                 mfu_measured_peak=model_flops / r["median_s"] / (peak_tflops * 1e12),
                 mfu_datasheet=model_flops / r["median_s"] / (args.datasheet_tflops * 1e12),
                 plan_activation_and_grad_gib=(act + 4 * n_params) / 2 ** 30,
                 measured_activation_and_grad_gib=r["peak_memory_gib"] - r["static_memory_gib"])
        rows.append(r)
        batches[checkpointing] = b
        del model, make
        free(device)
    # open_clip at our largest batch without checkpointing (open_clip's CoCa has no per-block
    # checkpointing switch in this path): same precision, same optimiser, side by side
    b = batches.get(False)
    if b is not None:
        oc, make = open_clip_step_factory(args.smoke, device)
        try:
            r = measure_step(make, b, device, args.reps)
            r.update(row="open_clip coca_ViT-L-14" + (" (shrunk)" if args.smoke else ""), checkpointing=False)
            ours = next(x for x in rows if x.get("checkpointing") is False and "samples_per_s" in x)
            r["ours_over_open_clip"] = ours["samples_per_s"] / r["samples_per_s"]
        except RuntimeError as e:
            if not is_oom(e):
                raise
            r = {"row": "open_clip coca_ViT-L-14", "batch": b, "error": "out of memory at our batch"}
        rows.append(r)
        del oc, make
        free(device)
    return rows, batches


def open_clip_forward_flops(model, device) -> float:
    """open_clip's CoCa forward on one sample (it pads every caption to 76: no length dependence)."""
    from coca.summary import flop_counter
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.zeros(1, 3, size, size, device=device)
    tokens = torch.ones(1, 76, dtype=torch.long, device=device)
    with torch.no_grad(), flop_counter() as counter:
        model(images, tokens)
    return float(counter.get_total_flops())


SAMPLE_COST = {"padded": PADDED, "packed": StepOptions(pack_text=True),
               "packed + patch dropout 0.5": StepOptions(pack_text=True, patch_dropout=0.5)}
# GPUs only (FlexAttention has no CPU backward): the packed towers with FlexAttention's document
# masks instead of re-padded attention ("packed" above, one width on a GPU)
SAMPLE_COST_CUDA = {"packed, flex attention": StepOptions(pack_text=True, packed_attention="flex")}


def packed_attention_check(device) -> dict:
    """The flex packed-attention kernel against the padded computation, fp32, on one mid-size model
    and one batch of captions of every length 1..77: the caption and contrastive losses and, on a
    GPU, every parameter's gradient (largest difference relative to the tensor's largest value).
    On the CPU the forward only, as ``tests/test_packing.py`` checks it."""
    import coca
    from coca.config import get_preset
    from coca.losses import CoCaLoss
    from coca.models.packing import TextPacking
    cfg = get_preset("coca-tiny").to_dict()
    cfg["text"].update(d_model=256, d_kv=32, num_heads=8, d_ff=768, encoder_layers=4, decoder_layers=4, vocab_size=2048)
    cfg["vision"].update(width=192, heads=6, mlp_dim=384, layers=2)
    torch.manual_seed(0)
    model = coca.create_model(cfg).to(device).train()
    t, size = model.cfg.text, model.cfg.vision.image_size
    lengths = list(range(1, t.context_length + 1))
    tokens = tokens_of_lengths(lengths[::2] + lengths[1::2][::-1], t.context_length, t.vocab_size, seed=0).to(device)
    images = torch.randn(len(lengths), 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    loss_fn = CoCaLoss(pad_id=t.pad_id)
    backward = device.type == "cuda"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    try:
        runs = {}
        for name, pack in (("padded", False), ("flex", TextPacking.of(tokens, t.pad_id, kernel="flex"))):
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(backward):
                losses = loss_fn(model(images, tokens, return_logits=True, pack_text=pack), tokens)
                if backward:
                    losses.loss.backward()
            runs[name] = (losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (ref, ref_grads), (flex, flex_grads) = runs["padded"], runs["flex"]
    row = {"check": "flex packed attention vs padded (fp32)", "gradients_checked": backward,
           "caption_loss_rel_diff": abs(float(flex.caption) - float(ref.caption)) / abs(float(ref.caption)),
           "contrastive_loss_rel_diff": abs(float(flex.contrastive) - float(ref.contrastive)) / abs(float(ref.contrastive))}
    if backward:
        row["gradients"] = len(ref_grads)
        row["missing_gradients"] = sorted(set(ref_grads) - set(flex_grads))
        row["max_grad_rel_diff"] = max(float((flex_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                                       for n, g in ref_grads.items() if n in flex_grads)
    return row


def sample_cost_rows(args, device, batch: int) -> list[dict]:
    """What a sample costs with web-shaped captions at the training rows' micro-batch: ours padded
    to 76 tokens, packed (``train.pack_text``), packed + patch dropout 0.5, and open_clip, which
    pads to 76; the same images and captions, samples/s, model FLOPs per sample, peak memory."""
    import coca
    from coca.summary import forward_flops
    preset = "coca-tiny" if args.smoke else "coca-large-v2"
    lengths = torch.tensor(caption_lengths("web", batch, 76, seed=0))  # synthetic_batch's captions
    mean_tokens = float(lengths.float().mean())
    meta = coca.create_model(preset, device="meta")
    rows = []
    model, make = ours_step_factory(preset, device, False)
    methods = {**SAMPLE_COST, **(SAMPLE_COST_CUDA if device.type == "cuda" else {})}
    for name, options in methods.items():
        try:
            r = measure_step(lambda b: make(b, web=True, options=options), batch, device, args.reps)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            rows.append({"row": f"ours {name}", "batch": batch, "error": "out of memory"})
            free(device)
            continue
        at = None if name == "padded" else mean_tokens
        r.update(row=f"ours {name}", method=name, flops_per_sample=3 * forward_flops(meta, 1, at, options.patch_dropout)["total"])
        rows.append(r)
        free(device)
    del model, make
    free(device)
    oc, make = open_clip_step_factory(args.smoke, device)
    try:
        r = measure_step(lambda b: make(b, web=True), batch, device, args.reps)
        r.update(row="open_clip coca_ViT-L-14" + (" (shrunk)" if args.smoke else ""), method="open_clip",
                 flops_per_sample=3 * open_clip_forward_flops(oc, device))
        rows.append(r)
        for x in rows:
            if "samples_per_s" in x:
                x["speedup_vs_open_clip"] = x["samples_per_s"] / r["samples_per_s"]
    except RuntimeError as e:
        if not is_oom(e):
            raise
        rows.append({"row": "open_clip coca_ViT-L-14", "batch": batch, "error": "out of memory"})
    del oc, make
    free(device)
    for x in rows:
        x.update(lengths="web", mean_caption_tokens=mean_tokens)
    return rows


# --------------------------------------------------------------------------------- generation

def generation_rows(args, device) -> list[dict]:
    from generation import OC_EOS, OC_PAD, OC_SOT

    import coca
    n = 30
    ours = coca.create_model("coca-tiny" if args.smoke else "coca-large-v2").to(device, torch.bfloat16).eval()
    oc, _ = open_clip_step_factory(args.smoke, device)
    oc = oc.to(torch.bfloat16).eval()
    rows = []
    for batch in (1, 32):
        images = torch.randn(batch, 3, ours.cfg.vision.image_size, ours.cfg.vision.image_size, device=device,
                             dtype=torch.bfloat16)
        oc_images = torch.randn(batch, 3, oc.visual.image_size[0], oc.visual.image_size[0], device=device,
                                dtype=torch.bfloat16)
        with torch.no_grad():
            t_ours = timed(lambda: ours.generate(images, strategy="greedy", max_new_tokens=n, min_new_tokens=n),
                           device, args.reps)
            t_oc = timed(lambda: oc.generate(oc_images, generation_type="top_k", top_k=1, seq_len=n + 1, min_seq_len=n,
                                             sot_token_id=OC_SOT, eos_token_id=OC_EOS, pad_token_id=OC_PAD),
                         device, args.reps)
        rows.append({"batch": batch, "new_tokens": n, "ours_tokens_per_s": batch * n / t_ours,
                     "open_clip_tokens_per_s": batch * n / t_oc, "ours_over_open_clip": t_oc / t_ours})
    ours = oc = None  # drop the weights before the next section
    free(device)
    return rows


# -------------------------------------------------------------------------- SIGKILL and resume

def _train_cmd(run_dir: Path, engine: str, smoke: bool, port: int) -> list[str]:
    steps, every = (6, 3) if smoke else (20, 10)
    sets = [f"train.run_dir={run_dir}", f"train.engine={engine}", f"train.steps={steps}",
            f"train.checkpoint_every={every}", "train.log_every=1", "train.val_every=0", "train.progress=false",
            "train.tensorboard=false", "data.workers=0", "data.tokenizer_model_type=bpe",
            "data.tokenizer_train_captions=2000", "optim.lr=1e-4"]
    if smoke:
        sets += ["model.preset=coca-tiny", "model.text.vocab_size=64", "data.tokenizer_vocab_size=64",
                 "data.batch_size=4", "train.precision=fp32", "train.threads=1", "train.device=cpu"]
    else:
        sets += ["model.preset=coca-base", "model.text.vocab_size=1024", "data.tokenizer_vocab_size=1024",
                 "data.batch_size=32", "train.precision=bf16", "train.device=cuda"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
            "-m", "coca.cli", "train"] + sum((["--set", s] for s in sets), [])


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def resume_rows(args, tmp: Path) -> list[dict]:
    import socket
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.smoke:
        env["DS_ACCELERATOR"] = "cpu"
    kill_after = 4 if args.smoke else 12  # past the first checkpoint
    rows = []
    for engine in ("ddp", "deepspeed"):
        def run(run_dir):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            return subprocess.Popen(_train_cmd(run_dir, engine, args.smoke, port), env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        straight = run(tmp / f"{engine}-straight")
        out = straight.communicate(timeout=600)[0].decode(errors="replace")
        if straight.returncode != 0:
            rows.append({"engine": engine, "error": out[-2000:]})
            continue
        killed_dir = tmp / f"{engine}-killed"
        proc = run(killed_dir)
        while proc.poll() is None:
            if (killed_dir / "metrics.jsonl").exists() and max(_losses(killed_dir), default=0) >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        resumed = run(killed_dir)
        out = resumed.communicate(timeout=600)[0].decode(errors="replace")
        a, b = _losses(tmp / f"{engine}-straight"), _losses(killed_dir)
        ok = resumed.returncode == 0 and "resumed from" in out and sorted(a) == sorted(b)
        diff = max((abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a if k in b), default=float("nan"))
        rows.append({"engine": engine, "resumed": ok, "steps": len(b), "max_rel_loss_diff": diff,
                     "wall_s": time.time() - t0, **({} if ok else {"output": out[-2000:]})})
    return rows


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with coca-tiny (< 2 min)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--datasheet-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "generation", "resume"])
    args = p.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(2)
        args.reps = min(args.reps, 2)
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --smoke to check the code paths on the CPU")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.time()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "smoke": args.smoke, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "datasheet_tflops": args.datasheet_tflops}
    peak = matmul_peak(device, 512 if args.smoke else 8192, 3 if args.smoke else 10)
    results["matmul_bf16_tflops"] = peak
    print(f"# GPU check on {results['device']}: measured bf16 matmul peak {peak:.1f} TFLOPS "
          f"(datasheet {args.datasheet_tflops:.0f})", flush=True)
    if "train" not in args.skip:
        results["train"], batches = train_rows(args, device, peak)
        for r in results["train"]:
            print("train", json.dumps(r), flush=True)
        if False in batches:
            results["sample_cost"] = sample_cost_rows(args, device, batches[False])
            for r in results["sample_cost"]:
                print("sample_cost", json.dumps(r), flush=True)
        results["packed_attention"] = packed_attention_check(device)
        print("packed_attention", json.dumps(results["packed_attention"]), flush=True)
    if "generation" not in args.skip:
        results["generation"] = generation_rows(args, device)
        for r in results["generation"]:
            print("generation", json.dumps(r), flush=True)
    if "resume" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            results["resume"] = resume_rows(args, Path(tmp))
        for r in results["resume"]:
            print("resume", json.dumps({k: v for k, v in r.items() if k != "output"}), flush=True)
    results["wall_s"] = time.time() - t_start
    print()
    print(format_table(results))
    matched.write_json(args.json, results)
    return 0


def format_table(r: dict) -> str:
    rows = [["bf16 matmul peak", f"{r['matmul_bf16_tflops']:.1f} TFLOPS", f"datasheet {r['datasheet_tflops']:.0f}"]]
    for t in r.get("train", []):
        if "error" in t:
            rows.append([f"{t['row']} step", t["error"], ""])
            continue
        ck = " + checkpointing" if t.get("checkpointing") else ""
        detail = f"batch {t['batch']}, peak {t['peak_memory_gib']:.1f} GiB"
        if "mfu_measured_peak" in t:
            detail += (f", MFU {t['mfu_measured_peak']:.1%} of measured / {t['mfu_datasheet']:.1%} of datasheet, "
                       f"activations+grads {t['measured_activation_and_grad_gib']:.1f} GiB (plan "
                       f"{t['plan_activation_and_grad_gib']:.1f})")
        if "ours_over_open_clip" in t:
            detail += f", ours / open_clip {t['ours_over_open_clip']:.2f}x"
        rows.append([f"{t['row']} step{ck}", f"{t['samples_per_s']:.1f} samples/s", detail])
    for c in r.get("sample_cost", []):
        if "error" in c:
            rows.append([f"{c['row']} step, web captions", c["error"], ""])
            continue
        rows.append([f"{c['row']} step, web captions", f"{c['samples_per_s']:.1f} samples/s",
                     f"batch {c['batch']}, {c['flops_per_sample'] / 1e9:.3g} GFLOPs/sample, peak "
                     f"{c['peak_memory_gib']:.1f} GiB, vs open_clip {c.get('speedup_vs_open_clip', float('nan')):.2f}x"])
    if "packed_attention" in r:
        c = r["packed_attention"]
        detail = f"losses: caption {c['caption_loss_rel_diff']:.1e}, contrastive {c['contrastive_loss_rel_diff']:.1e}"
        if c["gradients_checked"]:
            detail += f"; {c['gradients']} gradients, max relative {c['max_grad_rel_diff']:.1e}, missing {len(c['missing_gradients'])}"
        rows.append([c["check"], "forward and backward" if c["gradients_checked"] else "forward (CPU)", detail])
    for g in r.get("generation", []):
        rows.append([f"greedy generation, batch {g['batch']}", f"{g['ours_tokens_per_s']:.0f} tokens/s",
                     f"open_clip {g['open_clip_tokens_per_s']:.0f}; ours / open_clip {g['ours_over_open_clip']:.2f}x"])
    for x in r.get("resume", []):
        state = "error" if "error" in x else ("resumed" if x["resumed"] else "FAILED")
        rows.append([f"{x['engine']} SIGKILL + resume", state,
                     "" if "error" in x else f"{x['steps']} steps, max relative loss difference {x['max_rel_loss_diff']:.2e}"])
    return matched.markdown_table(["check", "result", "detail"], rows)


if __name__ == "__main__":
    raise SystemExit(main())
