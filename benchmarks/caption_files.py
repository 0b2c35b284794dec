"""`coca caption` over a folder of images, end to end, against a plain loop of open_clip `generate`.

Run (from the repository root, after `make demo` or `coca demo --out runs/demo`; ~2 minutes):

    .venv/bin/python benchmarks/caption_files.py --model runs/demo/model --json benchmarks/results/caption_files.json

Writes ``--images`` held-out synthetic scenes (PNG, 64 px) to a temporary folder, then times, in
alternation, ``--reps`` times each (median reported):

* ours: ``coca.caption_files.caption_files`` — what ``coca caption DIR --out F.jsonl`` runs after
  loading the model: image decoding in ``--workers`` processes, batched greedy generation with the
  KV cache, JSON lines appended and fsynced per batch. Once stopping at EOS (real use), once with
  exactly ``--new-tokens`` per image (EOS masked) to match the open_clip loop token for token.
* open_clip: the loop a user would write: for each batch of paths, PIL open + open_clip's own
  preprocessing, ``model.generate(images, generation_type="top_k", top_k=1, seq_len=N + 1,
  min_seq_len=N)`` (exactly N new tokens), write one JSON line per image. Its model is open_clip's
  CoCa at the demo model's shapes with random weights (only speed is compared).

Images/s = images / wall seconds of the whole pass (model loading excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402

OC_SOT, OC_EOS, OC_PAD = 2, 1, -1


def open_clip_at(cfg) -> torch.nn.Module:
    v, t = cfg.vision, cfg.text
    size = matched.Size(image_size=v.image_size, patch_size=v.patch_size, vision_width=v.width, vision_layers=v.layers,
                        vision_heads=v.heads, text_width=t.d_model, text_heads=t.num_heads,
                        encoder_layers=t.encoder_layers, decoder_layers=t.decoder_layers, d_ff=t.d_ff,
                        vocab=t.vocab_size, n_queries=cfg.n_gen_queries, embed_dim=t.d_model)
    return matched.build_open_clip(size)[0].eval()


def open_clip_loop(oc, preprocess, paths: list[str], out: Path, batch: int, n: int) -> None:
    from PIL import Image
    with open(out, "w") as f, torch.no_grad():
        for i in range(0, len(paths), batch):
            chunk = paths[i:i + batch]
            images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in chunk])
            ids = oc.generate(images, generation_type="top_k", top_k=1, seq_len=n + 1, min_seq_len=n,
                              sot_token_id=OC_SOT, eos_token_id=OC_EOS, pad_token_id=OC_PAD)
            f.write("".join(json.dumps({"path": p, "tokens": row[1:].tolist()}) + "\n" for p, row in zip(chunk, ids)))
            f.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import open_clip

    import coca
    from coca.caption_files import caption_files, collect_image_paths
    from coca.evaluate.synthetic import write_eval_sets

    model = coca.load(args.model)
    oc = open_clip_at(model.cfg)
    preprocess = open_clip.image_transform(model.cfg.vision.image_size, is_train=False)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_eval_sets(tmp / "data", n_classify=18, n_caption=args.images)
        paths = collect_image_paths([str(tmp / "data" / "captions")])
        assert len(paths) == args.images

        def ours(fixed: bool):
            out = tmp / "ours.jsonl"
            out.unlink(missing_ok=True)
            kw = dict(min_new_tokens=n, max_new_tokens=n) if fixed else dict(max_new_tokens=30)
            run = caption_files(model, paths, out, batch_size=args.batch, workers=args.workers, strategy="greedy", **kw)
            assert run.captioned == len(paths), run

        methods = {"ours (coca caption, stop at EOS)": lambda: ours(False),
                   f"ours (coca caption, exactly {n} tokens)": lambda: ours(True),
                   f"open_clip generate loop (exactly {n} tokens)":
                       lambda: open_clip_loop(oc, preprocess, paths, tmp / "oc.jsonl", args.batch, n)}
        names = list(methods)
        times = {k: [] for k in names}
        t0 = time.perf_counter()
        for r in range(args.reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(matched.timed(methods[name]))
            print(f"rep {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.1f}s" for k in names), flush=True)
    ref = matched.median(times[names[2]])
    rows, results = [], []
    for name in names:
        med = matched.median(times[name])
        results.append({"method": name, "median_s": med, "times_s": times[name], "images_per_s": args.images / med})
        rows.append([name, f"{med:.1f}", f"{args.images / med:.0f}", f"{ref / med:.2f}x"])
    print()
    print(matched.markdown_table(["method", "median s", "images/s", "vs open_clip loop"], rows))
    print(f"\n{args.images} images, batch {args.batch}, {args.workers} decoding workers (ours), {args.threads} threads, "
          f"median of {args.reps}; {time.perf_counter() - t0:.0f}s")
    matched.write_json(args.json, {"benchmark": "caption_files", "args": vars(args),
                                   "env": matched.env_info(args.threads), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
