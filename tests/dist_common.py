"""The model, optimiser and global batch shared by tests/test_distributed.py and its rank workers."""

import torch

import coca
from coca.config import load_run_config

LR = 0.5  # plain SGD: the update is -LR x gradient, so any gradient scaling error shows in the weights
GLOBAL_BATCH = 8


def run_config(micro: int = 4, accum: int = 1):
    return load_run_config(None, ["model.text.vocab_size=64", "model.text.encoder_layers=1",
                                  "model.text.decoder_layers=1", "model.vision.layers=1",
                                  f"data.batch_size={micro}", f"train.accum_steps={accum}",
                                  "train.precision=fp32", "optim.grad_clip=0"])


def build():
    torch.manual_seed(0)
    model = coca.create_model(run_config().model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def global_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g)
    tokens = torch.zeros(GLOBAL_BATCH, 12, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        n = int(torch.randint(2, 11, (), generator=g))  # captions of different lengths
        tokens[i, :n] = torch.randint(3, 64, (n,), generator=g)
        tokens[i, n] = 1  # EOS
    return images, tokens


def reference_losses(out: dict, tokens: torch.Tensor) -> dict:
    """CoCa's loss on one batch, written out here independently of coca.losses: symmetric InfoNCE
    over the batch + token-mean caption cross-entropy (pad 0 ignored), weights 1 and 1."""
    F = torch.nn.functional
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    labels = torch.arange(logits.shape[0])
    con = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    cap = F.cross_entropy(out["logits"].flatten(0, 1), tokens.flatten(), ignore_index=0)
    return {"loss": con + cap, "contrastive_loss": con, "caption_loss": cap}


def single_process_step():
    """The reference: one process, the whole global batch, the loss written out by hand."""
    model, optimizer, _ = build()
    images, tokens = global_batch()
    losses = reference_losses(model(images, tokens), tokens)
    optimizer.zero_grad()
    losses["loss"].backward()
    optimizer.step()
    return {k: v.item() for k, v in losses.items()}, model.state_dict()
