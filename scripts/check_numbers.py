"""Numbers quoted in README.md and BENCHMARKS.md, checked against the benchmark results they come
from (``benchmarks/results/*.json``).

Each claim is a piece of a document with ``{}`` where numbers stand, the results file, and how
those numbers are written from the file. The check formats the numbers from the file and looks
for the text in the document (whitespace collapsed, so line breaks do not matter). A number
edited by hand, or a benchmark rerun without its documents, fails the check. It covers the claims
listed here, not yet every number in the two documents.

    .venv/bin/python scripts/check_numbers.py      # also part of the tests
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pct_less(a: float, b: float) -> str:
    return f"{round(100 * (1 - a / b))}%"


def _range(values, digits: int = 1) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _gen(rows, method, batch=None):
    return next(x for x in rows["results"] if x["method"] == method and (batch is None or x["batch"] == batch))


# (document, text, results file, values(results) -> tuple of strings for the {} in text)
CLAIMS = [
    # data preparation
    ("README.md", "duplicate **recall {} and precision {}**, evaluation overlap **recall {} and precision {}**",
     "prepare.json", lambda r: (f"{r['recall']:.4f}", f"{r['precision']:.4f}", f"{r['eval_overlap_recall']:.1f}",
                                f"{r['eval_overlap_precision']:.3f}")),
    ("README.md", "filter + hash **{} samples/s in one process** ({} with the 1,000-image evaluation set)",
     "prepare.json", lambda r: (f"{r['filter_hash_samples_per_s_one_process']:.0f}",
                                f"{r['filter_hash_decontaminate_samples_per_s_one_process']:.0f}")),
    ("README.md", "the whole job {} s on 2 local processes, {} s on Ray in local mode, with byte-identical shards",
     "prepare.json", lambda r: (str(r["whole_job_seconds_local"]), str(r["whole_job_seconds_ray"]))),
    ("README.md", "| partitions / LSH tables / components rounds | {} | {} |", "prepare.json",
     lambda r: tuple(f"{x['partitions']} / {x['lsh_tables']} / {x['cc_rounds']['image']}" for x in r["stage2_partitioned"])),
    ("README.md", "| wall time, 2 processes | {} s | {} s |", "prepare.json",
     lambda r: tuple(f"{x['seconds']:.0f}" for x in r["stage2_partitioned"])),
    ("README.md", "| peak RSS per worker process | {} GB | {} GB |", "prepare.json",
     lambda r: tuple(f"{x['peak_rss_mb_per_worker'] / 1000:.2f}" for x in r["stage2_partitioned"])),
    ("README.md", "| written between passes (the shuffle) | {} GB ({} KB per sample emitted) | {} GB ({} KB) |",
     "prepare.json", lambda r: tuple(v for x in r["stage2_partitioned"] for v in (
         f"{x['shuffle_bytes'] / 1e9:.1f}", f"{x['emit_bytes_per_sample'] / 1000:.1f}"))),
    ("README.md", "| single-process path, for comparison | {} s, {} GB | - |", "prepare.json",
     lambda r: (f"{r['stage2_single_process'][0]['seconds']:.0f}",
                f"{r['stage2_single_process'][0]['peak_rss_mb'] / 1000:.2f}")),
    ("BENCHMARKS.md", "| duplicate recall / precision | {} / {} |", "prepare.json",
     lambda r: (f"{r['recall']:.4f}", f"{r['precision']:.4f}")),
    ("BENCHMARKS.md", "| evaluation overlap recall / precision (the right evaluation file) | {} / {} |", "prepare.json",
     lambda r: (f"{r['eval_overlap_recall']:.4f}", f"{r['eval_overlap_precision']:.4f}")),
    ("BENCHMARKS.md", "| Ray output identical to local (shards and rejects.parquet, bytes) | {} |", "prepare.json",
     lambda r: (str(r["ray_identical_to_local"]).lower(),)),
    ("BENCHMARKS.md", "| peak RSS per worker process (max over passes) | {} GB | {} GB |", "prepare.json",
     lambda r: tuple(f"{x['peak_rss_mb_per_worker'] / 1000:.2f}" for x in r["stage2_partitioned"])),
    # decoding against Hugging Face's cached T5
    *[("BENCHMARKS.md", "| {} | {} | {} | {} | {} | **{}x** | **{}x** | {} |", "generation_hf.json",
       (lambda i: lambda r: (lambda x: (x["decoding"] + (" (4 beams)" if x["beams"] > 1 else ""), str(x["batch"]),
                                       f"{x['ours_tokens_per_s']:.1f}", f"{x['hf_dynamic_cache_tokens_per_s']:.1f}",
                                       f"{x['hf_static_cache_tokens_per_s']:.1f}",
                                       f"{x['ours_vs_hf_dynamic_cache']:.2f}", f"{x['ours_vs_hf_static_cache']:.2f}",
                                       f"{x['identical_rows_vs_hf']:.0%}"))(r["rows"][i]))(i)) for i in range(9)],
    ("README.md", "on the very same decoder weights: {}x its tokens/s with its dynamic or static cache at batch 1-8 "
                  "(greedy), {}x in beam search", "generation_hf.json",
     lambda r: (_range([x[k] for x in r["rows"] if x["decoding"] == "greedy" and x["batch"] <= 8
                        for k in ("ours_vs_hf_dynamic_cache", "ours_vs_hf_static_cache")]),
                _range([x[k] for x in r["rows"] if x["decoding"] == "beam"
                        for k in ("ours_vs_hf_dynamic_cache", "ours_vs_hf_static_cache")]))),
    # generation and training against open_clip
    ("README.md", "greedy, 40 new tokens: {}x the tokens/s of open_clip's `generate` at batch 1", "generation_b1.json",
     lambda r: (f"{_gen(r, 'greedy/ours (KV cache)')['speedup_vs_open_clip']:.1f}",)),
    ("README.md", "{}x at batch 8", "generation.json",
     lambda r: (f"{_gen(r, 'greedy/ours (KV cache)', 8)['speedup_vs_open_clip']:.1f}",)),
    ("README.md", "{}x at batch 32; beam search (4 beams, batch 2): {}x", "generation_b32.json",
     lambda r: (f"{_gen(r, 'greedy/ours (KV cache)')['speedup_vs_open_clip']:.0f}",
                f"{_gen(json.loads((ROOT / 'benchmarks/results/generation.json').read_text()), 'beam4/ours (KV cache)')['speedup_vs_open_clip']:.1f}")),
    ("README.md", "{}x the samples/s in fp32 and {}x with BF16 autocast, with {} less peak memory", "train_step.json",
     lambda r: (f"{r['results'][0]['speedup_vs_open_clip']:.1f}", f"{r['results'][2]['speedup_vs_open_clip']:.1f}",
                _pct_less(r["memory"]["ours"]["peak_delta_kb"], r["memory"]["open_clip"]["peak_delta_kb"]))),
    ("README.md", "trimming alone makes our step **{}x** faster with {} instead of {} GB peak memory", "trim.json",
     lambda r: (f"{r['rows'][0]['trimmed_speedup']:.2f}", f"{r['rows'][0]['trimmed_peak_rss_delta_mb'] / 1000:.1f}",
                f"{r['rows'][0]['untrimmed_peak_rss_delta_mb'] / 1000:.1f}")),
    ("BENCHMARKS.md", "| trimmed speed-up | **{}x** | |", "trim.json",
     lambda r: (f"{r['rows'][0]['trimmed_speedup']:.2f}",)),
    ("BENCHMARKS.md", "nearly the same FLOPs ({} vs {} GFLOP per step", "step_flops.json",
     lambda r: (f"{r['ours_gflop_with_cpu_attention']:.1f}", f"{r['open_clip_gflop_with_cpu_attention']:.1f}")),
    ("BENCHMARKS.md", "PyTorch's own counter skips: {} vs {} without them", "step_flops.json",
     lambda r: (f"{r['ours_gflop_plain']:.1f}", f"{r['open_clip_gflop_plain']:.1f}")),
    # the fault suite
    ("README.md", "| **total** | {} | {} | {} | {} | {} | {} |", "faults.json",
     lambda r: tuple(str(r["total"][k]) for k in ("inputs", "hangs", "crashes", "wrong", "unaccounted", "lost"))),
    ("README.md", "The whole suite took {} s", "faults.json", lambda r: (f"{r['seconds']:.0f}",)),
]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def check(root: Path = ROOT) -> list[str]:
    """The claims whose text, with the numbers from their results file, is not in their document."""
    docs = {name: _normalise((root / name).read_text()) for name in ("README.md", "BENCHMARKS.md")}
    problems = []
    for doc, text, results, values in CLAIMS:
        data = json.loads((root / "benchmarks" / "results" / results).read_text())
        expected = _normalise(text.format(*values(data)))
        if expected not in docs[doc]:
            problems.append(f"{doc}: expected {expected!r} (from benchmarks/results/{results})")
    return problems


if __name__ == "__main__":
    found = check()
    print("\n".join(found) or f"{len(CLAIMS)} claims match their results files")
    sys.exit(1 if found else 0)
