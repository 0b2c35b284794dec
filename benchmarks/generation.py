"""Caption-generation throughput: our KV-cached ``model.generate`` vs open_clip's ``CoCa.generate``.

Run (from the repository root; about 3 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/generation.py --json benchmarks/results/generation.json

Both models are built at a matched size (see ``benchmarks/matched.py``; parameter counts are
printed), randomly initialised, fp32, eval mode, ``torch.no_grad``, ``torch.set_num_threads(2)``.

Every row generates exactly ``--new-tokens`` tokens per image:

* ours: ``generate(images, strategy=..., max_new_tokens=N, min_new_tokens=N)``; min_new_tokens
  masks EOS for all N steps, so no row stops early.
* open_clip: ``generate(images, seq_len=N + 1, min_seq_len=N, ...)``. Its output starts with the
  start token, so N + 1 columns are N new tokens. ``MinLengthLogitsProcessor`` masks EOS until the
  last step, where open_clip forces EOS itself. Greedy is ``generation_type="top_k", top_k=1``
  (one candidate left, so multinomial sampling is argmax). ``pad_token_id=-1`` is an id that can
  never be generated, because open_clip stops a row that emits its pad id. Start token 2, EOS 1
  (ids inside the 32000 vocabulary; open_clip's defaults 49406/49407 are CLIP ids and lie outside it).
  Beam search: ``generation_type="beam_search", num_beam_groups=1`` (plain beam search, like ours).

The script checks the output shapes, so a run that stopped early fails instead of reporting
inflated throughput. Timings include image encoding (both generate() calls encode the images).
Throughput = batch * new_tokens / seconds (for beam search: tokens of the returned captions, not
of all beams). In each repetition the methods run back to back, rotating the order, and the
table reports the median over repetitions; one untimed warm-up run of each comes first.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402

OC_SOT, OC_EOS, OC_PAD = 2, 1, -1


def reduced_copies(ours, dtypes: list[str]) -> dict:
    """dtype -> our model converted (bf16 weights, or int8 Linear layers), fp32 is the model itself."""
    import copy

    from coca.precision import apply_precision
    return {d: ours if d == "fp32" else apply_precision(copy.deepcopy(ours), d, "cpu") for d in dtypes}


def in_dtype(model, images):
    from coca.loading import to_model
    return to_model(model, images)


def make_methods(ours, oc, images, n, beam_images, num_beams, with_uncached, with_beam, reduced=None, oc_bf16=None,
                 compiled=False):
    """name -> (callable, batch, expected output columns, kind)."""
    greedy = dict(strategy="greedy", max_new_tokens=n, min_new_tokens=n)
    beam = dict(strategy="beam", num_beams=num_beams, max_new_tokens=n, min_new_tokens=n)
    oc_common = dict(seq_len=n + 1, min_seq_len=n, sot_token_id=OC_SOT, eos_token_id=OC_EOS, pad_token_id=OC_PAD)
    B, Bb = images.shape[0], beam_images.shape[0]
    methods = {
        "greedy/ours (KV cache)": (lambda: ours.generate(images, use_cache=True, **greedy), B, n, "greedy"),
        "greedy/open_clip": (lambda: oc.generate(images, generation_type="top_k", top_k=1, **oc_common), B, n + 1, "greedy"),
    }
    for d, model in (reduced or {}).items():
        if d != "fp32":
            x = in_dtype(model, images)
            methods[f"greedy/ours (KV cache, {d})"] = (
                lambda model=model, x=x: model.generate(x, use_cache=True, **greedy), B, n, "greedy")
    if compiled:  # every precision again through the compiled decoding step
        from coca.compiled_decoding import CompiledDecoder
        for d, model in (reduced or {"fp32": ours}).items():
            x, step = in_dtype(model, images), CompiledDecoder(model)
            methods[f"greedy/ours (KV cache{'' if d == 'fp32' else ', ' + d}, compiled)"] = (
                lambda model=model, x=x, step=step: model.generate(x, use_cache=True, compiled=step, **greedy), B, n,
                "greedy")
    if oc_bf16 is not None:
        xb = images.bfloat16()
        methods["greedy/open_clip (bf16)"] = (
            lambda: oc_bf16.generate(xb, generation_type="top_k", top_k=1, **oc_common), B, n + 1, "greedy")
    if with_uncached:
        methods["greedy/ours (no cache)"] = (lambda: ours.generate(images, use_cache=False, **greedy), B, n, "greedy")
    if with_beam:
        methods[f"beam{num_beams}/ours (KV cache)"] = (
            lambda: ours.generate(beam_images, use_cache=True, **beam), Bb, n, "beam")
        methods[f"beam{num_beams}/open_clip"] = (
            lambda: oc.generate(beam_images, generation_type="beam_search", num_beams=num_beams, num_beam_groups=1,
                                **oc_common), Bb, n + 1, "beam")
        if with_uncached:
            methods[f"beam{num_beams}/ours (no cache)"] = (
                lambda: ours.generate(beam_images, use_cache=False, **beam), Bb, n, "beam")
    return methods


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per generate() call (greedy rows)")
    p.add_argument("--beam-batch", type=int, default=2, help="images per call for the beam-search rows")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (median reported)")
    p.add_argument("--no-beam", action="store_true", help="skip the beam-search rows")
    p.add_argument("--no-uncached", action="store_true", help="skip our use_cache=False reference rows")
    p.add_argument("--dtypes", default="fp32", help="our precisions for the greedy rows, e.g. fp32,bf16,int8")
    p.add_argument("--open-clip-bf16", action="store_true", help="add open_clip's greedy row with bf16 weights")
    p.add_argument("--compile", action="store_true",
                   help="add each precision through generate(compile=True); the untimed warm-up compiles")
    p.add_argument("--floor", action="store_true",
                   help="batch-1 decode step time per precision against the memory-bandwidth floor")
    matched.add_size_args(p)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = matched.size_from_args(args)
    n = args.new_tokens
    if not 1 <= n <= 75:
        p.error("--new-tokens must be in [1, 75] (open_clip's text context is 76 including the start token)")

    ours, _ = matched.build_ours(size)
    oc, oc_cfg = matched.build_open_clip(size)
    ours.eval()
    oc.eval()
    params = matched.param_summary(ours, oc)
    p_ours, p_oc = params["ours"], params["open_clip"]

    images = torch.randn(args.batch, 3, size.image_size, size.image_size)
    beam_images = torch.randn(args.beam_batch, 3, size.image_size, size.image_size)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    reduced = reduced_copies(ours, dtypes)
    oc_bf16 = None
    if args.open_clip_bf16:
        import copy
        oc_bf16 = copy.deepcopy(oc).to(torch.bfloat16)
    methods = make_methods(ours, oc, images, n, beam_images, args.num_beams, with_uncached=not args.no_uncached,
                           with_beam=not args.no_beam, reduced=reduced, oc_bf16=oc_bf16, compiled=args.compile)

    print(f"# CoCa caption generation, {n} new tokens, {args.threads} threads")
    load_start = matched.print_setup(size, params)

    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    t_all = time.perf_counter()
    with torch.no_grad():
        for name in names:  # warm-up, and check that every method produces exactly n tokens
            fn, batch, cols, _ = methods[name]
            out = fn()
            if tuple(out.shape) != (batch, cols):
                raise RuntimeError(f"{name}: output shape {tuple(out.shape)}, expected {(batch, cols)}: "
                                   f"generation did not produce exactly {n} new tokens")
        for r in range(args.reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                times[name].append(matched.timed(methods[name][0]))
            print(f"rep {r + 1}/{args.reps}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names), flush=True)
    load_end = os.getloadavg()

    results = []
    for name in names:
        _, batch, _, kind = methods[name]
        med = matched.median(times[name])
        results.append({"method": name, "kind": kind, "batch": batch, "new_tokens": n, "median_s": med,
                        "times_s": times[name], "tokens_per_s": batch * n / med})
    by = {r["method"]: r for r in results}
    rows = []
    for r in results:
        ref = by["greedy/open_clip"] if r["kind"] == "greedy" else by.get(f"beam{args.num_beams}/open_clip")
        r["speedup_vs_open_clip"] = ref["median_s"] / r["median_s"]
        rows.append([r["method"], r["batch"], n, f"{r['median_s']:.3f}",
                     f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_open_clip']:.2f}x"])

    print()
    print(f"Matched size: ViT {size.vision_width}w x {size.vision_layers}L @ {size.image_size}px/{size.patch_size}, "
          f"text {size.text_width}w, {size.encoder_layers} enc + {size.decoder_layers} dec layers, vocab {size.vocab}; "
          f"params ours {p_ours / 1e6:.1f}M vs open_clip {p_oc / 1e6:.1f}M. "
          f"fp32, {args.threads} CPU threads, median of {args.reps} interleaved reps.")
    print()
    print(matched.markdown_table(
        ["method", "batch", "new tokens", "median s", "tokens/s", "ours/open_clip (tokens/s ratio)"], rows))
    print()
    g = by["greedy/ours (KV cache)"]["speedup_vs_open_clip"]
    print(f"greedy, KV cache: ours/open_clip tokens/s = {g:.2f}x")
    if not args.no_beam:
        print(f"beam{args.num_beams}, KV cache: ours/open_clip tokens/s = "
              f"{by[f'beam{args.num_beams}/ours (KV cache)']['speedup_vs_open_clip']:.2f}x")
    print(f"total {time.perf_counter() - t_all:.0f}s; load average start {load_start[0]:.2f}, end {load_end[0]:.2f} "
          f"(other processes on the machine make absolute numbers noisy)")

    floor = decode_floor(reduced, size, n, args.reps, args.compile) if args.floor else None
    matched.write_results(args.json, "generation", args, size, oc_cfg, params, load_start, load_end,
                          results=results, floor=floor)
    return 0


def read_bandwidth_gbs(reps: int = 7) -> float:
    """Memory read bandwidth: summing a 1 GiB fp32 tensor (far larger than any cache), median."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    secs = [matched.timed(lambda: x.sum()) for _ in range(reps)]
    return x.numel() * 4 / matched.median(secs) / 1e9


def bytes_per_step(model, visual_tokens: int, new_tokens: int) -> int:
    """What one cached decode step (batch 1) must read: every decoder weight except the cross-attention
    key/value projections (applied once per image), the LM head, the image's cross keys/values, and
    on average half of the grown self-attention cache."""
    from coca.precision import Int8Linear
    dec, t = model.text_decoder, model.cfg.text
    total = 0
    for name, module in dec.named_modules():
        if ".cross_attn.kv" in f".{name}" or name == "embed_tokens":
            continue
        if isinstance(module, Int8Linear):
            total += module.weight_int8.numel() + module.weight_scale.numel() * 4
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    act = 2 if next(dec.parameters()).dtype == torch.bfloat16 else 4
    kv = 2 * t.num_heads * t.d_kv * t.decoder_layers * act
    return total + kv * visual_tokens + kv * new_tokens // 2


def decode_floor(reduced: dict, size, n: int, reps: int, compiled: bool = False) -> dict:
    """Batch-1 cached decode step time, (t(n tokens) - t(1 token)) / (n - 1), against bytes read
    per step / measured read bandwidth; with ``compiled`` each precision also through the compiled step."""
    from coca.compiled_decoding import CompiledDecoder
    bw = read_bandwidth_gbs()
    image = torch.randn(1, 3, size.image_size, size.image_size)
    rows, out = [], {"read_bandwidth_GBps": bw, "rows": []}
    with torch.no_grad():
        for comp, (d, model) in itertools.product((False, True) if compiled else (False,), reduced.items()):
            x, step = in_dtype(model, image), CompiledDecoder(model) if comp else None
            gen = lambda k: model.generate(x, strategy="greedy", max_new_tokens=k, min_new_tokens=k,  # noqa: E731
                                           compiled=step)
            gen(n)
            gen(1)  # both lengths warmed (compiled: each length bucket is its own graph)
            d = f"{d} compiled" if comp else d
            t_n, t_1 = [], []
            for _ in range(max(reps, 5)):
                t_n.append(matched.timed(lambda: gen(n)))
                t_1.append(matched.timed(lambda: gen(1)))
            step = (matched.median(t_n) - matched.median(t_1)) / (n - 1)
            nbytes = bytes_per_step(model, size.n_queries, n)
            floor = nbytes / (bw * 1e9)
            out["rows"].append({"dtype": d, "step_ms": step * 1e3, "bytes_per_step": nbytes, "floor_ms": floor * 1e3,
                                "step_over_floor": step / floor})
            rows.append([d, f"{nbytes / 1e6:.1f}", f"{floor * 1e3:.2f}", f"{step * 1e3:.2f}", f"{step / floor:.2f}x"])
    print(f"\nbatch-1 decode step vs the memory floor (read bandwidth {bw:.1f} GB/s, summing 1 GiB):\n")
    print(matched.markdown_table(["dtype", "MB read per step", "floor ms", "measured ms/step", "measured/floor"], rows))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
