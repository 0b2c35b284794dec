"""Decoding speed against the cached peer: our ``coca.generation.decode`` vs Hugging Face
``T5ForConditionalGeneration.generate(use_cache=True)`` on the very same decoder weights.

Run (from the repository root; about 12 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/generation_hf.py --reps 9 --json benchmarks/results/generation_hf.json

open_clip's CoCa ``generate`` has no KV cache (``benchmarks/generation.py``), so most of our lead
over it is the cache. This is the peer that has one. An HF T5 at the matched decoder size (512
wide, 8 heads of 64, gated-GELU FFN of 2,048, 6 decoder layers, vocabulary 32,000; its encoder is
one layer and never runs) is randomly initialised, and our decoder is converted from it
(``coca.convert.from_hf_t5``), so both run the same weights. Both decode from the same visual
tokens ([B, 256, 512], given to HF as the encoder output), fp32, ``torch.no_grad``, 2 threads,
exactly ``--new-tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``), greedy and beam
search (4 beams; HF ``early_stopping=False``). HF rows: its default dynamic cache, and its static
cache (``cache_implementation="static"``) when this transformers version supports it for T5. Ours
twice: eager, and ``compile=True`` (the compiled fixed-shape step; its compile happens in the
untimed warm-up and is reported as ``ours_compiled_first_call_s``). HF runs eagerly, as its
``generate`` does by default.

Throughput = batch * new tokens / seconds. Each repetition runs every method back to back in a
rotated order; the table shows medians; one untimed warm-up of each comes first. The greedy
tokens of both are compared (share of identical rows): random weights give flat logits, so a
difference in the last float bit can flip an argmax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def build(seed: int, vocab: int, width: int, layers: int, d_ff: int):
    import transformers

    from coca.convert import from_hf_t5
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=vocab, d_model=width, d_kv=64, num_heads=width // 64, d_ff=d_ff,
                                num_layers=1, num_decoder_layers=layers, relative_attention_num_buckets=32,
                                relative_attention_max_distance=128, dropout_rate=0.0,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    _, decoder = from_hf_t5(hf)
    from types import SimpleNamespace
    return hf, SimpleNamespace(cfg=SimpleNamespace(text=decoder.cfg), text_decoder=decoder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2,4,8,32")
    p.add_argument("--beam-batches", default="1,2,4,8")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers.modeling_outputs import BaseModelOutput

    from coca.compiled_decoding import CompiledDecoder
    from coca.generation import decode

    hf, ours = build(0, 32000, 512, 6, 2048)
    compiled = CompiledDecoder(ours)  # one for every call: each shape bucket compiles once
    n = args.new_tokens

    def hf_call(visual, beams, static):
        extra = {"cache_implementation": "static"} if static else {}
        return lambda: hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=visual),
                                   decoder_input_ids=torch.zeros(visual.shape[0], 1, dtype=torch.long),
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=beams,
                                   early_stopping=False, use_cache=True, **extra)[:, 1:]

    def ours_call(visual, beams, compile=False):
        strategy = "greedy" if beams == 1 else "beam"
        return lambda: decode(ours, visual, max_new_tokens=n, min_new_tokens=n, strategy=strategy, num_beams=beams,
                              compiled=compiled if compile else None)

    static_ok = True
    try:
        with torch.no_grad():
            hf_call(torch.randn(1, args.queries, 512), 1, True)()
    except Exception as e:  # noqa: BLE001 - reported
        static_ok = False
        print(f"HF static cache not available for T5 here: {type(e).__name__}: {e}")

    rows = []
    g = torch.Generator().manual_seed(1)
    cases = [("greedy", b, 1) for b in map(int, args.batches.split(","))] + \
            [("beam", b, 4) for b in map(int, args.beam_batches.split(","))]
    with torch.no_grad():
        for kind, batch, beams in cases:
            visual = torch.randn(batch, args.queries, 512, generator=g)
            methods = {"ours": ours_call(visual, beams), "ours_compiled": ours_call(visual, beams, compile=True),
                       "hf_dynamic_cache": hf_call(visual, beams, False)}
            if static_ok:
                methods["hf_static_cache"] = hf_call(visual, beams, True)
            outputs, first_call_s = {}, {}
            for name, fn in methods.items():  # warm-up (ours_compiled: the compile), and the tokens compared
                t0 = time.perf_counter()
                outputs[name] = fn()
                first_call_s[name] = round(time.perf_counter() - t0, 2)
            for name, out in outputs.items():
                assert out.shape == (batch, n), (name, out.shape)
            times = {name: [] for name in methods}
            names = list(methods)
            for r in range(args.reps):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    methods[name]()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"decoding": kind, "batch": batch, "beams": beams,
                   **{f"{name}_tokens_per_s": round(batch * n / s, 1) for name, s in med.items()},
                   **{f"ours_vs_{name}": round(med[name] / med["ours"], 2) for name in names if name != "ours"},
                   **{f"ours_compiled_vs_{name}": round(med[name] / med["ours_compiled"], 2)
                      for name in names if name.startswith("hf")},
                   "ours_compiled_first_call_s": first_call_s["ours_compiled"],
                   **{f"identical_rows_vs_hf{suffix}": round(float((outputs[name] == outputs["hf_dynamic_cache"]).all(1)
                                                                   .float().mean()), 3)
                      for name, suffix in (("ours", ""), ("ours_compiled", "_compiled"))}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "generation_hf", "new_tokens": n, "queries": args.queries, "reps": args.reps,
              "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
              "hf_static_cache": static_ok, "loadavg": os.getloadavg(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
