"""Training-step throughput: forward + backward + AdamW step of our CoCa vs open_clip's CoCa.

Run (from the repository root; about 3 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/train_step.py --json benchmarks/results/train_step.json

Both models are built at a matched size (see ``benchmarks/matched.py``; parameter counts are
printed), randomly initialised, train mode, ``torch.set_num_threads(2)``. Same images and the
same token ids for both: each caption is random ids, EOS (1), then pad (0) up to ``--text-len``
(default 76, open_clip's text context; it appends a CLS token to make 77 positions). Captions are
8-32 tokens long, as web captions are. Our data pipeline trims every batch to its longest caption
(``coca.tokenizer.trim_padding``; exact, because T5's relative positions and padding masks make the
kept positions' outputs identical), so ours runs the text towers on that length; open_clip's text
tower always runs its full context. ``--no-trim`` feeds ours the full padded length too.

Loss = contrastive + caption, weights 1 and 1:

* ours: symmetric InfoNCE on ``out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"]``
  plus cross-entropy of ``out["logits"]`` against the tokens, ignoring pad id 0.
* open_clip: ``open_clip.loss.CoCaLoss(caption_loss_weight=1, clip_loss_weight=1, pad_id=0)`` on the
  model's output dict (its captioning targets are ``text[:, 1:]``).

Each step is ``zero_grad(set_to_none=True)``, forward, loss, backward, ``AdamW.step()`` (default
torch AdamW settings for both, lr 1e-4, weight decay 0.1). Rows: fp32, and (unless --no-bf16) the
same step with forward + loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``. In each
repetition every row runs one step, rotating the order; the table reports the median. One
untimed warm-up step per row comes first (it also allocates the AdamW state). The fp32 and bf16
rows of a model share its weights (each row has its own AdamW), so the printed first-step losses
are only a sanity check, not comparable across rows.

Memory (unless --no-memory): each model runs two fp32 steps in a fresh subprocess and reports
its peak RSS (VmHWM from /proc/self/status) minus the RSS before the model was built:
weights, gradients, AdamW state and the peak of activations, plus allocator slack.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402

from coca.models.attention import set_attention  # noqa: E402
from coca.tokenizer import trim_padding  # noqa: E402
from coca.train.precision import training_attention  # noqa: E402


def make_batch(batch: int, text_len: int, image_size: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    tokens = torch.zeros(batch, text_len, dtype=torch.long)
    lengths = torch.randint(8, min(text_len - 1, 32) + 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        tokens[i, n] = 1  # EOS
    return images, tokens


def ours_loss(model, images, tokens):
    out = model(images, tokens)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].t()
    labels = torch.arange(logits.shape[0])
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    caption = F.cross_entropy(out["logits"].flatten(0, 1), tokens.flatten(), ignore_index=0)
    return clip + caption


def make_open_clip_loss():
    from open_clip.loss import CoCaLoss
    loss_fn = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0)

    def open_clip_loss(model, images, tokens):
        clip, caption = loss_fn(**model(images, tokens), output_dict=False)
        return clip + caption
    return open_clip_loss


def make_step(model, loss_fn, images, tokens, bf16: bool, lr: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            loss = loss_fn(model, images, tokens)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def build(which: str, size):
    model, _ = matched.build_ours(size) if which == "ours" else matched.build_open_clip(size)
    return model.train(), (ours_loss if which == "ours" else make_open_clip_loss())


def peak_rss_kb() -> int:
    """Peak resident set size of this process in KiB: VmHWM (per address space, so unlike
    ru_maxrss it does not inherit the parent's peak across fork/exec); ru_maxrss as a fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(args) -> int:
    """Subprocess: peak RSS of two training steps of one model (fp32), printed as JSON."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = matched.size_from_args(args)
    images, tokens = make_batch(args.batch, args.text_len, size.image_size, size.vocab, args.seed)
    # Our data pipeline trims each batch to its longest caption (coca.tokenizer.trim_padding); T5's
    # relative positions make that exact. open_clip's text tower always runs its full context.
    ours_tokens = tokens if args.no_trim else trim_padding(tokens)
    base = peak_rss_kb()
    model, loss_fn = build(args.memory_child, size)
    after_build = peak_rss_kb()
    step = make_step(model, loss_fn, images, ours_tokens if args.memory_child == "ours" else tokens, False, args.lr)
    step()
    step()
    peak = peak_rss_kb()
    print(json.dumps({"base_kb": base, "weights_kb": after_build - base, "peak_delta_kb": peak - base}))
    return 0


def measure_memory(args, which: str) -> dict:
    skip = {"json", "memory_child", "no_bf16", "no_memory", "reps"}
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", which]
    for key, value in vars(args).items():
        if key in skip or value is False or value is None:
            continue
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-len", type=int, default=76, help="caption length incl. padding (<= 76)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per row (median reported)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast rows")
    p.add_argument("--no-trim", action="store_true",
                   help="feed ours the full padded length instead of trimming the batch to its longest caption")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess measurement")
    p.add_argument("--memory-child", choices=("ours", "open_clip"), default=None, help=argparse.SUPPRESS)
    matched.add_size_args(p)
    args = p.parse_args(argv)
    if not 2 <= args.text_len <= 76:
        p.error("--text-len must be in [2, 76] (open_clip's text context is 76 plus its CLS token)")
    if args.memory_child:
        return memory_child(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = matched.size_from_args(args)
    images, tokens = make_batch(args.batch, args.text_len, size.image_size, size.vocab, args.seed)
    # Our data pipeline trims each batch to its longest caption (coca.tokenizer.trim_padding); T5's
    # relative positions make that exact. open_clip's text tower always runs its full context.
    ours_tokens = tokens if args.no_trim else trim_padding(tokens)

    ours, ours_loss_fn = build("ours", size)
    # attention as our BF16 training on this CPU runs it (train.precision.training_attention:
    # fp32 over bf16 inputs); for the fp32 rows it is the same computation as SDPA
    set_attention(ours, training_attention(torch.device("cpu"), "bf16"))
    oc, oc_loss_fn = build("open_clip", size)
    oc_cfg = matched.open_clip_cfg(size)
    params = matched.param_summary(ours, oc)
    p_ours, p_oc = params["ours"], params["open_clip"]

    print(f"# CoCa training step (fwd + bwd + AdamW), batch {args.batch}, text length {args.text_len} "
          f"(captions of 8-32 tokens; ours sees {ours_tokens.shape[1]} columns after trimming), {args.threads} threads")
    load_start = matched.print_setup(size, params)

    precisions = ["fp32"] + ([] if args.no_bf16 else ["bf16-autocast"])
    rows_spec = {}
    for prec in precisions:
        bf16 = prec != "fp32"
        rows_spec[f"{prec}/ours"] = make_step(ours, ours_loss_fn, images, ours_tokens, bf16, args.lr)
        rows_spec[f"{prec}/open_clip"] = make_step(oc, oc_loss_fn, images, tokens, bf16, args.lr)
    names = list(rows_spec)
    times: dict[str, list[float]] = {k: [] for k in names}
    losses = {}
    t_all = time.perf_counter()
    for name in names:  # warm-up; also allocates the AdamW state
        losses[name] = rows_spec[name]()
    print("first-step losses (sanity check): " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(matched.timed(rows_spec[name]))
        print(f"rep {r + 1}/{args.reps}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names), flush=True)
    load_end = os.getloadavg()
    t_timing = time.perf_counter() - t_all
    del ours, oc, rows_spec

    memory = {}
    if not args.no_memory:
        for which in ("ours", "open_clip"):
            memory[which] = measure_memory(args, which)

    results = []
    for name in names:
        med = matched.median(times[name])
        results.append({"row": name, "batch": args.batch, "median_s": med, "times_s": times[name],
                        "samples_per_s": args.batch / med})
    by = {r["row"]: r for r in results}
    rows = []
    for r in results:
        prec, which = r["row"].split("/")
        ref = by[f"{prec}/open_clip"]
        r["speedup_vs_open_clip"] = ref["median_s"] / r["median_s"]
        mem = memory.get(which) if prec == "fp32" else None
        r["peak_rss_delta_mb"] = mem["peak_delta_kb"] / 1024 if mem else None
        rows.append([which, prec, args.batch, f"{r['median_s']:.3f}", f"{r['samples_per_s']:.2f}",
                     f"{r['speedup_vs_open_clip']:.2f}x", f"{r['peak_rss_delta_mb']:.0f}" if mem else "-"])

    print()
    print(f"Matched size: ViT {size.vision_width}w x {size.vision_layers}L @ {size.image_size}px/{size.patch_size}, "
          f"text {size.text_width}w, {size.encoder_layers} enc + {size.decoder_layers} dec layers, vocab {size.vocab}; "
          f"params ours {p_ours / 1e6:.1f}M vs open_clip {p_oc / 1e6:.1f}M. Batch {args.batch}, text length "
          f"{args.text_len}, {args.threads} CPU threads, median of {args.reps} interleaved steps.")
    print()
    print(matched.markdown_table(["model", "precision", "batch", "median s/step", "samples/s",
                                  "ours/open_clip (samples/s ratio)", "peak RSS delta MB (fp32)"], rows))
    print()
    for prec in precisions:
        print(f"{prec}: ours/open_clip samples/s = {by[f'{prec}/ours']['speedup_vs_open_clip']:.2f}x")
    if memory:
        print("peak RSS delta = peak RSS of 2 fp32 steps in a fresh process minus RSS before building the model "
              f"(peak after construction alone: ours {memory['ours']['weights_kb'] / 1024:.0f} MB, "
              f"open_clip {memory['open_clip']['weights_kb'] / 1024:.0f} MB)")
    print(f"timing {t_timing:.0f}s; load average start {load_start[0]:.2f}, end {load_end[0]:.2f} "
          f"(other processes on the machine make absolute numbers noisy)")

    matched.write_results(args.json, "train_step", args, size, oc_cfg, params, load_start, load_end,
                          first_step_losses=losses, memory=memory, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
