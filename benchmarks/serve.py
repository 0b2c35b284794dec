"""`coca serve` under concurrent caption requests: dynamic batching against unbatched serving.

Run (from the repository root; ~6 minutes on 2 cores; the demo model needs `make demo` first):

    .venv/bin/python benchmarks/serve.py --json benchmarks/results/serve.json
    .venv/bin/python benchmarks/serve.py --model runs/demo/model --json benchmarks/results/serve_demo.json

Without ``--model`` the matched 103M model (``benchmarks/matched.py``, random weights, a small
SentencePiece tokenizer) is saved to a temporary directory. For each server setting (``--max-batch
16 --max-wait-ms 30`` and ``--max-batch 1``) a `coca serve` process is started on loopback, and for
1, 4, 16 and 32 concurrent clients each client posts greedy caption requests (exactly
``--new-tokens`` tokens, EOS masked, so every request costs the same) back to back: at most
``--requests`` per client and ``--seconds`` per setting, after one warm-up request per client.
Reported: captions/s over the whole run, p50 and p99 latency per request, and the mean batch size
read from the server's /metrics.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matched  # noqa: E402


def start(model_dir: str, max_batch: int, wait_ms: float, threads: int):
    from coca.serve.process import spawn_server
    return spawn_server(model_dir, "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms),
                        env={"OMP_NUM_THREADS": str(threads)}, timeout=120, quiet=True)


def metric(text: str, name: str) -> float:
    return float(next((ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)), "0"))


def load(url: str, image: bytes, clients: int, per_client: int, seconds: float, new_tokens: int) -> dict:
    import httpx
    data = {"strategy": "greedy", "max_new_tokens": str(new_tokens), "min_new_tokens": str(new_tokens)}
    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    stop_at = [float("inf")]  # set when the clients are released

    def client():
        with httpx.Client(timeout=300) as c:
            c.post(url + "/v1/caption", files={"image": image}, data=data)  # warm-up
            barrier.wait()
            for _ in range(per_client):
                if time.perf_counter() > stop_at[0]:
                    break
                t = time.perf_counter()
                r = c.post(url + "/v1/caption", files={"image": image}, data=data)
                with lock:
                    (latencies if r.status_code == 200 else errors).append(time.perf_counter() - t)

    barrier = threading.Barrier(clients + 1)
    workers = [threading.Thread(target=client) for _ in range(clients)]
    for w in workers:
        w.start()
    before = httpx.get(url + "/metrics").text
    barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/metrics").text
    calls = metric(after, "coca_batch_size_count") - metric(before, "coca_batch_size_count")
    reqs = metric(after, "coca_batch_size_sum") - metric(before, "coca_batch_size_sum")
    lat = sorted(latencies)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "seconds": wall,
            "captions_per_s": len(lat) / wall, "p50_s": pick(0.5), "p99_s": pick(0.99),
            "mean_batch": reqs / calls if calls else float("nan")}


def matched_model_dir(tmp: Path) -> str:
    import coca
    size = matched.Size()
    model, _ = matched.build_ours(size)
    captions = [f"a {a} {c} {s} next to a {b} {t}" for a in ("small", "large", "tiny") for b in ("red", "blue")
                for c in ("red", "green", "blue") for s in ("circle", "square") for t in ("star", "cube")]
    (tmp / "captions.txt").write_text("\n".join(captions * 20))
    tok = coca.Tokenizer.train(tmp / "captions.txt", vocab_size=100, out_dir=tmp / "tok")
    return str(model.save_pretrained(tmp / "model", tokenizer=tok))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory (default: the matched 103M model, random weights)")
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=24, help="requests per client at most")
    p.add_argument("--seconds", type=float, default=40.0, help="time limit per setting")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    import io

    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model or matched_model_dir(tmp)
        import coca
        size = coca.load(model_dir).cfg.vision.image_size
        buf = io.BytesIO()
        Image.fromarray((torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
        image = buf.getvalue()
        results = []
        for max_batch, wait in ((args.max_batch, args.max_wait_ms), (1, 0.0)):
            proc, url = start(model_dir, max_batch, wait, args.threads)
            try:
                for n in clients:
                    per_client = max(2, args.requests * 4 // max(n, 4))
                    r = load(url, image, n, per_client, args.seconds, args.new_tokens)
                    r["max_batch"] = max_batch
                    results.append(r)
                    print(f"max-batch {max_batch:>2}, {n:>2} clients: {r['captions_per_s']:.2f} captions/s, "
                          f"p50 {r['p50_s']:.2f}s, p99 {r['p99_s']:.2f}s, mean batch {r['mean_batch']:.1f}, "
                          f"{r['requests']} requests, {r['errors']} errors", flush=True)
            finally:
                proc.kill()
                proc.wait()
    by = {(r["max_batch"], r["clients"]): r for r in results}
    rows = []
    for n in clients:
        b, u = by[args.max_batch, n], by[1, n]
        rows.append([n, f"{b['captions_per_s']:.2f}", f"{b['p50_s']:.2f} / {b['p99_s']:.2f}", f"{b['mean_batch']:.1f}",
                     f"{u['captions_per_s']:.2f}", f"{u['p50_s']:.2f} / {u['p99_s']:.2f}",
                     f"{b['captions_per_s'] / u['captions_per_s']:.2f}x"])
    print()
    print(matched.markdown_table(["clients", f"batched (max {args.max_batch}) captions/s", "p50 / p99 s", "mean batch",
                                  "unbatched captions/s", "p50 / p99 s", "batched / unbatched"], rows))
    matched.write_json(args.json, {"benchmark": "serve", "args": vars(args), "env": matched.env_info(args.threads),
                                   "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
