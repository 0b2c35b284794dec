"""`coca plan`: per-GPU memory, FLOPs and time of a run before it is launched.

The memory is always that of one layout, DeepSpeed ZeRO stage 2 in BF16 over ``--gpus``
data-parallel ranks, whatever the run config's ``train.engine``, ``train.precision`` and
``train.zero_stage`` say: those keys are not read for memory, and the activations are always
measured in bf16. A run with ``engine: single`` or ``ddp`` (fp32 weights, gradients and Adam
moments on every rank, none partitioned: 16 bytes per parameter against this layout's
4 + 16 / N), in fp32, or at another ZeRO stage needs a different amount than this plan reports. ``train.engine`` changes one thing only, the FLOPs of GradCache's extra pass
(below). From the run config the plan reads the model, ``data.batch_size``,
``train.accum_steps``, ``train.activation_checkpointing``, ``loss.caption_chunk_tokens``,
``train.steps``, ``train.pack_text`` with ``data.mean_caption_tokens`` (or ``--mean-caption-tokens``),
``train.patch_dropout`` with ``train.patch_dropout_until``, and the shard count of ``data.train``
(for its warning).

Packed text towers compute each caption's real tokens: their FLOPs and activations are those of
captions of the mean length (padded ones, of the whole context). Patch dropout p runs the vision
tower on ``1 + round(N (1 - p))`` tokens for ``patch_dropout_until`` of the steps; the FLOPs are
the run's average, while the memory is that of its largest step, the unmasked ones after the
masked phase (unless it lasts the whole run).

Memory per GPU in that layout (DeepSpeed's bf16 mode: bf16 weights, fp32 master weights and
Adam moments in the optimiser, partitioned over the data-parallel ranks; fp32 gradient
accumulation, partitioned):

    parameters            2 bytes x P                       (bf16, replicated)
    gradients             2 bytes x P  +  4 bytes x P / N   (bf16 gradients of the backward pass;
                                                             the fp32 accumulated partition)
    optimiser states     12 bytes x P / N                   (fp32 master, Adam m and v)
    activations           measured: the bytes autograd saves for backward in one forward pass at
                          the micro-batch, run on the meta device (no memory, no compute), with
                          and without per-block activation checkpointing. On the meta device
                          attention takes PyTorch's math path, which keeps the attention
                          probabilities (~14% of coca-large-v2's activations) that flash
                          attention on a GPU does not: an upper bound by that much

FLOPs come from ``torch.utils.flop_counter`` on the same meta forward pass: a training step is
3x the forward FLOPs (the model FLOPs MFU counts) plus, with activation checkpointing, the
forward of every checkpointed block once more (about 4x with every block checkpointed) and, with
``loss.caption_chunk_tokens``, the LM head once more, plus
GradCache's extra pass with accumulation (the image and text encoders; under
``train.engine: deepspeed`` the whole forward, decoder included). The time per step is all of it at the stated
utilisation. ``train.activation_checkpointing: N`` checkpoints the first N blocks of each stack;
the plan reports the fewest that fit the stated memory.
"""

from __future__ import annotations

import math

import torch

from .config import RunConfig
from .errors import UserError

GIB = 1024 ** 3


_measured: dict[tuple, int] = {}  # a plan measures several settings; each meta pass takes seconds


def saved_activation_bytes(model_cfg, micro_batch: int, text_len: int, checkpointing: bool | int,
                           caption_chunk_tokens: int = 0, patch_dropout: float = 0.0) -> int:
    """Bytes autograd keeps for backward after one bf16 forward + loss at ``micro_batch``, every
    caption ``text_len`` real tokens (packed captions of that length cost the same)."""
    blocks = "every" if checkpointing is True else int(checkpointing)  # True == 1 as a dict key: keep them apart
    key = (repr(model_cfg), micro_batch, text_len, blocks, caption_chunk_tokens, patch_dropout)
    if key not in _measured:
        _measured[key] = _saved_activation_bytes(model_cfg, micro_batch, text_len, checkpointing, caption_chunk_tokens,
                                                 patch_dropout)
    return _measured[key]


def _saved_activation_bytes(model_cfg, micro_batch, text_len, checkpointing, caption_chunk_tokens,
                            patch_dropout) -> int:
    from .losses import CoCaLoss
    from .models.coca import model_class
    with torch.device("meta"):
        model = model_class(model_cfg)(model_cfg).to(torch.bfloat16).train()
    model.set_grad_checkpointing(checkpointing)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    s = model_cfg.vision.image_size
    images = torch.empty(micro_batch, 3, s, s, device="meta", dtype=torch.bfloat16)
    tokens = torch.ones(micro_batch, text_len, device="meta", dtype=torch.long)
    saved: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            saved[storage._cdata] = (storage.nbytes(), t)  # keeps t alive, so ids are not reused
        return t

    loss = CoCaLoss(1.0, 1.0, model_cfg.text.pad_id, caption_chunk_tokens=caption_chunk_tokens,
                    lm_head_weight=model.text_decoder.lm_head.weight)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(model(images, tokens, return_logits=loss.wants_logits, patch_dropout=patch_dropout), tokens)
    return sum(n for n, _ in saved.values())


def plan(cfg: RunConfig, gpus: int, gpu_memory_gib: float, peak_tflops: float, mfu: float,
         samples: float | None = None, mean_caption_tokens: float | None = None) -> dict:
    from .models.coca import create_model
    from .summary import forward_flops, parameter_counts
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if peak_tflops <= 0 or gpu_memory_gib <= 0:
        raise UserError("--peak-tflops and --gpu-memory must be > 0")
    context = cfg.model.text.context_length
    mean_tokens = cfg.data.mean_caption_tokens if mean_caption_tokens is None else mean_caption_tokens
    if not 1 <= mean_tokens <= context:
        raise UserError(f"--mean-caption-tokens must be in [1, {context}] (the model's context), got {mean_tokens}")
    # packed text towers compute each caption's real tokens; padded ones the whole context
    text_tokens = min(float(mean_tokens), context) if cfg.train.pack_text else float(context)
    dropout, until = cfg.train.patch_dropout, cfg.train.patch_dropout_until
    micro, accum = cfg.data.batch_size, cfg.train.accum_steps
    global_batch = micro * accum * gpus
    model = create_model(cfg.model, device="meta")
    P = parameter_counts(model)["total"]
    # the step's FLOPs averaged over the run: masked for `until` of the steps, then unmasked
    masked = forward_flops(model, 1, text_tokens, dropout) if dropout else None
    unmasked = forward_flops(model, 1, text_tokens)
    flops = unmasked if masked is None else {k: until * masked[k] + (1 - until) * unmasked[k] for k in unmasked}
    fwd_flops_sample = flops["total"]
    # memory: the largest step, the unmasked one unless dropout lasts the whole run; the packed
    # micro-batch at the mean length rounded up (its token count varies by a few % between batches)
    text_len = math.ceil(text_tokens)
    memory_dropout = dropout if dropout and until >= 1 else 0.0
    # GradCache's first pass (accum_steps > 1): image and text encoders once more, without a graph
    # (under DeepSpeed the decoder too: its losses are checked before the backward that updates)
    grad_cache_sample = 0.0
    if accum > 1:
        grad_cache_sample = flops["total"] if cfg.train.engine == "deepspeed" else flops["total"] - flops["text_decoder"]
    mem = {
        "parameters (bf16)": 2 * P,
        "gradients (bf16 + fp32 partition)": 2 * P + 4 * P / gpus,
        "optimiser states (fp32 master, Adam m, v; partition)": 12 * P / gpus,
    }
    static = sum(mem.values())
    cap = gpu_memory_gib * GIB

    stacks = {"visual": cfg.model.vision.layers, "text_encoder": cfg.model.text.encoder_layers,
              "text_decoder": cfg.model.text.decoder_layers}
    every = max(stacks.values())
    act: dict[int, int] = {}  # checkpointed blocks per stack -> activation bytes (True is every block)

    def activations(blocks: bool | int) -> int:
        n = every if blocks is True else int(blocks)
        if n not in act:
            act[n] = saved_activation_bytes(cfg.model, micro, text_len, n, cfg.loss.caption_chunk_tokens,
                                            memory_dropout)
        return act[n]

    activations(0), activations(every)  # both always reported
    configured = cfg.train.activation_checkpointing
    # the fewest checkpointed blocks per stack whose total fits with 10% headroom (activations
    # shrink monotonically with more checkpointed blocks: a binary search over N)
    fits = lambda a: static + a <= 0.9 * cap  # noqa: E731
    fewest = None
    if fits(activations(0)):
        fewest = 0
    elif fits(activations(every)):
        lo, hi = 1, every  # hi fits
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(activations(mid)) else (mid + 1, hi)
        fewest = lo
    n_ckpt = every if configured is True else int(configured)
    recompute_sample = sum(flops[t] * min(n_ckpt, n) / n for t, n in stacks.items())
    if cfg.loss.caption_chunk_tokens:  # the chunked caption loss makes its logits again in backward
        t = cfg.model.text
        recompute_sample += 2 * text_tokens * t.d_model * t.vocab_size
    steps = cfg.train.steps if samples is None else max(1, round(samples / global_batch))
    samples = steps * global_batch
    step_flops = 3 * fwd_flops_sample * global_batch
    extra_flops = grad_cache_sample * global_batch
    recompute_flops = recompute_sample * global_batch
    step_time = (step_flops + extra_flops + recompute_flops) / (gpus * peak_tflops * 1e12 * mfu)
    warnings = []
    if cfg.data.kind == "webdataset" and not cfg.data.resampled:
        from .data.readers import expand_braces
        shards, consumers = len(expand_braces(cfg.data.train)), gpus * max(1, cfg.data.workers)
        if shards < consumers:
            warnings.append(f"data.train has {shards} shards for {gpus} GPUs x {max(1, cfg.data.workers)} data "
                            f"workers = {consumers} readers: some would get none; use more shards, fewer "
                            "data.workers, or data.resampled=true")
    return {
        "params": P, "gpus": gpus, "micro_batch": micro, "accum_steps": accum, "global_batch": global_batch,
        "memory_bytes": mem, "activations_bytes": act[0], "activations_checkpointed_bytes": act[every],
        "total_bytes": static + act[0], "total_checkpointed_bytes": static + act[every],
        "activation_checkpointing": configured, "activations_configured_bytes": activations(configured),
        "total_configured_bytes": static + activations(configured),
        "fewest_checkpointed_blocks": fewest,
        "fewest_checkpointed_activations_bytes": None if fewest is None else act[fewest],
        "gpu_memory_bytes": cap,
        "forward_flops_per_sample": fwd_flops_sample, "train_flops_per_step": step_flops,
        "grad_cache_flops_per_step": extra_flops, "recompute_flops_per_step": recompute_flops,
        "text_tokens_per_caption": text_tokens, "packed_text": cfg.train.pack_text,
        "patch_dropout": dropout, "patch_dropout_until": until, "memory_patch_dropout": memory_dropout,
        "mfu": mfu, "peak_tflops": peak_tflops, "step_time_s": step_time, "steps": steps, "samples": samples,
        "gpu_hours": step_time * steps * gpus / 3600, "wall_days": step_time * steps / 86400,
        "warnings": warnings,
    }


def format_plan(p: dict) -> str:
    g = lambda b: f"{b / GIB:8.1f} GiB"  # noqa: E731
    lines = [
        f"model: {p['params'] / 1e9:.3f}B parameters; {p['gpus']} GPUs x micro-batch {p['micro_batch']} x "
        f"{p['accum_steps']} accumulation step(s) = global batch {p['global_batch']:,}",
        "",
        "memory per GPU (DeepSpeed ZeRO-2, BF16):",
    ]
    for name, b in p["memory_bytes"].items():
        lines.append(f"  {name:<55}{g(b)}")
    lines.append(f"  {'activations, micro-batch ' + str(p['micro_batch']):<55}{g(p['activations_bytes'])}")
    lines.append(f"  {'activations with every block checkpointed':<55}{g(p['activations_checkpointed_bytes'])}")
    cap = p["gpu_memory_bytes"]
    totals = [("total", "total_bytes"), ("total with every block checkpointed", "total_checkpointed_bytes")]
    ac = p["activation_checkpointing"]
    if not isinstance(ac, bool):
        totals.append((f"total as configured ({ac} blocks per stack checkpointed)", "total_configured_bytes"))
    for label, key in totals:
        fits = "fits" if p[key] <= 0.9 * cap else "does NOT fit"
        lines.append(f"  {label:<55}{g(p[key])}   {fits} in {cap / GIB:.0f} GiB (with 10% headroom)")
    n = p["fewest_checkpointed_blocks"]
    lines.append("  fewest checkpointed blocks per stack that fit: " + (
        "none fits, even with every block checkpointed: lower data.batch_size (and raise train.accum_steps)"
        if n is None else f"{n} (train.activation_checkpointing: {n}; activations "
                          f"{p['fewest_checkpointed_activations_bytes'] / GIB:.1f} GiB)"))
    text = (f"packed text towers at {p['text_tokens_per_caption']:g} tokens per caption (data.mean_caption_tokens)"
            if p["packed_text"] else f"text towers padded to {p['text_tokens_per_caption']:g} tokens")
    if p["patch_dropout"]:
        text += (f"; patch dropout {p['patch_dropout']:g} for {p['patch_dropout_until']:.0%} of the steps"
                 + ("" if p["memory_patch_dropout"] else " (memory: the unmasked steps after it)"))
    lines += [
        "",
        f"compute, {text}:",
        f"  {p['forward_flops_per_sample'] / 1e9:.1f} GFLOPs forward per sample; "
        f"{p['train_flops_per_step'] / 1e15:.2f} PFLOPs per training step (3x forward)"
        + (f" + {p['recompute_flops_per_step'] / 1e15:.2f} PFLOPs recomputing checkpointed blocks"
           if p["recompute_flops_per_step"] else "")
        + (f" + {p['grad_cache_flops_per_step'] / 1e15:.2f} PFLOPs for GradCache's first pass"
           if p["grad_cache_flops_per_step"] else ""),
        f"  at {p['mfu']:.0%} MFU of {p['peak_tflops']:.0f} TFLOPS per GPU: {p['step_time_s']:.2f} s per step; "
        f"{p['steps']:,} steps = {p['samples'] / 1e9:.2f}B samples seen -> {p['gpu_hours']:,.0f} GPU-hours, "
        f"{p['wall_days']:.1f} days on {p['gpus']} GPUs",
    ]
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
