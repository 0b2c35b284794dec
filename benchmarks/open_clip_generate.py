"""Caption generation on the same open_clip ``coca_ViT-B-32`` weights: open_clip's own ``generate``
against ours (converted with ``coca.convert.from_open_clip_coca``), greedy and beam, at batch 1, 4
and 32, tokens checked identical.

    .venv/bin/python benchmarks/open_clip_generate.py --json benchmarks/results/open_clip_generate.json

The weights are random at the published shapes (nothing is downloaded); with random weights no
caption ends early, so every row decodes the full 29 tokens in both, the same work per call. The
settings are open_clip's defaults: greedy is its ``generation_type="top_k", top_k=1`` (min length
5, 30 positions with the start token), beam its ``beam_search`` with 6 beams in 3 groups, which is
``strategy="open_clip_beam", num_beams=2`` here. Ours runs eager with the KV cache (and, with
``--compiled``, also through the compiled step). Interleaved repetitions, median seconds per call;
tokens/s counts generated tokens (rows x new tokens) per second of the whole call, image encoding
included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402


def build(seed: int = 0):
    import open_clip
    from open_clip.coca_model import CoCa

    from coca.convert import from_open_clip_coca
    cfg = open_clip.get_model_config("coca_ViT-B-32")
    torch.manual_seed(seed)
    theirs = CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"]).eval()
    torch.nn.init.normal_(theirs.text_decoder.text_projection, std=theirs.text_decoder.width ** -0.5)
    return theirs, from_open_clip_coca(theirs.state_dict(), "coca_ViT-B-32")


def calls(theirs, ours, images, mode: str, compiled=None):
    """(open_clip call, our call) for one decoding mode."""
    if mode == "greedy":
        def oc():
            return theirs.generate(images, generation_type="top_k", top_k=1, seq_len=30, min_seq_len=5)[:, 1:]

        def us():
            return ours.generate(images, max_new_tokens=29, min_new_tokens=4, compiled=compiled)
    else:
        def oc():
            return theirs.generate(images, generation_type="beam_search", seq_len=30, num_beams=6, num_beam_groups=3)[:, 1:]

        def us():
            return ours.generate(images, strategy="open_clip_beam", num_beams=2, max_new_tokens=29, min_new_tokens=4,
                                 compiled=compiled)
    return oc, us


def until_end(rows):
    return [r[:r.index(49407) + 1] if 49407 in r else r for r in rows.tolist()]


def same_tokens(a, b, mode: str) -> bool:
    """open_clip writes <end_of_text> in the last greedy slot at the limit; ours stops there."""
    a, b = until_end(a), until_end(b)
    if mode == "greedy":
        return all(x == y or (x[-1] == 49407 and len(x) == 29 and x[:28] == y[:28]) for x, y in zip(a, b))
    return a == b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument("--modes", nargs="+", default=["greedy", "beam"], choices=["greedy", "beam"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--reps-large", type=int, default=1, help="repetitions at batch >= 16 (open_clip takes minutes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compiled", action="store_true",
                   help="also ours through the compiled decoding step (a CompiledDecoder kept across calls; "
                        "its compiles happen in the warm-up call)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    theirs, ours = build()
    compiled = None
    if args.compiled:
        from coca.compiled_decoding import CompiledDecoder
        compiled = CompiledDecoder(ours)
    rows = []
    with torch.no_grad():
        for mode in args.modes:
            for batch in args.batches:
                images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
                oc, us = calls(theirs, ours, images, mode)
                reference, mine = oc(), us()  # also the warm-up
                identical = same_tokens(reference, mine, mode)
                runs = [("open_clip", oc), ("ours", us)]
                if compiled is not None:
                    us_compiled = calls(theirs, ours, images, mode, compiled)[1]
                    identical = identical and same_tokens(reference, us_compiled(), mode)
                    runs.append(("ours_compiled", us_compiled))
                times = {name: [] for name, _ in runs}
                for _ in range(args.reps if batch < 16 else args.reps_large):
                    for name, fn in runs:
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                new_tokens = batch * 29
                row = {"mode": mode, "batch": batch, "tokens_identical": identical, "new_tokens": new_tokens,
                       **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                       **{f"{k}_tokens_per_s": new_tokens / statistics.median(v) for k, v in times.items()}}
                row["speedup"] = row["open_clip_s"] / row["ours_s"]
                if compiled is not None:
                    row["compiled_speedup"] = row["open_clip_s"] / row["ours_compiled_s"]
                rows.append(row)
                print(row, flush=True)
    table = matched.markdown_table(
        ["decoding", "batch", "open_clip tokens/s", "ours tokens/s", "ours / open_clip", "tokens identical"],
        [[r["mode"], r["batch"], f"{r['open_clip_tokens_per_s']:.1f}", f"{r['ours_tokens_per_s']:.1f}",
          f"**{r['speedup']:.1f}x**", "yes" if r["tokens_identical"] else "NO"] for r in rows])
    print(table)
    matched.write_json(args.json, {**matched.env_info(args.threads), "rows": rows})
    return 0 if all(r["tokens_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
