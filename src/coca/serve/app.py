"""`coca serve`: a Starlette (ASGI) app around a loaded model.

Starlette rather than FastAPI: the endpoints take multipart uploads whose every field we validate
by hand (limits, unknown fields, image decoding) to return one JSON error shape, so FastAPI's
pydantic layer would add a dependency without removing code; uvicorn runs it.

Endpoints (``/v1`` is the API version; a breaking change gets ``/v2``):

    GET  /                 the page (one self-contained HTML file, no external resources)
    GET  /health           {"status": "ok", ...}                      (never needs the key)
    GET  /metrics          Prometheus text
    POST /v1/caption       multipart: image | path (an indexed image), strategy, num_beams, ...
    POST /v1/classify      multipart: image, labels, [templates], [method]
    POST /v1/embed         multipart: image  |  JSON: {"texts": [...]}
    POST /v1/search        JSON: {"text": ..., "k": 8}  |  multipart: image, [k]
    GET  /v1/thumbnail     ?path=... (an indexed image), JPEG

Every error is ``{"error": {"kind": ..., "message": ...}}`` with a 4xx status (5xx only for a bug).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import MAX_PIXELS, STRATEGIES, ZEROSHOT_METHODS
from ..data.samples import to_rgb
from ..errors import UserError
from ..generation import GenerationConfig
from .batcher import Busy, CaptionBatcher
from .metrics import ServerMetrics

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 1024 * 1024  # the upload plus the other form fields
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
MAX_TEMPLATES = 100
MAX_TEXTS = 256
MAX_TEXT_CHARS = 2000
MAX_K = 100
THUMBNAIL_PX = 128
PAGE = Path(__file__).with_name("page.html")

CAPTION_FIELDS = {"image", "path", "strategy", "num_beams", "max_new_tokens", "min_new_tokens", "num_return_sequences", "prefix",
                  "repetition_penalty", "no_repeat_ngram_size", "seed"}


class BodyTooLarge(Exception):
    pass


class CaptionOptions(NamedTuple):
    """What a caption request asks for; requests with equal options share a ``generate`` call."""
    config: GenerationConfig
    prefix: str | None = None
    request: int | None = None  # a sampled request's own: it runs in a batch of its own


class LimitBody:
    """ASGI middleware: a request body (chunked or not) is cut off at ``limit`` bytes while it is
    read, so no upload is ever held or spooled beyond it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        seen = int(declared) if declared.isdigit() and int(declared) > self.limit else 0  # refused at once

        async def limited():
            nonlocal seen
            if seen > self.limit:
                raise BodyTooLarge()
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message
        return await self.app(scope, limited, send)


class RequestError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def too_large() -> RequestError:
    return RequestError(413, "too_large", f"the request is larger than {MAX_REQUEST_BYTES // (1024 * 1024)} MB")


def _number(form, name, default, lo, hi, cast=int):
    """A numeric form field in [lo, hi], or ``default`` when absent or empty."""
    raw = form.get(name)
    if raw in (None, ""):
        return default
    try:
        value = cast(str(raw))
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise RequestError(400, "bad_field", f"{name} must be {kind}, got {str(raw)[:40]!r}") from None
    if not lo <= value <= hi:  # also false for NaN
        raise RequestError(400, "bad_field", f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _int(form, name, default, lo, hi):
    return _number(form, name, default, lo, hi, int)


def _float(form, name, default, lo, hi):
    return _number(form, name, default, lo, hi, float)


class Server:
    """The model, the optional index, the batcher and the request handlers."""

    def __init__(self, model, index=None, api_key: str | None = None, max_batch: int = 16, max_wait_ms: float = 30.0,
                 max_queue: int = 256, compile: bool = False):
        from ..compiled_decoding import CompiledDecoder
        from ..data import eval_transform
        self.model, self.index, self.api_key = model, index, api_key or None
        self.compile = compile  # captions through the server's own compiled decoder, kept for its life
        self.compiled = CompiledDecoder(model) if compile else None
        self.tokenizer = model.tokenizer
        self.transform = eval_transform(model.cfg.vision.image_size)
        self.metrics = ServerMetrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coca-model")
        self.batcher = CaptionBatcher(self._caption_batch, max_batch, max_wait_ms, max_queue, self.metrics,
                                      self.executor)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # --- model work (in the worker thread) ----------------------------------------------------
    def _caption_batch(self, images: torch.Tensor, options: CaptionOptions) -> list[dict]:
        with torch.no_grad():
            out = self.model.generate(images.to(self.device, self.dtype), options.config, prefix=options.prefix,
                                      return_dict=True, compiled=self.compiled)
        texts = self.tokenizer.decode(out.tokens)
        scores = out.normalized_scores.tolist()
        n = options.config.num_return_sequences
        results = []
        for i in range(images.shape[0]):
            alts = [{"caption": texts[j], "score": round(scores[j], 5)} for j in range(i * n, (i + 1) * n)]
            results.append({"caption": alts[0]["caption"], "score": alts[0]["score"], "alternatives": alts})
        return results

    async def in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- input parsing ------------------------------------------------------------------------
    def decode_upload(self, data: bytes, name: str = "image") -> torch.Tensor:
        from ..data.samples import decode_image
        if not data:
            raise RequestError(400, "empty_image", f"the {name} upload is empty")
        image = decode_image(data, MAX_PIXELS, name)
        if getattr(image, "reason", None) == "too_many_pixels":
            raise RequestError(413, "image_too_large", f"the image has more than {MAX_PIXELS:,} pixels")
        if getattr(image, "reason", None):
            raise RequestError(400, "not_an_image", "the upload is not a readable image (JPEG, PNG, WebP, GIF, BMP, TIFF)")
        return self.transform(image)

    async def form(self, request, allowed: set[str]):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise RequestError(415, "unsupported_media_type",
                               f"send multipart/form-data (an 'image' file field), not {ctype or 'no content type'}")
        try:
            form = await request.form(max_files=2, max_fields=len(allowed) + 2, max_part_size=MAX_UPLOAD_BYTES)
        except BodyTooLarge:
            raise too_large() from None
        except Exception as e:  # malformed multipart, too many parts, part too large
            raise RequestError(400, "bad_form", f"could not read the form: {e}") from None
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise RequestError(400, "unknown_field", f"unknown form field(s) {unknown}; allowed: {sorted(allowed)}")
        return form

    async def json_body(self, request, allowed: set[str]) -> dict:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            raise RequestError(415, "unsupported_media_type", f"send application/json, not {ctype or 'no content type'}")
        try:
            body = await request.body()
        except BodyTooLarge:
            raise too_large() from None
        try:
            data = json.loads(body)
        except ValueError as e:
            raise RequestError(400, "bad_json", f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "bad_json", "the body must be a JSON object")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise RequestError(400, "unknown_field", f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        return data

    async def image_from_form(self, form) -> torch.Tensor:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "missing_image", "the form needs an 'image' file field")
        data = await upload.read()
        # decoding a large JPEG takes a while: off the event loop, and off the model thread
        return await asyncio.to_thread(self.decode_upload, data)

    @staticmethod
    def _choice(form, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = form.get(name) or default
        if not isinstance(value, str) or value not in allowed:
            shown = value[:40] if isinstance(value, str) else "a file"
            raise RequestError(400, "bad_field", f"{name} must be one of {', '.join(allowed)}, got {shown!r}")
        return value

    def _text(self, value, name: str, limit: int = MAX_TEXT_CHARS) -> str:
        if not isinstance(value, str):
            raise RequestError(400, "bad_field", f"{name} must be a string")
        if len(value) > limit:
            raise RequestError(413, "text_too_long", f"{name} has {len(value):,} characters; at most {limit:,}")
        if not value.strip():
            raise RequestError(400, "bad_field", f"{name} is empty")
        return value

    # --- endpoints ----------------------------------------------------------------------------
    async def caption(self, request) -> dict:
        self.batcher.expecting += 1  # lets the batcher wait for this request while it is parsed
        try:
            image, options = await self._caption_request(request)
        finally:
            self.batcher.expecting -= 1
        try:
            return await self.batcher.submit(image, options)
        except Busy as e:
            raise RequestError(503, "busy", str(e)) from None

    async def _caption_request(self, request) -> tuple[torch.Tensor, CaptionOptions]:
        form = await self.form(request, CAPTION_FIELDS)
        if form.get("path"):
            if form.get("image") is not None:
                raise RequestError(400, "bad_field", "give either 'image' or 'path', not both")
            image = await asyncio.to_thread(self._index_image, self._text(form["path"], "path", 1000))
        else:
            image = await self.image_from_form(form)
        context = self.model.cfg.text.context_length
        strategy = self._choice(form, "strategy", "beam", STRATEGIES)
        options = dict(strategy=strategy, num_beams=_int(form, "num_beams", 3, 1, 8),
                       max_new_tokens=_int(form, "max_new_tokens", 30, 1, context),
                       min_new_tokens=_int(form, "min_new_tokens", 0, 0, context),
                       num_return_sequences=_int(form, "num_return_sequences", 1, 1, 8),
                       repetition_penalty=_float(form, "repetition_penalty", 1.0, 0.01, 100.0),
                       no_repeat_ngram_size=_int(form, "no_repeat_ngram_size", 0, 0, context))
        if strategy == "sample":
            options["seed"] = _int(form, "seed", None, 0, 2**31 - 1)
        prefix = form.get("prefix") or ""
        if prefix:
            prefix = self._text(prefix, "prefix", 500)
        n_prefix = len(self.tokenizer.encode_ids(prefix)) if prefix else 0
        try:
            config = GenerationConfig(**options, compile=self.compile).validate(context, n_prefix)
        except UserError as e:
            raise RequestError(400, "bad_field", str(e)) from None
        # a sampled request runs in a batch of its own: with a seed it is then reproducible
        # whatever else is in flight (one generator per generate call)
        return image, CaptionOptions(config, prefix or None, id(form) if strategy == "sample" else None)

    def _index_image(self, relative: str) -> torch.Tensor:
        path = self._resolve(relative)
        try:
            data = path.read_bytes()
        except OSError:
            raise RequestError(410, "gone", f"{relative!r} is in the index but no longer on disk") from None
        return self.decode_upload(data, relative)

    def _resolve(self, relative: str) -> Path:
        if self.index is None:
            raise RequestError(404, "no_index", "this server has no index (start it with --index DIR)")
        try:
            return self.index.resolve(relative)
        except UserError as e:
            raise RequestError(403, "bad_path", str(e)) from None

    async def classify(self, request) -> dict:
        form = await self.form(request, {"image", "labels", "templates", "method"})
        image = await self.image_from_form(form)
        raw = self._text(form.get("labels") or "", "labels", MAX_LABELS * (MAX_LABEL_CHARS + 1))
        labels = [x.strip() for x in raw.replace("\n", ",").split(",") if x.strip()]
        if len(labels) < 2:
            raise RequestError(400, "bad_field", "labels needs at least two comma-separated labels")
        if len(labels) > MAX_LABELS:
            raise RequestError(400, "too_many_labels", f"{len(labels):,} labels; at most {MAX_LABELS}")
        if max(len(x) for x in labels) > MAX_LABEL_CHARS:
            raise RequestError(400, "bad_field", f"a label is longer than {MAX_LABEL_CHARS} characters")
        templates = None
        if form.get("templates"):
            templates = [t.strip() for t in self._text(form["templates"], "templates", 20000).splitlines() if t.strip()]
            if len(templates) > MAX_TEMPLATES:
                raise RequestError(400, "bad_field", f"templates: at most {MAX_TEMPLATES} lines")
            from ..evaluate.zeroshot import check_template
            for t in templates:
                try:
                    check_template(t, "templates")
                except UserError as e:
                    raise RequestError(400, "bad_field", str(e)) from None
        method = self._choice(form, "method", "contrastive", ZEROSHOT_METHODS)

        def run():
            from ..evaluate.zeroshot import rank_labels
            with torch.no_grad():
                return rank_labels(self.model, self.tokenizer, image[None], labels, templates, method=method)[0]
        probs = await self.in_worker(run)
        ranked = sorted(zip(labels, probs.tolist()), key=lambda x: -x[1])
        return {"labels": [{"label": label, "prob": round(p, 6)} for label, p in ranked], "method": method}

    async def embed(self, request) -> dict:
        if request.headers.get("content-type", "").startswith("application/json"):
            data = await self.json_body(request, {"texts"})
            texts = data.get("texts")
            if not isinstance(texts, list) or not texts:
                raise RequestError(400, "bad_field", "texts must be a non-empty list of strings")
            if len(texts) > MAX_TEXTS:
                raise RequestError(400, "bad_field", f"{len(texts)} texts; at most {MAX_TEXTS}")
            texts = [self._text(t, f"texts[{i}]") for i, t in enumerate(texts)]
            vectors = await self.in_worker(self._embed_texts, texts)
            return {"embeddings": vectors.tolist(), "dim": vectors.shape[1]}
        form = await self.form(request, {"image"})
        image = await self.image_from_form(form)
        vector = await self.in_worker(self._embed_image, image)
        return {"embedding": vector.tolist(), "dim": vector.shape[0]}

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer.encode(texts).to(self.device)).float().cpu()

    def _embed_image(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_image(image[None].to(self.device, self.dtype))[0].float().cpu()

    async def search(self, request) -> dict:
        if self.index is None:
            raise RequestError(404, "no_index", "this server has no index (start it with --index DIR)")
        if request.headers.get("content-type", "").startswith("application/json"):
            data = await self.json_body(request, {"text", "k"})
            text = self._text(data.get("text"), "text")
            k = data.get("k", 8)
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
                raise RequestError(400, "bad_field", f"k must be an integer in [1, {MAX_K}], got {k!r}")
            query = (await self.in_worker(self._embed_texts, [text]))[0]
        else:
            form = await self.form(request, {"image", "k"})
            k = _int(form, "k", 8, 1, MAX_K)
            query = await self.in_worker(self._embed_image, await self.image_from_form(form))
        hits = self.index.search(query, k)
        thumbs = await asyncio.to_thread(lambda: [self._thumbnail_or_none(p) for p, _ in hits])
        return {"results": [{"path": p, "score": round(s, 5),  # thumbnail null: the file is gone since indexing
                             "thumbnail": None if t is None else "data:image/jpeg;base64," + base64.b64encode(t).decode()}
                            for (p, s), t in zip(hits, thumbs)], "index_size": len(self.index)}

    def _thumbnail_bytes(self, relative: str) -> bytes:
        from PIL import Image
        path = self._resolve(relative)
        try:
            with Image.open(path) as im:
                im = to_rgb(im)
                im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
                return buf.getvalue()
        except (OSError, ValueError, Image.DecompressionBombError):  # deleted, replaced or broken since indexing
            raise RequestError(410, "gone", f"{relative!r} is in the index but can no longer be read") from None

    def _thumbnail_or_none(self, relative: str) -> bytes | None:
        try:
            return self._thumbnail_bytes(relative)
        except RequestError:
            return None


def create_app(server: Server):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import (
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
    )
    from starlette.routing import Route

    open_paths = {"/", "/health"}

    def endpoint(name, handler):
        async def wrapped(request: Request):
            start = time.perf_counter()
            kind = None
            try:
                if server.api_key and request.url.path not in open_paths:
                    given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
                    if not hmac.compare_digest(given.encode(), server.api_key.encode()):
                        raise RequestError(401, "unauthorized", "missing or wrong API key (X-API-Key header)")
                result = await handler(request)
                response = result if isinstance(result, Response) else JSONResponse(result)
            except RequestError as e:
                kind = e.kind
                response = JSONResponse({"error": {"kind": e.kind, "message": e.message}}, status_code=e.status)
            except Exception as e:  # a bug: answer 500 with the kind, keep serving
                kind = "internal"
                response = JSONResponse({"error": {"kind": "internal", "message": f"{type(e).__name__}: {e}"}},
                                        status_code=500)
            server.metrics.observe_request(name, response.status_code, time.perf_counter() - start, kind)
            return response
        return wrapped

    async def page(request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(request):
        return {"status": "ok", "model": server.model.cfg.name, "index_size": len(server.index) if server.index else 0,
                "queue": server.batcher.queue.qsize(), "max_batch": server.batcher.max_batch,
                "needs_key": bool(server.api_key)}

    async def metrics(request):
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    async def thumbnail(request):
        relative = request.query_params.get("path", "")
        if not relative:
            raise RequestError(400, "bad_field", "give ?path= (an indexed image)")
        data = await asyncio.to_thread(server._thumbnail_bytes, relative)
        return Response(data, media_type="image/jpeg")

    async def not_found(request, exc):
        return JSONResponse({"error": {"kind": "not_found", "message": f"no endpoint {request.url.path}"}},
                            status_code=exc.status_code if hasattr(exc, "status_code") else 404)

    routes = [
        Route("/", endpoint("page", page)),
        Route("/health", endpoint("health", health)),
        Route("/metrics", endpoint("metrics", metrics)),
        Route("/v1/caption", endpoint("caption", server.caption), methods=["POST"]),
        Route("/v1/classify", endpoint("classify", server.classify), methods=["POST"]),
        Route("/v1/embed", endpoint("embed", server.embed), methods=["POST"]),
        Route("/v1/search", endpoint("search", server.search), methods=["POST"]),
        Route("/v1/thumbnail", endpoint("thumbnail", thumbnail)),
    ]

    async def lifespan(app):
        server.batcher.start()
        yield
        await server.batcher.stop()

    from contextlib import asynccontextmanager
    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan),
                    exception_handlers={404: not_found, 405: not_found})
    return LimitBody(app, MAX_REQUEST_BYTES)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "fp32", index_dir: str | None = None,
          api_key: str | None = None, max_batch: int = 16, max_wait_ms: float = 30.0, device: str = "cpu",
          compile: bool = False) -> None:
    import uvicorn

    from ..loading import load_model
    from .index import ImageIndex
    api_key = api_key or os.environ.get("COCA_API_KEY") or None
    model = load_model(model_dir, device, dtype)
    index = ImageIndex(index_dir) if index_dir else None
    if index is not None:
        from .index import check_same_model
        check_same_model(index.meta, model, f"index {index_dir}")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
              "(set --api-key or COCA_API_KEY)", flush=True)
    server = Server(model, index, api_key, max_batch, max_wait_ms, compile=compile)
    print(f"coca serve: http://{host}:{port}/  (model {model_dir}, {dtype}, "
          f"{'index of ' + str(len(index)) + ' images' if index else 'no index'}, max batch {max_batch}, "
          f"wait {max_wait_ms} ms{', compiled decoding: the first batch of each size bucket compiles' if compile else ''})",
          flush=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
