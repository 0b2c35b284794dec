"""Training-step options against the plain step: a frozen vision tower (``optim.freeze:
[visual]``), the caption cross-entropy in chunks (``loss.caption_chunk_tokens``) and the model
under ``torch.compile`` (``train.compile``): time, the bytes autograd keeps for backward,
gradients + AdamW state, and peak RSS.

Run (from the repository root; about 3 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/step_options.py --json benchmarks/results/step_options.json

Every row uses our own training pieces: ``coca.train.optim.freeze`` and ``param_groups`` (so a
frozen tower is neither in AdamW nor given gradients) and ``coca.losses.CoCaLoss`` (contrastive +
caption, weights 1 and 1; chunked or not), on one model of the size in ``benchmarks/matched.py`` (ViT 384 x 6 at
160 px / 16, text 512 wide, 6 + 6 layers; random weights), the same batch, fp32. Each step is
zero_grad, forward, loss, backward, AdamW step. After one untimed warm-up step per row, every
repetition runs one step of each row in rotating order; the table reports the median.

Memory: "saved for backward" counts the bytes of the tensors autograd saves during one forward +
loss (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), exact and noise-free;
"grads + AdamW" is 3 x 4 bytes per trainable parameter; peak RSS is measured in a fresh process
(VmHWM) over two steps, minus the RSS before the model was built.

The compiled row wraps the model in ``torch.compile`` (default mode, as ``train.compile`` does);
its first step, which compiles forward and backward, is timed separately ("first step s") and
is not in the median. The compiler's caches go to a fresh temporary directory, so that first
step is a cold compile, as in a new training run on a new machine. Its "saved for backward" is not measured (the compiled graph saves what
its own partitioner chooses, outside the hooks); its peak RSS includes the compiler's own memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# a cold compile for the compiled row (the memory child, started with this environment, reuses it)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="step_options_inductor_"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402
from train_step import make_batch, peak_rss_kb  # noqa: E402

from coca.config import OptimConfig  # noqa: E402
from coca.losses import CoCaLoss  # noqa: E402
from coca.tokenizer import trim_padding  # noqa: E402
from coca.train.optim import freeze, param_groups  # noqa: E402

ROWS = {  # name -> (frozen components, caption chunk, torch.compile)
    "all components trained": ([], 0, False),
    "vision tower frozen": (["visual"], 0, False),
    "caption CE in chunks of 1024 tokens": ([], 1024, False),
    "torch.compile (train.compile)": ([], 0, True),
}


def build_step(size, row, images, tokens, lr: float):
    frozen, chunk, compiled = row
    torch.manual_seed(0)
    model, _ = matched.build_ours(size)
    model.train()
    freeze(model, frozen)
    opt = torch.optim.AdamW(param_groups(model, OptimConfig(lr=lr, weight_decay=0.1)), lr=lr)
    loss_fn = CoCaLoss(1.0, 1.0, 0, caption_chunk_tokens=chunk, lm_head_weight=model.text_decoder.lm_head.weight)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(images, tokens, return_logits=loss_fn.wants_logits), tokens).loss
        loss.backward()
        opt.step()
        return loss.item()
    return model, loss_fn, step


def saved_bytes(model, loss_fn, images, tokens) -> int:
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            saved[s._cdata] = (s.nbytes(), t)  # keeps t alive so ids are not reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(images, tokens, return_logits=loss_fn.wants_logits), tokens).loss
    return sum(n for n, _ in saved.values())


def memory_child(args) -> int:
    torch.set_num_threads(args.threads)
    size = matched.size_from_args(args)
    images, tokens = make_batch(args.batch, args.text_len, size.image_size, size.vocab, args.seed)
    base = peak_rss_kb()
    _, _, step = build_step(size, ROWS[args.memory_child], images, trim_padding(tokens), args.lr)
    step()
    step()
    print(json.dumps({"peak_delta_kb": peak_rss_kb() - base}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-len", type=int, default=76)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--memory-child", choices=list(ROWS), help=argparse.SUPPRESS)
    matched.add_size_args(p)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    size = matched.size_from_args(args)
    images, tokens = make_batch(args.batch, args.text_len, size.image_size, size.vocab, args.seed)
    tokens = trim_padding(tokens)
    print(f"# training step, batch {args.batch}, {args.threads} threads; size {size}")
    rows = {}
    for name, row in ROWS.items():
        model, loss_fn, step = build_step(size, row, images, tokens, args.lr)
        trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        saved = None if row[2] else saved_bytes(model, loss_fn, images, tokens)
        start = time.perf_counter()
        loss = step()  # warm-up: allocates the AdamW state; compiles the compiled row
        rows[name] = {"step": step, "times": [], "trainable": trainable, "saved_bytes": saved, "loss": loss,
                      "first_step_s": time.perf_counter() - start}
    names = list(rows)
    load_start = os.getloadavg()
    for r in range(args.reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rows[name]["times"].append(matched.timed(rows[name]["step"]))
        print(f"rep {r + 1}/{args.reps}: " + ", ".join(f"{n} {rows[n]['times'][-1]:.2f}s" for n in names), flush=True)
    load_end = os.getloadavg()
    results, table = [], []
    full = matched.median(rows[names[0]]["times"])
    for name in names:
        row = rows[name]
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--batch", str(args.batch),
               "--text-len", str(args.text_len), "--threads", str(args.threads)]
        rss = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        med = matched.median(row["times"])
        res = {"row": name, "median_s": med, "times_s": row["times"], "speedup": full / med,
               "first_step_s": row["first_step_s"], "trainable_params": row["trainable"],
               "saved_for_backward_mb": None if row["saved_bytes"] is None else row["saved_bytes"] / 2 ** 20,
               "grads_and_adamw_mb": 12 * row["trainable"] / 2 ** 20, "peak_rss_delta_mb": rss["peak_delta_kb"] / 1024,
               "first_loss": row["loss"]}
        results.append(res)
        saved_mb = "-" if res["saved_for_backward_mb"] is None else f"{res['saved_for_backward_mb']:.0f}"
        table.append([name, f"{row['trainable'] / 1e6:.1f}M", f"{med:.3f}", f"{res['speedup']:.2f}x",
                      f"{row['first_step_s']:.1f}", saved_mb, f"{res['grads_and_adamw_mb']:.0f}",
                      f"{res['peak_rss_delta_mb']:.0f}"])
    print()
    print(matched.markdown_table(["row", "trainable", "median s/step", "speed vs all trained", "first step s",
                                  "saved for backward MB",
                                  "grads + AdamW MB", "peak RSS delta MB"], table))
    print(f"load average start {load_start[0]:.2f}, end {load_end[0]:.2f}")
    matched.write_json(args.json, {"benchmark": "step_options", "args": vars(args), "size": vars(size),
                                   "env": {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                                   "load_avg": {"start": load_start, "end": load_end}, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
