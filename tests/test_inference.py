"""Inference for users: captioning collections into resumable JSON lines (folders, globs, path
lists; unreadable files counted; SIGKILL + rerun loses and duplicates nothing) and reduced precision
(bf16, int8 dynamic quantisation; refused where it cannot run)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import coca
from coca.caption_files import collect_image_paths, read_done
from coca.cli import main
from coca.errors import UserError
from coca.precision import Int8Linear, apply_precision


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A nested folder of PNG/JPEG images (one unreadable, one non-image file)."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        sub = root / ("a" if i < 12 else "b/deeper")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "a" / "notes.md").write_text("not an image")
    return root


def test_inputs_folder_glob_and_list_file(collection, tmp_path):
    from_folder = collect_image_paths([str(collection)])
    assert len(from_folder) == 25 and all(not p.endswith(".md") for p in from_folder)  # 24 + broken.png
    assert collect_image_paths([str(collection / "b" / "**" / "*.png")]) == [p for p in from_folder
                                                                              if "/b/" in p and p.endswith(".png")]
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\n" + "\n".join(from_folder[:5]) + "\n\n" + from_folder[0] + "\n")
    assert collect_image_paths([str(listing), from_folder[6]]) == from_folder[:5] + [from_folder[6]]
    with pytest.raises(UserError, match="nope.png"):
        collect_image_paths([str(tmp_path / "nope.png")])
    with pytest.raises(UserError, match="matches no images"):
        collect_image_paths([str(tmp_path / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="contains no images"):
        collect_image_paths([str(tmp_path / "empty")])


def test_caption_folder_to_json_lines(capsys, trained, collection, tmp_path, monkeypatch):
    out = tmp_path / "caps.jsonl"
    code, _, err = run(capsys, "caption", collection, "--model", trained["model"], "--out", out, "--strategy",
                       "greedy", "--score", "--batch-size", 5, "--workers", 0, "--max-new-tokens", 8)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 24 and "skipped unreadable images: {'decode_error': 1}" in err
    assert {r["path"] for r in records} == {p for p in collect_image_paths([str(collection)]) if "broken" not in p}
    # each line is what generate gives for that image, and its score the caption's mean log-probability
    model = coca.load(trained["model"])
    from coca.data import eval_transform, load_image
    first = eval_transform(model.cfg.vision.image_size)(load_image(records[0]["path"]))[None]
    result = model.generate(first, strategy="greedy", max_new_tokens=8, return_dict=True)
    assert records[0]["caption"] == model.tokenizer.decode(result.tokens)[0]
    assert records[0]["score"] == pytest.approx(float(result.normalized_scores[0]), abs=1e-4)
    assert records[0]["score"] < 0
    # --compile: the same lines (batches of 5 run padded to 8, the last one of 4 as it is)
    from coca.compiled_decoding import CompiledDecoder
    compiled_calls = []
    real_step = CompiledDecoder.step
    monkeypatch.setattr(CompiledDecoder, "step", lambda self: compiled_calls.append(self) or real_step(self))
    code, _, err = run(capsys, "caption", collection, "--model", trained["model"], "--out", tmp_path / "c.jsonl",
                       "--strategy", "greedy", "--score", "--batch-size", 5, "--workers", 0, "--max-new-tokens", 8,
                       "--compile")
    assert code == 0, err
    compiled = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(r["path"], r["caption"]) for r in compiled] == [(r["path"], r["caption"]) for r in records]
    assert [r["score"] for r in compiled] == pytest.approx([r["score"] for r in records], abs=1e-4)
    assert len(compiled_calls) == 5  # every batch went through the compiled step
    assert len(set(compiled_calls)) == 1 and compiled_calls[0].compiles == 1  # the run's one compiled decoder
    # several captions per image, and a prefix
    code, _, err = run(capsys, "caption", collection / "a", "--model", trained["model"], "--out", tmp_path / "n.jsonl",
                       "--strategy", "sample", "--num-return-sequences", 3, "--seed", 0, "--prefix", "a large",
                       "--workers", 0, "--max-new-tokens", 6, "--score")
    assert code == 0, err
    record = json.loads((tmp_path / "n.jsonl").read_text().splitlines()[0])
    assert len(record["captions"]) == 3 and len(record["scores"]) == 3
    assert all(c.startswith("a large") for c in record["captions"])


def test_caption_bad_options_fail_before_work(capsys, trained, collection, tmp_path):
    common = [collection, "--model", trained["model"], "--workers", 0]
    code, _, err = run(capsys, "caption", *common, "--strategy", "beam", "--num-beams", 2, "--num-return-sequences", 3)
    assert code == 2 and "num_return_sequences (3) must be <= num_beams (2)" in err
    code, _, err = run(capsys, "caption", *common, "--repetition-penalty", 0)
    assert code == 2 and "repetition_penalty must be > 0" in err
    code, _, err = run(capsys, "caption", *common, "--prefix", "a " * 200)
    assert code == 2 and "prefix has" in err and "context length" in err
    code, _, err = run(capsys, "caption", *common, "--out", tmp_path)
    assert code == 2 and "is a directory" in err
    bad = tmp_path / "other.jsonl"
    bad.write_text("hello\n{\"path\": \"x\", \"caption\": \"y\"}\n")
    code, _, err = run(capsys, "caption", *common, "--out", bad)
    assert code == 2 and "line 1 is not a caption record" in err
    (tmp_path / "only_broken").mkdir()
    (tmp_path / "only_broken" / "x.png").write_bytes(b"")
    code, _, err = run(capsys, "caption", tmp_path / "only_broken", "--model", trained["model"], "--workers", 0)
    assert code == 2 and "none of the 1 images could be read" in err


def test_torn_last_line_is_cut_and_the_rest_kept(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text('{"path": "a", "caption": "x"}\n{"path": "b", "caption": "y"}\n{"path": "c", "capt')
    assert read_done(out) == {"a", "b"}
    assert out.read_text() == '{"path": "a", "caption": "x"}\n{"path": "b", "caption": "y"}\n'
    # a complete line that is not a record: not ours, refused and left as it is (a one-line path
    # list given as --out by mistake must not be emptied)
    for text in ('{"path": "a", "caption": "x"}\n{"path": "c", "capt\n', "img1.jpg\n", '{"a": 1}\n'):
        out.write_text(text)
        with pytest.raises(UserError, match="not a caption record"):
            read_done(out)
        assert out.read_text() == text


def test_sigkill_then_rerun_loses_and_duplicates_nothing(trained, collection, tmp_path):
    """Kill `coca caption --out` with SIGKILL while it writes, rerun it: every readable image has
    exactly one line, and the lines equal an uninterrupted run's."""
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "coca.cli", "caption", str(collection), "--model", trained["model"], "--out",
           str(out), "--strategy", "greedy", "--batch-size", 1, "--workers", 0, "--max-new-tokens", 30,
           "--min-new-tokens", 30]
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed: give it more work"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < 24
    with open(out, "a") as f:  # as if the kill had cut a write short
        f.write('{"path": "' + str(collection / "a" / "img00.jpg")[:10])
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    clean = tmp_path / "clean.jsonl"
    assert subprocess.run([c if c != str(out) else str(clean) for c in cmd], env=env, capture_output=True).returncode == 0
    expected = [json.loads(line) for line in clean.read_text().splitlines()]
    assert len(resumed) == 24 and len({r["path"] for r in resumed}) == 24
    assert sorted(resumed, key=lambda r: r["path"]) == sorted(expected, key=lambda r: r["path"])


@torch.no_grad()
def test_reduced_precision_loads_and_decodes(trained):
    fp32 = coca.load(trained["model"])
    int8 = coca.load(trained["model"], dtype="int8")
    bf16 = coca.load(trained["model"], dtype="bf16")
    assert isinstance(int8.text_decoder.lm_head, Int8Linear)
    assert bf16.text_decoder.lm_head.weight.dtype == torch.bfloat16
    s = fp32.cfg.vision.image_size
    images = torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(0))
    tokens = fp32.generate(images, max_new_tokens=10, strategy="greedy")
    reference = fp32.score(images, tokens).mean
    for model, x, tol in ((int8, images, 0.05), (bf16, images.bfloat16(), 0.1)):
        # the reduced model's likelihood of the fp32 captions is close to fp32's
        assert (model.score(x, tokens).mean - reference).abs().max() < tol
        for strategy in ("greedy", "beam"):  # the KV cache stays exact in every precision
            assert torch.equal(model.generate(x, max_new_tokens=10, strategy=strategy, num_beams=3),
                               model.generate(x, max_new_tokens=10, strategy=strategy, num_beams=3, use_cache=False))


def test_precision_refusals(tiny):
    with pytest.raises(UserError, match="int8.*CPU only.*bf16"):
        apply_precision(tiny, "int8", device="cuda")
    with pytest.raises(UserError, match=r"dtype must be one of \('fp32', 'bf16', 'int8'\), got 'fp16'"):
        apply_precision(tiny, "fp16")


@pytest.mark.parametrize("kernel", ["as probed", "fp32 products"])
def test_int8_linear_rows_are_independent_and_match_the_quantisation_formula(kernel, monkeypatch):
    """Both ways of taking the integer products (torch._int_mm where it is exact, the same integers
    in fp32 where it is not) give the quantisation formula's values, computed in float64."""
    from coca import precision
    if kernel == "fp32 products":
        monkeypatch.setattr(precision, "_INT_MM_EXACT", False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear(linear)
    x = torch.randn(5, 7, 64)
    x[0, 0] *= 1000  # one huge row must not coarsen the others (it would with a per-tensor scale)
    y = q(x)
    assert torch.equal(q(x[1:]), y[1:]) and torch.equal(q(x[:, 3:4]), y[:, 3:4])
    # the formula in float64: per-output-channel weight scale, per-row activation scale, symmetric
    w = linear.weight.double()
    ws = w.abs().amax(1) / 127
    wq = (w / ws[:, None]).round()
    rows = x.reshape(-1, 64).double()
    xs = rows.abs().amax(1, keepdim=True) / 127
    ref = ((rows / xs).round() @ wq.T) * xs * ws + linear.bias.double()
    torch.testing.assert_close(y.reshape(-1, 48).double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = linear(x[1:])
    assert ((y[1:] - plain).norm() / plain.norm()) < 0.02


def test_int8_linear_is_exact_with_the_kernels_of_a_cpu_without_vnni():
    """oneDNN's int8 kernel without VNNI returns wrong sums (PyTorch 2.14): restricted to AVX2, as
    on such a CPU, Int8Linear must still match the formula (it detects the kernel and uses fp32)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    test = f"{__file__}::test_int8_linear_rows_are_independent_and_match_the_quantisation_formula"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
