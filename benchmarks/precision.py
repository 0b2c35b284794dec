"""Reduced-precision inference on a trained model: agreement with fp32 and decoding speed.

Run (from the repository root, after `make demo` or `coca demo --out runs/demo`; ~3 minutes):

    .venv/bin/coca synthetic --out runs/heldout
    .venv/bin/python benchmarks/precision.py --model runs/demo/model --data runs/heldout \
        --json benchmarks/results/precision.json

For each of fp32, bf16 and int8 (``coca.load(..., dtype=)``) on the held-out synthetic scenes
(with ``--compile`` also through ``generate(compile=True)``: agreement and tokens/s):
the share of greedy captions identical to fp32's, CIDEr (greedy, PTB-tokenised, pycocoevalcap) and
contrastive zero-shot top-1 with their differences from fp32, and greedy tokens/s at batch 4 and 32
(exactly ``--new-tokens`` per image, EOS masked until then; images encoded inside the timing;
median of interleaved repetitions). Agreement is only meaningful on trained weights, so the
matched 103M model (random weights) is timed in benchmarks/generation.py but not compared here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402

DTYPES = ("fp32", "bf16", "int8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a trained model directory (e.g. runs/demo/model)")
    p.add_argument("--data", required=True, help="`coca synthetic --out` directory (held-out scenes)")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action="store_true",
                   help="also each precision through generate(compile=True): agreement and tokens/s")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import coca
    from coca.config import EvalConfig
    from coca.evaluate.captioning import generate_captions
    from coca.loading import to_model
    from coca.evaluate.tasks import Evaluation

    data = args.data
    caption_eval = Evaluation(EvalConfig(task="caption", images=f"{data}/captions", annotations=f"{data}/captions.json",
                                         strategy="greedy", workers=0, spice=False))
    zeroshot_eval = Evaluation(EvalConfig(task="zeroshot", images=f"{data}/classify", classnames=f"{data}/classnames.txt",
                                          templates=f"{data}/templates.txt", workers=0))
    paths = [os.path.join(data, "captions", it["file_name"]) for it in caption_eval.items]
    models = {d: coca.load(args.model, dtype=d) for d in DTYPES}
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for d, model in models.items():
        captions = generate_captions(model, model.tokenizer, paths, batch_size=32, strategy="greedy", max_new_tokens=30)
        cap = caption_eval.run(model, model.tokenizer).metrics
        zs = zeroshot_eval.run(model, model.tokenizer).metrics
        results[d] = {"captions": captions, "CIDEr": cap["CIDEr"], "zeroshot_top1": zs["top1"]}
        print(f"{d}: CIDEr {cap['CIDEr']:.3f}, zero-shot top-1 {zs['top1']:.4f}", flush=True)
        if args.compile:
            results[d]["compiled_captions"] = generate_captions(model, model.tokenizer, paths, batch_size=32,
                                                                strategy="greedy", max_new_tokens=30, compile=True)

    from coca.data import eval_transform, load_image
    transform = eval_transform(models["fp32"].cfg.vision.image_size)
    pool = torch.stack([transform(load_image(pth)) for pth in paths[:32]])
    n = args.new_tokens
    times = {(d, b, c): [] for d in DTYPES for b in (4, 32) for c in ((False, True) if args.compile else (False,))}
    from coca.compiled_decoding import CompiledDecoder
    steps = {d: CompiledDecoder(model) for d, model in models.items()}  # one per model, kept for every call
    with torch.no_grad():
        def gen(d, b, c):
            model = models[d]
            return model.generate(to_model(model, pool[:b]), strategy="greedy", max_new_tokens=n, min_new_tokens=n,
                                  compiled=steps[d] if c else None)
        for key in times:
            gen(*key)  # warm-up
        keys = list(times)
        for r in range(args.reps):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[key].append(matched.timed(lambda: gen(*key)))

    ref = results["fp32"]
    rows, out = [], {"dtypes": {}}
    for d in DTYPES:
        res = results[d]
        same = sum(res["captions"][i] == ref["captions"][i] for i in ref["captions"]) / len(ref["captions"])
        tps = {b: b * n / matched.median(times[d, b, False]) for b in (4, 32)}
        out["dtypes"][d] = {"identical_greedy_captions": same, "CIDEr": res["CIDEr"],
                            "CIDEr_minus_fp32": res["CIDEr"] - ref["CIDEr"], "zeroshot_top1": res["zeroshot_top1"],
                            "zeroshot_minus_fp32": res["zeroshot_top1"] - ref["zeroshot_top1"],
                            "tokens_per_s": tps, "times_s": {str(b): times[d, b, False] for b in (4, 32)}}
        if args.compile:
            comp = res["compiled_captions"]
            out.setdefault("compiled", {})[d] = {
                "identical_greedy_captions": sum(comp[i] == ref["captions"][i] for i in comp) / len(comp),
                "identical_to_eager_same_dtype": sum(comp[i] == res["captions"][i] for i in comp) / len(comp),
                "tokens_per_s": {b: b * n / matched.median(times[d, b, True]) for b in (4, 32)},
                "times_s": {str(b): times[d, b, True] for b in (4, 32)}}
            c = out["compiled"][d]
            print(f"{d} compiled: greedy captions = fp32 {c['identical_greedy_captions']:.1%}, = {d} eager "
                  f"{c['identical_to_eager_same_dtype']:.1%}, tokens/s {c['tokens_per_s'][4]:.0f} / "
                  f"{c['tokens_per_s'][32]:.0f}")
        rows.append([d, f"{same:.1%}", f"{res['CIDEr']:.3f} ({res['CIDEr'] - ref['CIDEr']:+.3f})",
                     f"{res['zeroshot_top1']:.4f} ({res['zeroshot_top1'] - ref['zeroshot_top1']:+.4f})",
                     f"{tps[4]:.0f}", f"{tps[32]:.0f}"])
    print()
    print(matched.markdown_table(["dtype", "greedy captions = fp32", "CIDEr (vs fp32)", "zero-shot top-1 (vs fp32)",
                                  f"tokens/s batch 4 ({n} tokens)", "tokens/s batch 32"], rows))
    print(f"\n{len(ref['captions'])} held-out captioned scenes, {int(zs['n_images'])} zero-shot scenes; "
          f"{args.threads} threads; {time.perf_counter() - t0:.0f}s")
    matched.write_json(args.json, {"benchmark": "precision", "args": vars(args), "env": matched.env_info(args.threads),
                                   **out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
