"""`coca serve` and `coca index`: every endpoint against the model called directly, a mixed stream of
good and bad requests (each bad one a 4xx naming the problem, each good one its right answer, the
server process still up), dynamic batching, path traversal, the API key, and the page in headless
Chromium driven by Playwright."""

import io
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import coca
from coca.data import eval_transform, load_image
from coca.serve.process import spawn_server

httpx = pytest.importorskip("httpx")


def start_server(model, *extra):
    return spawn_server(model, "--max-wait-ms", "30", *extra)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The trained tiny model behind `coca serve`, with an index of the held-out caption images."""
    index = tmp_path_factory.mktemp("index") / "idx"
    out = subprocess.run([sys.executable, "-m", "coca.cli", "index", trained["captions"], "--model", trained["model"],
                          "--out", str(index), "--workers", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "indexed 39 images" in out.stdout and "decode_error" in out.stdout  # one corrupt image, counted
    proc, url = start_server(trained["model"], "--index", index)
    yield {**trained, "url": url, "proc": proc, "index": index, "model_dir": trained["model"],
           "model": coca.load(trained["model"])}
    proc.kill()
    proc.wait()


def png_bytes(path) -> bytes:
    return open(path, "rb").read()


def image_paths(served):
    return sorted(os.path.join(served["captions"], f) for f in os.listdir(served["captions"]) if f != "00003.png")


@torch.no_grad()
def direct_caption(model, path, **kw):
    image = eval_transform(model.cfg.vision.image_size)(load_image(path))[None]
    out = model.generate(image, return_dict=True, **{"strategy": "beam", "num_beams": 3, **kw})
    return model.tokenizer.decode(out.tokens), out.normalized_scores.tolist()


def test_caption_classify_embed_search_equal_the_model(served):
    url, model = served["url"], served["model"]
    path = image_paths(served)[0]
    r = httpx.post(url + "/v1/caption", files={"image": png_bytes(path)},
                   data={"num_return_sequences": "2", "max_new_tokens": "20"})
    assert r.status_code == 200, r.text
    texts, scores = direct_caption(model, path, num_return_sequences=2, max_new_tokens=20)
    body = r.json()
    assert body["caption"] == texts[0] and [a["caption"] for a in body["alternatives"]] == texts
    assert body["score"] == pytest.approx(scores[0], abs=1e-4)
    # prefix and greedy
    r = httpx.post(url + "/v1/caption", files={"image": png_bytes(path)}, data={"strategy": "greedy", "prefix": "a large"})
    assert r.status_code == 200 and r.json()["caption"].startswith("a large")

    labels = ["a small red circle", "a large blue square", "a small green triangle"]
    r = httpx.post(url + "/v1/classify", files={"image": png_bytes(path)}, data={"labels": ", ".join(labels)})
    assert r.status_code == 200, r.text
    from coca.evaluate.zeroshot import rank_labels
    image = eval_transform(model.cfg.vision.image_size)(load_image(path))[None]
    expected = rank_labels(model, model.tokenizer, image, labels)[0].tolist()
    got = {x["label"]: x["prob"] for x in r.json()["labels"]}
    assert [x["label"] for x in r.json()["labels"]] == sorted(labels, key=lambda lab: -expected[labels.index(lab)])
    for label, p in zip(labels, expected):
        assert got[label] == pytest.approx(p, abs=1e-5)

    r = httpx.post(url + "/v1/embed", files={"image": png_bytes(path)})
    with torch.no_grad():
        embed = model.encode_image(image)[0]
    torch.testing.assert_close(torch.tensor(r.json()["embedding"]), embed, atol=1e-5, rtol=0)
    r = httpx.post(url + "/v1/embed", json={"texts": labels})
    with torch.no_grad():
        text_embeds = model.encode_text(model.tokenizer.encode(labels))
    torch.testing.assert_close(torch.tensor(r.json()["embeddings"]), text_embeds, atol=1e-5, rtol=0)

    # search by image: the image itself is the best match (similarity ~1, float16 index)
    r = httpx.post(url + "/v1/search", files={"image": png_bytes(path)}, data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    own = [h for h in hits if h["path"] == os.path.basename(path)]
    assert own and own[0]["score"] == pytest.approx(1.0, abs=2e-3)  # (a near-identical scene may tie with it)
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3) and len(hits) == 3 and hits[0]["thumbnail"].startswith("data:image/jpeg;base64,")
    # search by text ranks by the text embedding
    r = httpx.post(url + "/v1/search", json={"text": labels[0], "k": 5})
    assert [h["score"] for h in r.json()["results"]] == sorted((h["score"] for h in r.json()["results"]), reverse=True)
    thumb = httpx.get(url + "/v1/thumbnail", params={"path": hits[0]["path"]})
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] <= 128
    # caption an indexed image by its path
    r = httpx.post(url + "/v1/caption", data={"path": hits[0]["path"]})
    assert r.status_code == 200 and r.json()["caption"] == direct_caption(model, path)[0][0]

    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["index_size"] == 39
    metrics = httpx.get(url + "/metrics").text
    assert 'coca_requests_total{endpoint="caption",status="200"}' in metrics
    assert "coca_batch_size_bucket" in metrics and "coca_queue_wait_seconds_count" in metrics


def chunked_upload(megabytes: int):
    """A multipart file part streamed without a Content-Length (chunked), never closed."""
    yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(megabytes):
        yield b"x" * 2**20


def bad_requests(served):
    """(description, request kwargs, expected status, expected error kind)."""
    path = image_paths(served)[0]
    jpeg = io.BytesIO()
    Image.open(path).convert("RGB").save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    # a PNG whose header claims 20,000 x 20,000 pixels (the pixel limit must refuse it before decoding)
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # the start of the pixel data; the rest never comes
    huge = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))
    image = png_bytes(path)
    return [
        ("non-image bytes", dict(url="/v1/caption", files={"image": b"hello, not an image"}), 400, "not_an_image"),
        ("truncated JPEG", dict(url="/v1/caption", files={"image": truncated}), 400, "not_an_image"),
        ("20000x20000 PNG header", dict(url="/v1/caption", files={"image": huge}), 413, "image_too_large"),
        ("empty body", dict(url="/v1/caption", content=b"", headers={"content-type": "multipart/form-data; boundary=x"}),
         400, "missing_image"),
        ("empty image", dict(url="/v1/caption", files={"image": b""}), 400, "empty_image"),
        ("wrong content type", dict(url="/v1/caption", content=image, headers={"content-type": "image/png"}),
         415, "unsupported_media_type"),
        ("10,000 labels", dict(url="/v1/classify", files={"image": image},
                               data={"labels": ",".join(f"label {i}" for i in range(10000))}), 400, "too_many_labels"),
        ("1 MB text", dict(url="/v1/search", json={"text": "a" * 1_000_000}), 413, "text_too_long"),
        ("1 MB text to embed", dict(url="/v1/embed", json={"texts": ["b" * 1_000_000]}), 413, "text_too_long"),
        ("unknown JSON field", dict(url="/v1/search", json={"text": "a red circle", "top": 3}), 400, "unknown_field"),
        ("unknown form field", dict(url="/v1/caption", files={"image": image}, data={"beams": "3"}), 400, "unknown_field"),
        ("bad option", dict(url="/v1/caption", files={"image": image}, data={"num_beams": "2", "num_return_sequences": "3"}),
         400, "bad_field"),
        ("not JSON", dict(url="/v1/search", content=b"{nope", headers={"content-type": "application/json"}), 400, "bad_json"),
        ("traversal thumbnail", dict(method="GET", url="/v1/thumbnail", params={"path": "../run/config.yaml"}),
         403, "bad_path"),
        ("absolute thumbnail", dict(method="GET", url="/v1/thumbnail", params={"path": "/etc/passwd"}), 403, "bad_path"),
        ("traversal caption", dict(url="/v1/caption", data={"path": "../../captions/00000.png"}), 403, "bad_path"),
        ("unknown endpoint", dict(method="GET", url="/v2/caption"), 404, "not_found"),
        ("chunked 23 MB upload", dict(url="/v1/caption", content=chunked_upload(23),
                                      headers={"content-type": "multipart/form-data; boundary=x"}), 413, "too_large"),
        ("bad template", dict(url="/v1/classify", files={"image": image},
                              data={"labels": "a,b", "templates": "a photo of {}}"}), 400, "bad_field"),
        ("strategy sent as a file", dict(url="/v1/caption", files={"image": image, "strategy": b"beam"}), 400,
         "bad_field"),
    ]


def test_mixed_stream_of_good_and_bad_requests(served):
    url, model = served["url"], served["model"]
    good = [(p, direct_caption(model, p, max_new_tokens=20)[0][0]) for p in image_paths(served)[:6]]
    bad = bad_requests(served)

    def send(item):
        kind, payload = item
        if kind == "good":
            path, _ = payload
            return httpx.post(url + "/v1/caption", files={"image": png_bytes(path)}, data={"max_new_tokens": "20"},
                              timeout=60)
        _, kw, _, _ = payload
        kw = dict(kw)
        method = kw.pop("method", "POST")
        return httpx.request(method, url + kw.pop("url"), timeout=60, **kw)

    stream = [("good", g) for g in good] + [("bad", b) for b in bad]
    stream = [x for pair in zip(stream[::2], stream[1::2]) for x in pair] + ([stream[-1]] if len(stream) % 2 else [])
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, stream))
    for (kind, payload), r in zip(stream, responses):
        if kind == "good":
            assert r.status_code == 200, r.text
            assert r.json()["caption"] == payload[1]
        else:
            name, _, status, error_kind = payload
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            body = r.json()["error"]
            assert body["kind"] == error_kind and body["message"], name
    assert served["proc"].poll() is None and httpx.get(url + "/health").status_code == 200
    metrics = httpx.get(url + "/metrics").text
    assert 'coca_errors_total{endpoint="caption",kind="not_an_image"}' in metrics


def test_concurrent_captions_are_batched_and_each_gets_its_own_answer(served):
    url, model = served["url"], served["model"]
    paths = image_paths(served)[:12]
    expected = [direct_caption(model, p, max_new_tokens=25)[0][0] for p in paths]
    before = httpx.get(url + "/metrics").text

    def count(text, name):
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda p: httpx.post(url + "/v1/caption", files={"image": png_bytes(p)},
                                                       data={"max_new_tokens": "25"}, timeout=60), paths))
    assert [r.json()["caption"] for r in responses] == expected
    after = httpx.get(url + "/metrics").text
    calls = count(after, "coca_batch_size_count") - count(before, "coca_batch_size_count")
    requests = count(after, "coca_batch_size_sum") - count(before, "coca_batch_size_sum")
    assert requests == 12 and calls < 12  # some requests shared a generate call


def test_index_resumes_and_refuses_another_root(served, tmp_path):
    index = tmp_path / "idx"
    cmd = [sys.executable, "-m", "coca.cli", "index", served["captions"], "--model", served["model_dir"],
           "--out", str(index), "--workers", "0", "--batch-size", "8"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    parts = sorted(index.glob("part-*.jsonl"))
    assert len(parts) == 5  # 39 images in batches of 8
    parts[-1].unlink()  # as if killed before the last part was complete
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and "indexed 8 images" in out.stdout and "31 were already there" in out.stdout
    from coca.serve.index import ImageIndex
    assert len(ImageIndex(index)) == 39 and len(set(ImageIndex(index).paths)) == 39
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (32, 32)).save(other / "x.png")
    with_other_root = list(cmd)
    with_other_root[cmd.index("index") + 1] = str(other)
    out = subprocess.run(with_other_root, capture_output=True, text=True)
    assert out.returncode == 2 and "use a new --out" in out.stderr
    # another model (the random weights) may neither extend nor serve this index
    with_other_model = list(cmd)
    with_other_model[cmd.index("--model") + 1] = served["random"]
    out = subprocess.run(with_other_model, capture_output=True, text=True)
    assert out.returncode == 2 and "different model" in out.stderr
    with pytest.raises(RuntimeError, match="different model"):
        spawn_server(served["random"], "--index", index)
    # the same model in int8 is the same embedding space
    assert subprocess.run(cmd + ["--dtype", "int8"], capture_output=True).returncode == 0


def test_seeded_sampling_is_the_same_alone_and_under_load(served):
    url = served["url"]
    paths = image_paths(served)[:6]
    options = {"strategy": "sample", "seed": "7", "max_new_tokens": "12"}
    alone = httpx.post(url + "/v1/caption", files={"image": png_bytes(paths[0])}, data=options).json()["caption"]
    with ThreadPoolExecutor(6) as pool:
        loaded = list(pool.map(lambda p: httpx.post(url + "/v1/caption", files={"image": png_bytes(p)}, data=options,
                                                    timeout=60).json()["caption"], paths))
    assert loaded[0] == alone


def test_an_image_gone_since_indexing_is_reported_not_a_crash(served, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in image_paths(served)[:3]:
        shutil.copy(p, folder)
    index = tmp_path / "few.index"
    assert subprocess.run([sys.executable, "-m", "coca.cli", "index", str(folder), "--model", served["model_dir"],
                           "--out", str(index), "--workers", "0"], capture_output=True).returncode == 0
    proc, url = start_server(served["model_dir"], "--index", index)
    try:
        gone = sorted(os.listdir(folder))[0]
        (folder / gone).unlink()
        r = httpx.get(url + "/v1/thumbnail", params={"path": gone})
        assert r.status_code == 410 and r.json()["error"]["kind"] == "gone"
        r = httpx.post(url + "/v1/caption", data={"path": gone})
        assert r.status_code == 410
        hits = httpx.post(url + "/v1/search", json={"text": "a red circle", "k": 3}).json()["results"]
        assert len(hits) == 3 and [h["thumbnail"] is None for h in hits].count(True) == 1
    finally:
        proc.kill()
        proc.wait()


def test_api_key_protects_everything_but_the_page_and_health(trained):
    proc, url = start_server(trained["model"], "--api-key", "s3cret")
    try:
        image = png_bytes(os.path.join(trained["captions"], "00000.png"))
        assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/health").status_code == 200
        r = httpx.post(url + "/v1/caption", files={"image": image})
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.post(url + "/v1/caption", files={"image": image}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.post(url + "/v1/caption", files={"image": image}, headers={"X-API-Key": "s3cret"}).status_code == 200
        r = httpx.post(url + "/v1/search", json={"text": "x"}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 404 and r.json()["error"]["kind"] == "no_index"
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- the page, in Chromium

@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    from conftest import require_program
    executable = require_program("chromium", "chromium-browser", why="the browser tests of the serving page")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_page_caption_classify_search_and_errors(served, browser, tmp_path):
    model = served["model"]
    page = browser.new_page(viewport={"width": 1200, "height": 860})
    page.goto(served["url"] + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('indexed')")
    path = image_paths(served)[1]
    page.set_input_files("#file", path)
    page.wait_for_function("(() => { const t = document.getElementById('caption').textContent;"
                           " return t && !t.includes('captioning'); })()")
    texts, _ = direct_caption(model, path, num_return_sequences=3)
    assert page.inner_text("#caption") == texts[0]
    assert page.locator("#alternatives li").count() == 3
    page.fill("#labels", "a small red circle, a large blue square, a small green triangle")
    page.click("#classify")
    page.wait_for_selector("#bars .bar")
    assert page.locator("#bars .bar").count() == 3
    page.screenshot(path=str(tmp_path / "caption_and_labels.png"))

    page.fill("#query", "a large blue square")
    page.click("#search")
    page.wait_for_selector("#grid figure img")
    assert page.locator("#grid figure").count() == 12
    assert page.evaluate("document.querySelector('#grid img').naturalWidth") > 0
    first = page.locator("#grid figure").first
    clicked = first.locator("figcaption").inner_text().split(" · ")[0]
    first.click()
    page.wait_for_function("(() => { const t = document.getElementById('caption').textContent;"
                           " return t && !t.includes('captioning'); })()")
    assert page.inner_text("#caption") == direct_caption(model, os.path.join(served["captions"], clicked))[0][0]
    page.screenshot(path=str(tmp_path / "search.png"))

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not an image")
    page.set_input_files("#file", str(not_image))
    page.wait_for_selector("#error", state="visible")
    assert "not a readable image" in page.inner_text("#error")
    page.screenshot(path=str(tmp_path / "error.png"))
    assert (tmp_path / "error.png").stat().st_size > 0
    page.close()


def test_health_and_page_answer_during_a_long_batch(served):
    """Model work runs off the event loop: while slow caption requests decode (4 images x 8 beams x
    70 tokens in one batch), /health and the page are answered — seen finishing while the slow
    requests are still running."""
    url = served["url"]
    image = png_bytes(image_paths(served)[0])
    slow_options = {"strategy": "beam", "num_beams": "8", "num_return_sequences": "8", "max_new_tokens": "70",
                    "min_new_tokens": "70"}
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(lambda: httpx.post(url + "/v1/caption", files={"image": image}, data=slow_options,
                                               timeout=300)) for _ in range(4)]
        time.sleep(0.2)
        answered_meanwhile = 0
        while not all(f.done() for f in slow):
            ok = httpx.get(url + "/health", timeout=60).status_code == 200 and httpx.get(url + "/", timeout=60).is_success
            answered_meanwhile += ok and not all(f.done() for f in slow)
            time.sleep(0.02)
        responses = [f.result() for f in slow]
    assert all(r.status_code == 200 and len(r.json()["alternatives"]) == 8 for r in responses)
    assert answered_meanwhile >= 1


def test_a_compiled_server_captions_like_the_eager_one(trained):
    """`coca serve --compile`: the model worker's batches go through the server's own compiled
    decoder and give the eager server's captions and scores (3 images: a batch padded to 4 inside);
    the server keeps its graphs from batch to batch."""
    from coca.generation import GenerationConfig
    from coca.serve.app import CaptionOptions, Server
    model = coca.load(trained["model"])
    paths = sorted(os.path.join(trained["captions"], f) for f in os.listdir(trained["captions"]) if f != "00003.png")
    transform = eval_transform(model.cfg.vision.image_size)
    images = torch.stack([transform(load_image(p)) for p in paths[:3]])
    options = CaptionOptions(GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=20, num_return_sequences=2))
    eager_server, compiled_server = Server(model), Server(model, compile=True)
    assert eager_server.compiled is None
    eager = eager_server._caption_batch(images, options)
    compiled = compiled_server._caption_batch(images, options)
    assert compiled_server.compiled.compiles == 1  # the compiled step really ran
    assert compiled_server._caption_batch(images, options) == compiled
    assert compiled_server.compiled.compiles == 1  # the next batch reused it
    assert [[a["caption"] for a in r["alternatives"]] for r in compiled] == \
        [[a["caption"] for a in r["alternatives"]] for r in eager]
    assert [r["score"] for r in compiled] == pytest.approx([r["score"] for r in eager], abs=1e-4)
