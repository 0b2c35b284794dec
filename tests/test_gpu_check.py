"""benchmarks/gpu_check.py --smoke: the GPU check's code paths on the CPU, so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["matmul_bf16_tflops"] > 0
    rows = {(t["row"], t.get("checkpointing")): t for t in r["train"]}
    ours, ours_ckpt = rows[("ours coca-tiny", False)], rows[("ours coca-tiny", True)]
    assert ours["batch"] >= 2 and ours["samples_per_s"] > 0 and 0 < ours["mfu_measured_peak"]
    assert ours["plan_activation_and_grad_gib"] > ours_ckpt["plan_activation_and_grad_gib"] > 0
    oc = next(t for t in r["train"] if t["row"].startswith("open_clip"))
    assert oc["batch"] == ours["batch"] and oc["ours_over_open_clip"] > 0
    cost = {c["method"]: c for c in r["sample_cost"]}
    assert list(cost) == ["padded", "packed", "packed + patch dropout 0.5", "open_clip"]
    assert all(c["batch"] == ours["batch"] and c["samples_per_s"] > 0 and c["speedup_vs_open_clip"] > 0
               for c in cost.values())
    assert cost["padded"]["flops_per_sample"] > cost["packed"]["flops_per_sample"] \
        > cost["packed + patch dropout 0.5"]["flops_per_sample"] > 0
    check = r["packed_attention"]
    assert not check["gradients_checked"]  # the CPU has no FlexAttention backward
    assert check["caption_loss_rel_diff"] < 1e-5 and check["contrastive_loss_rel_diff"] < 1e-5
    assert [g["batch"] for g in r["generation"]] == [1, 32]
    assert all(g["ours_tokens_per_s"] > 0 and g["open_clip_tokens_per_s"] > 0 for g in r["generation"])
    assert [x["engine"] for x in r["resume"]] == ["ddp", "deepspeed"]
    assert all(x["resumed"] and x["max_rel_loss_diff"] == 0.0 for x in r["resume"])  # CPU, fp32: bitwise
    assert "| check | result | detail |" in done.stdout
