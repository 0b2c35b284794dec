"""Forward and backward of one optimiser step, on any engine: every engine's ``run_step`` calls
``forward_backward`` and then decides on the update itself.

With several micro-batches the step is GradCache (Gao et al. 2021): embed every micro-batch
without a graph, compute the contrastive loss over all of them (and all ranks) against leaf
copies of the embeddings to get d loss / d embedding, then re-run each micro-batch with a graph
and back-propagate ``<embedding, its gradient>`` plus its share of the caption loss. The global
contrastive batch is micro_batch x accum_steps x world_size, in the memory of one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..losses import CoCaLoss, Losses, contrastive_loss
from ..models.packing import TextPacking
from .distributed import global_sum


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs the model, fixed by the trainer for each step."""
    pack_text: bool = False      # text towers on the real tokens only (exact; ``coca.models.packing``)
    patch_dropout: float = 0.0   # share of patch tokens each image drops (FLIP); 0 once unmasked tuning starts
    attention_buckets: int = 1   # packed, kernel "groups": attention in this many groups of captions of similar length
    packed_attention: str = "groups"  # packed attention kernel (``TextPacking.of``): groups | flex

    def forward_kwargs(self, loss_fn: CoCaLoss, tokens: torch.Tensor) -> dict:
        # the packing is built here, outside a compiled model: its host read of the longest
        # caption would break the graph and specialise it on the length
        packing = TextPacking.of(tokens, loss_fn.pad_id, self.attention_buckets, self.packed_attention) \
            if self.pack_text else False
        return {"return_logits": loss_fn.wants_logits, "pack_text": packing, "patch_dropout": self.patch_dropout}


PADDED = StepOptions()


def attention_buckets(device: torch.device, compiled: bool) -> int:
    """Groups for packed attention: 4 on the CPU, where re-padding each quarter of the batch to its
    own longest caption measured faster than one width for all (``benchmarks/train_step.py
    --methods packed,packed_buckets``); one elsewhere (not yet measured on a GPU) and under
    ``torch.compile`` (the groups' widths would each become a guard of the compiled graph)."""
    return 4 if device.type == "cpu" and not compiled else 1


def packed_attention_kernel(setting: str, device: torch.device, text_dropout: float) -> str:
    """The packed attention kernel of ``train.packed_attention``: auto is "groups" (FlexAttention is
    not yet measured against it on a GPU); "flex" needs a GPU, FlexAttention having no backward on
    CPUs, and no attention dropout, which it does not apply."""
    if setting == "auto":
        return "groups"
    if setting == "flex" and device.type != "cuda":
        raise ConfigError(f"train.packed_attention=flex needs a CUDA device (FlexAttention has no backward on "
                         f"{device.type}); use 'groups' or 'auto'")
    if setting == "flex" and text_dropout > 0:
        raise ConfigError(f"train.packed_attention=flex applies no attention dropout, and model.text.dropout is "
                         f"{text_dropout}; use 'groups' or set the dropout to 0")
    return setting


@dataclass
class Pass:
    losses: Losses              # this rank's shares, detached
    logit_scale: torch.Tensor   # the (clamped) inverse temperature the step used
    rows: int                   # pairs on this rank
    backward_ran: bool          # False only with check_first: the loss was not finite on some rank


def all_ranks_finite(loss: torch.Tensor, world) -> bool:
    """Every rank's loss is finite: a host decision (a synchronisation), the same on every rank."""
    return global_sum(0 if torch.isfinite(loss) else 1, world, loss.device) == 0


def forward_backward(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: CoCaLoss,
                     options: StepOptions = PADDED, check_first: bool = False) -> Pass:
    """Forward + backward of every micro-batch, into gradients the caller zeroed. With
    ``check_first`` every rank agrees on the host that the step's loss is finite before any
    backward, and none runs when it is not (for an engine that updates inside backward). Without
    it the backward always runs and the engine decides on the update afterwards."""
    rows = sum(images.shape[0] for images, _ in micro_batches)
    if len(micro_batches) > 1:
        return _grad_cache_step(engine, micro_batches, loss_fn, options, rows, check_first)
    images, tokens = micro_batches[0]
    with engine.autocast():
        out = engine.forward(images, tokens, **options.forward_kwargs(loss_fn, tokens))
        losses = loss_fn(out, tokens)
    scale = out["logit_scale"].detach()
    if check_first and not all_ranks_finite(losses.loss, loss_fn.world):
        return Pass(_detached(losses), scale, rows, backward_ran=False)
    engine.backward(losses.loss)
    return Pass(_detached(losses), scale, rows, backward_ran=True)


def _detached(losses: Losses) -> Losses:
    return Losses(losses.loss.detach(), losses.contrastive.detach(), losses.caption.detach())


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _grad_cache_step(engine, micro_batches, loss_fn: CoCaLoss, options: StepOptions, rows: int, check_first: bool) -> Pass:
    model, world = engine.model, loss_fn.world
    pad, wc, wcap = loss_fn.pad_id, loss_fn.contrastive_weight, loss_fn.caption_weight
    device = micro_batches[0][0].device
    tokens_global = global_sum(sum(int((t != pad).sum()) for _, t in micro_batches), world, device)
    # To know that the step's loss is finite before the first backward (check_first), pass 1 runs
    # the whole forward (the decoder too, without a graph) to have every caption loss in hand.
    states, images_e, texts_e, caps = [], [], [], []
    # each micro-batch's packing built once, for both passes (each build reads lengths on the host)
    kwargs = [options.forward_kwargs(loss_fn, tokens) for _, tokens in micro_batches]
    with torch.no_grad():  # pass 1: embeddings (and, to check first, caption losses), no graph
        for m, (images, tokens) in enumerate(micro_batches):
            states.append(_rng_state())
            with engine.autocast():
                if check_first:
                    out = model(images, tokens, **kwargs[m])
                    img, txt = out["image_embeds"], out["text_embeds"]
                    caps.append(loss_fn.caption(out, tokens, tokens_global).float())
                else:  # the same patches as pass 2: the RNG state is restored there
                    img = model.encode_image(images, options.patch_dropout)
                    # tokenizer output: no id check, no sync
                    txt = model.encode_text(tokens, check_ids=False, pack_text=kwargs[m]["pack_text"])
            images_e.append(img.float())
            texts_e.append(txt.float())
    img_leaf = torch.cat(images_e).requires_grad_(True)
    txt_leaf = torch.cat(texts_e).requires_grad_(True)
    scale = model.contrastive_scale().detach().requires_grad_(True)
    con = contrastive_loss(img_leaf, txt_leaf, scale, world)
    if check_first:
        cap_sum = torch.stack(caps).sum()
        early = Losses(wc * con.detach() + wcap * cap_sum, con.detach(), cap_sum)
        if not all_ranks_finite(early.loss, world):
            return Pass(early, scale.detach(), rows, backward_ran=False)  # no backward ran: nothing to undo
    con.backward()
    d_img, d_txt = img_leaf.grad.split([e.shape[0] for e in images_e]), txt_leaf.grad.split([e.shape[0] for e in texts_e])
    d_scale = scale.grad

    cap_total = torch.zeros((), device=img_leaf.device)
    n = len(micro_batches)
    for m, (images, tokens) in enumerate(micro_batches):  # pass 2: re-run with a graph, inject gradients
        _set_rng_state(states[m])
        with engine.no_sync(m < n - 1), engine.autocast():
            out = engine.forward(images, tokens, **kwargs[m])
            cap = loss_fn.caption(out, tokens, tokens_global)
            surrogate = wc * ((out["image_embeds"].float() * d_img[m]).sum()
                              + (out["text_embeds"].float() * d_txt[m]).sum()
                              + out["logit_scale"] * d_scale / n) + wcap * cap
        with engine.no_sync(m < n - 1):
            engine.backward(surrogate)
        cap_total = cap_total + cap.detach()
    con = con.detach()
    losses = Losses(wc * con + wcap * cap_total, con, cap_total)
    return Pass(losses, scale.detach(), rows, backward_ran=True)
