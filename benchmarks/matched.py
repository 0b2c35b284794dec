"""Shared helpers for the benchmarks: a matched pair of models (ours and open_clip's CoCa),
interleaved timing, and markdown/JSON output.

Matching rules (same shapes where the architectures have the same part):

    ours                               open_clip.coca_model.CoCa
    vision width/layers/heads/mlp  ==  vision_cfg width/layers/(width/head_width)/mlp_ratio
    n_gen_queries                  ==  vision_cfg.attn_pooler_queries (open_clip keeps 1 as the CLS, 255 tokens)
    text.d_model / num_heads       ==  text_cfg.width / heads == multimodal_cfg.width / heads
    text.encoder_layers            ==  text_cfg.layers   (unimodal text layers)
    text.decoder_layers            ==  multimodal_cfg.layers (each = self-attn block + cross-attn block)
    vocab 32000, context 77        ==  vocab 32000, context 76 (+1 CLS = 77 positions)
    embed_dim                      ==  embed_dim (open_clip needs embed_dim == multimodal width)

Our T5 blocks use a gated-GELU FFN (3 matrices of d x d_ff); open_clip's multimodal layer has two
full residual blocks (self-attn + MLP, cross-attn + MLP). ``d_ff`` (default 2048) is chosen so the
total parameter counts match; both counts are printed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Size:
    image_size: int = 160
    patch_size: int = 16
    vision_width: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    text_width: int = 512
    text_heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_ff: int = 2048
    vocab: int = 32000
    n_queries: int = 256
    embed_dim: int = 512


def add_size_args(parser) -> None:
    d = Size()
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--patch-size", type=int, default=d.patch_size)
    parser.add_argument("--vision-width", type=int, default=d.vision_width)
    parser.add_argument("--vision-layers", type=int, default=d.vision_layers)
    parser.add_argument("--text-width", type=int, default=d.text_width)
    parser.add_argument("--encoder-layers", type=int, default=d.encoder_layers)
    parser.add_argument("--decoder-layers", type=int, default=d.decoder_layers)
    parser.add_argument("--d-ff", type=int, default=d.d_ff, help="our T5 gated-GELU FFN width")
    parser.add_argument("--n-queries", type=int, default=d.n_queries)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def size_from_args(args) -> Size:
    return Size(image_size=args.image_size, patch_size=args.patch_size, vision_width=args.vision_width,
                vision_layers=args.vision_layers, vision_heads=args.vision_width // 64,
                text_width=args.text_width, text_heads=args.text_width // 64,
                encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, d_ff=args.d_ff,
                n_queries=args.n_queries, embed_dim=args.text_width)


def build_ours(s: Size):
    import coca
    from coca.config import CoCaConfig, TextConfig, VisionConfig
    cfg = CoCaConfig(
        name="bench-matched",
        vision=VisionConfig(image_size=s.image_size, patch_size=s.patch_size, width=s.vision_width,
                            layers=s.vision_layers, heads=s.vision_heads, mlp_dim=4 * s.vision_width),
        text=TextConfig(vocab_size=s.vocab, context_length=77, d_model=s.text_width, d_kv=64,
                        num_heads=s.text_heads, d_ff=s.d_ff, encoder_layers=s.encoder_layers,
                        decoder_layers=s.decoder_layers),
        embed_dim=s.embed_dim, n_gen_queries=s.n_queries, pooler_heads=s.text_heads,
    )
    return coca.create_model(cfg), cfg


def open_clip_cfg(s: Size) -> dict:
    return dict(
        embed_dim=s.embed_dim,
        vision_cfg=dict(image_size=s.image_size, patch_size=s.patch_size, width=s.vision_width,
                        layers=s.vision_layers, head_width=64, mlp_ratio=4.0, attentional_pool=True,
                        attn_pooler_queries=s.n_queries, attn_pooler_heads=s.text_heads, output_tokens=True),
        text_cfg=dict(context_length=76, vocab_size=s.vocab, width=s.text_width, heads=s.text_heads,
                      layers=s.encoder_layers, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(context_length=76, vocab_size=s.vocab, width=s.text_width, heads=s.text_heads,
                            layers=s.decoder_layers, attn_pooler_heads=s.text_heads),
    )


def build_open_clip(s: Size):
    from open_clip.coca_model import CoCa
    cfg = open_clip_cfg(s)
    model = CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
    # The vision and text towers initialise themselves. MultimodalTransformer.init_parameters is
    # never called by open_clip (and refers to a missing ``self.transformer``), so its
    # ``text_projection`` (the LM head) would stay torch.empty: initialise it as that method meant to.
    dec = model.text_decoder
    w, L = dec.width, dec.layers
    with torch.no_grad():
        for block in list(dec.resblocks) + list(dec.cross_attn):
            torch.nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=w ** -0.5 * (2 * L) ** -0.5)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=w ** -0.5 * (2 * L) ** -0.5)
        torch.nn.init.normal_(dec.text_projection, std=w ** -0.5)
    return model, cfg


def n_params(model) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_breakdown_ours(m) -> dict:
    parts = {"vision (ViT+poolers)": [m.visual, m.gen_pooler, m.contrastive_pooler, m.ln_visual, m.image_proj],
             "text encoder": [m.text_encoder.blocks, m.text_encoder.final_norm, m.text_encoder.position_bias, m.text_proj],
             "decoder": [m.text_decoder.blocks, m.text_decoder.final_norm, m.text_decoder.position_bias],
             "token embedding": [m.text_encoder.embed_tokens], "lm head": [m.text_decoder.lm_head]}
    return {k: sum(n_params(x) for x in v) for k, v in parts.items()}


def param_breakdown_open_clip(m) -> dict:
    dec = m.text_decoder
    return {"vision (ViT+poolers)": n_params(m.visual),
            "text encoder": n_params(m.text) - m.text.token_embedding.weight.numel(),
            "decoder": n_params(dec) - dec.text_projection.numel(),
            "token embedding": m.text.token_embedding.weight.numel(), "lm head": dec.text_projection.numel()}


def median(xs):
    return statistics.median(xs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def env_info(threads: int) -> dict:
    import open_clip
    import transformers
    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def param_summary(ours, oc) -> dict:
    return {"ours": n_params(ours), "open_clip": n_params(oc),
            "ours_breakdown": param_breakdown_ours(ours), "open_clip_breakdown": param_breakdown_open_clip(oc)}


def print_setup(size: Size, params: dict) -> tuple:
    """Print the matched size and parameter counts; returns the load average at the start."""
    p_ours, p_oc = params["ours"], params["open_clip"]
    print(f"size: {size}")
    print(f"params: ours {p_ours / 1e6:.2f}M, open_clip {p_oc / 1e6:.2f}M (ours/open_clip {p_ours / p_oc:.3f})")
    for k, n in params["ours_breakdown"].items():
        print(f"  {k:22s} ours {n / 1e6:7.2f}M   open_clip {params['open_clip_breakdown'][k] / 1e6:7.2f}M")
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f}")
    return load_start


def write_results(path: str | None, benchmark: str, args, size: Size, oc_cfg: dict, params: dict,
                  load_start, load_end, **results) -> None:
    """The JSON every side-by-side benchmark writes: setup, environment, then its own results."""
    write_json(path, {"benchmark": benchmark, "args": vars(args), "size": vars(size), "open_clip_cfg": oc_cfg,
                      "params": params, "env": env_info(args.threads),
                      "load_avg": {"start": load_start, "end": load_end}, **results})


def write_json(path: str | None, data: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"\nwrote {path}")
