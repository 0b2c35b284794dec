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

Cost per sample (``--lengths uniform|coco|web``; about 12 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/train_step.py --lengths web --json benchmarks/results/sample_cost_web.json

Captions drawn from a stated length distribution (tokens including EOS, at most 76):

* uniform: 8-32 tokens, uniformly (the side-by-side rows above);
* coco: COCO-shaped, words ~ lognormal around 10.2 (sigma 0.22) plus 1 in 200 of 20-50 words,
  tokens = ceil(1.3 x words) + EOS (``benchmarks/trim.py``'s model of COCO's ~10.5-word captions);
* web: alt-text-shaped, tokens ~ lognormal with median 15 and sigma 0.99, so that 70% are under 25
  tokens (ALBEF's authors: "most of the captions for pre-training have a length shorter than 25",
  salesforce/ALBEF#35) and a long tail of which 5% reach the 76-token limit and are truncated there
  (SigLIP, LiT and ViCLIP train on 16-32 tokens for the same reason).

The model has the FLOP split of coca-large-v2 at 77 tokens (``--preset seed-split``: ViT 256 wide x
8 layers on 128 px / 16, text 256 wide, 2 + 2 layers, vocab 4096, 64 decoder queries: vision side
54%, text 46%, against coca-large-v2's 55:45 by ``coca info``), small enough for the seed's
micro-batch of 256 (the default here) on a CPU. Rows, each in fp32 and under BF16 autocast, interleaved, median of ``--reps``: open_clip
(its full 76 + CLS context); ours padded to 76; ours trimmed to the batch's longest caption; ours
packed (``train.pack_text``); ours packed with patch dropout 0.5 (``train.patch_dropout``); ours
packed with attention in 4 length groups (``packed_buckets``, what training on a CPU runs). Ours
runs the trainer's loss (``coca.losses.CoCaLoss``), open_clip its own. FLOPs per sample are
counted with ``coca.summary.flop_counter`` over one forward + backward; peak memory is the fp32
peak RSS of two steps in a fresh process, as above.
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

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402

from coca.models.attention import set_attention  # noqa: E402
from coca.models.packing import TextPacking  # noqa: E402
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


WEB_MEDIAN_TOKENS, WEB_SIGMA = 15.0, 0.99  # lognormal: P(>= 76 tokens) = 5%, P(< 25) = 70%


def caption_lengths(kind: str, batch: int, text_len: int, seed: int) -> list[int]:
    """Caption lengths in tokens (EOS included), at most ``text_len``; see the module docstring."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        lengths = rng.integers(9, min(text_len, 33) + 1, batch)  # 8-32 tokens + EOS
    elif kind == "coco":
        words = np.clip(np.round(rng.lognormal(np.log(10.2), 0.22, batch)), 6, 50)
        long = rng.random(batch) < 0.005
        words[long] = rng.integers(20, 51, long.sum())
        lengths = np.ceil(1.3 * words).astype(int) + 1
    elif kind == "web":
        lengths = np.round(rng.lognormal(np.log(WEB_MEDIAN_TOKENS), WEB_SIGMA, batch)).astype(int)
    else:
        raise ValueError(f"unknown length distribution {kind!r}")
    return np.clip(lengths, 2, text_len).tolist()


def tokens_of_lengths(lengths: list[int], text_len: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), text_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n - 1] = torch.randint(3, vocab, (n - 1,), generator=g)
        tokens[i, n - 1] = 1  # EOS, the last token (a truncated caption keeps it, as the tokenizer does)
    return tokens


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


# --------------------------------------------------------------------- cost per sample (--lengths)

SEED_SPLIT = dict(image_size=128, patch_size=16, vision_width=256, vision_layers=8, vision_heads=4, text_width=256,
                  text_heads=4, encoder_layers=2, decoder_layers=2, d_ff=768, vocab=4096, n_queries=64, embed_dim=256)
METHODS = ("open_clip", "padded", "trimmed", "packed", "packed_dropout", "packed_buckets")
BUCKETS = 4  # packed_buckets: attention in 4 groups of captions of similar length, each at its own width


def method_step(method: str, model, images, tokens, bf16: bool, lr: float):
    """One training step of ``method`` on this batch (its own AdamW), and the call it times."""
    from coca.losses import CoCaLoss
    if method == "open_clip":
        return make_step(model, make_open_clip_loss(), images, tokens, bf16, lr)
    loss_fn = CoCaLoss(1.0, 1.0, 0)
    feed = trim_padding(tokens) if method == "trimmed" else tokens
    pack, dropout = method.startswith("packed"), 0.5 if method == "packed_dropout" else 0.0
    buckets = BUCKETS if method == "packed_buckets" else 1

    def loss(model, images, _tokens):
        packing = TextPacking.of(feed, 0, buckets) if pack else False  # built per step, as training does
        return loss_fn(model(images, feed, pack_text=packing, patch_dropout=dropout), feed).loss
    return make_step(model, loss, images, tokens, bf16, lr)


def counted_flops(step) -> float:
    """FLOPs of one forward + backward (the optimiser's few are left out), by the flop counter."""
    from coca.summary import flop_counter
    with flop_counter() as counter:
        step()
    return float(counter.get_total_flops())


def cost_child(args) -> int:
    """Subprocess: peak RSS of two fp32 steps of one method, printed as JSON."""
    torch.set_num_threads(args.threads)
    size = matched.Size(**SEED_SPLIT)
    images, tokens = cost_batch(args, size)
    base = peak_rss_kb()
    model = (matched.build_open_clip(size) if args.cost_child == "open_clip" else matched.build_ours(size))[0].train()
    step = method_step(args.cost_child, model, images, tokens, False, args.lr)
    step()
    step()
    print(json.dumps({"peak_delta_kb": peak_rss_kb() - base}))
    return 0


def cost_batch(args, size):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, size.image_size, size.image_size, generator=g)
    lengths = caption_lengths(args.lengths, args.batch, args.text_len, args.seed)
    return images, tokens_of_lengths(lengths, args.text_len, size.vocab, args.seed)


def cost_per_sample(args) -> int:
    from coca.cpu import cpu_description
    from coca.summary import forward_flops
    torch.set_num_threads(args.threads)
    size = matched.Size(**SEED_SPLIT)
    images, tokens = cost_batch(args, size)
    lengths = (tokens != 0).sum(1)
    ours, _ = matched.build_ours(size)
    set_attention(ours, training_attention(torch.device("cpu"), "bf16"))  # as BF16 training on CPU runs it
    ours.train()
    oc, _ = matched.build_open_clip(size)
    oc.train()
    split = forward_flops(ours)
    vision_share = (split["visual"] + split["poolers"]) / split["total"]
    print(f"# cost per sample: {args.lengths} lengths (mean {float(lengths.float().mean()):.1f}, median "
          f"{float(lengths.float().median()):.0f}, longest {int(lengths.max())}, "
          f"{float((lengths >= args.text_len).float().mean()) * 100:.1f}% at {args.text_len}), batch {args.batch}, "
          f"{args.threads} threads, {cpu_description()}")
    print(f"forward FLOPs at 77 tokens: vision {vision_share * 100:.1f}%, text {100 - vision_share * 100:.1f}% "
          f"(params ours {matched.n_params(ours) / 1e6:.1f}M, open_clip {matched.n_params(oc) / 1e6:.1f}M)")
    methods = [m for m in METHODS if m in args.methods.split(",")]
    precisions = ["fp32"] + ([] if args.no_bf16 else ["bf16"])
    steps = {(m, prec): method_step(m, oc if m == "open_clip" else ours, images, tokens, prec == "bf16", args.lr)
             for prec in precisions for m in methods}
    flops = {}
    for m in methods:  # counted once per method in fp32: the same operations in BF16
        flops[m] = counted_flops(steps[(m, "fp32")]) / args.batch
    names = list(steps)
    for name in names:  # warm-up (and the AdamW state)
        steps[name]()
    times = {name: [] for name in names}
    load_start = os.getloadavg()
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(matched.timed(steps[name]))
        print(f"rep {r + 1}/{args.reps}: " + ", ".join(f"{m}/{p} {times[(m, p)][-1]:.2f}s" for m, p in names), flush=True)
    load_end = os.getloadavg()
    memory = {}
    if not args.no_memory:
        for m in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--cost-child", m, "--lengths", args.lengths,
                   "--batch", str(args.batch), "--seed", str(args.seed), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            memory[m] = json.loads(out.strip().splitlines()[-1])["peak_delta_kb"] / 1024
    rows, table = [], []
    for m, prec in names:
        med = matched.median(times[(m, prec)])
        ref = matched.median(times[("open_clip", prec)]) if "open_clip" in methods else float("nan")
        row = {"method": m, "precision": prec, "lengths": args.lengths, "batch": args.batch, "median_s": med,
               "times_s": times[(m, prec)], "samples_per_s": args.batch / med, "flops_per_sample": flops[m],
               "speedup_vs_open_clip": ref / med, "peak_rss_mb": memory.get(m) if prec == "fp32" else None}
        rows.append(row)
        table.append([m, prec, f"{row['samples_per_s']:.1f}", f"{flops[m] / 1e9:.2f}", f"{row['speedup_vs_open_clip']:.2f}x",
                      f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"])
    print()
    print(matched.markdown_table(["method", "precision", "samples/s", "GFLOPs/sample (fwd+bwd)", "vs open_clip",
                                  "peak RSS MB (fp32)"], table))
    matched.write_json(args.json, {
        "benchmark": "sample_cost", "args": vars(args), "size": SEED_SPLIT, "cpu": cpu_description(),
        "threads": args.threads, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg": {"start": load_start, "end": load_end},
        "lengths": {"mean": float(lengths.float().mean()), "median": float(lengths.float().median()),
                    "max": int(lengths.max()), "share_at_limit": float((lengths >= args.text_len).float().mean())},
        "forward_flops_77": split, "vision_share_77": vision_share, "rows": rows})
    return 0


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
    p.add_argument("--lengths", choices=("uniform", "coco", "web"), default=None,
                   help="cost per sample: every method at the seed-split size, captions of this length distribution")
    p.add_argument("--methods", default=",".join(METHODS), help=f"with --lengths: comma-separated, of {METHODS}")
    p.add_argument("--cost-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    matched.add_size_args(p)
    args = p.parse_args(argv)
    if not 2 <= args.text_len <= 76:
        p.error("--text-len must be in [2, 76] (open_clip's text context is 76 plus its CLS token)")
    if args.memory_child:
        return memory_child(args)
    if args.lengths or args.cost_child:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            p.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
        if "--batch" not in (argv if argv is not None else sys.argv):
            args.batch = 256  # the seed's micro-batch (16,384 over 64 GPUs)
        return cost_child(args) if args.cost_child else cost_per_sample(args)

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
