"""The training loop: one process, one device. A run directory resumes itself.

    RUN_DIR/config.yaml          the resolved run config
    RUN_DIR/tokenizer.model      trained on the training captions unless data.tokenizer is given
    RUN_DIR/metrics.jsonl        one JSON line per logged step (and per validation)
    RUN_DIR/tb/                  TensorBoard events
    RUN_DIR/checkpoints/step_N/  the last train.keep_checkpoints checkpoints
    RUN_DIR/model/               the final model (save_pretrained layout, with the tokenizer)
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, RunConfig
from ..data.loader import train_batches, training_captions, val_batches
from ..io import atomic_write_text
from ..losses import CoCaLoss, contrastive_accuracy
from ..models.coca import create_model
from ..tokenizer import Tokenizer
from .checkpoint import (
    clean_temporaries,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .optim import build_optimizer, build_scheduler

MAX_NONFINITE_IN_A_ROW = 20


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def autocast(device: torch.device, precision: str):
    """BF16 autocast: matmuls in bf16, master weights, optimiser state and reductions in fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare_tokenizer(cfg: RunConfig, run_dir: Path, log) -> Tokenizer:
    ctx = cfg.model.text.context_length
    if cfg.data.tokenizer:
        tok = Tokenizer(cfg.data.tokenizer, context_length=ctx)
    elif (run_dir / "tokenizer.model").is_file():  # resumed run: keep the ids the weights were trained with
        tok = Tokenizer(run_dir / "tokenizer.model", context_length=ctx)
    else:
        t0 = time.time()
        tok = Tokenizer.train(training_captions(cfg.data, cfg.data.tokenizer_train_captions),
                              vocab_size=cfg.data.tokenizer_vocab_size, out_dir=run_dir, context_length=ctx,
                              model_type=cfg.data.tokenizer_model_type)
        log(f"trained a {tok.vocab_size}-piece SentencePiece tokenizer in {time.time() - t0:.1f}s -> {tok.path}")
    t = cfg.model.text
    if tok.vocab_size > t.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} ids but model.text.vocab_size is {t.vocab_size}; "
                          f"set model.text.vocab_size >= {tok.vocab_size}")
    if (tok.pad_id, tok.eos_id) != (t.pad_id, t.eos_id):
        raise ConfigError(f"tokenizer pad/eos ids ({tok.pad_id}, {tok.eos_id}) differ from the model's "
                          f"({t.pad_id}, {t.eos_id}); set model.text.pad_id / eos_id to match")
    return tok


class MetricsLog:
    """Appends JSON lines; on resume drops lines beyond the checkpoint so the file has no repeats."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _TensorBoard:
    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(log_dir))
            except ImportError:  # tensorboard not installed: JSONL metrics still have everything
                pass

    def scalars(self, record: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def validate(model, batches: list[dict], loss_fn, device, precision) -> dict:
    model.eval()
    totals, n = Counter(), 0
    for batch in batches:
        images, tokens = batch["images"].to(device), batch["tokens"].to(device)
        with autocast(device, precision):
            out = model(images, tokens)
            losses = loss_fn(out, tokens)
        i2t, t2i = contrastive_accuracy(out["image_embeds"], out["text_embeds"])
        totals.update({"val_loss": losses["loss"].item(), "val_contrastive_loss": losses["contrastive_loss"].item(),
                       "val_caption_loss": losses["caption_loss"].item(), "val_i2t_acc": i2t, "val_t2i_acc": t2i})
        n += 1
    model.train()
    return {k: v / n for k, v in totals.items()} if n else {}


def train(cfg: RunConfig, log=print) -> dict:
    """Train (or resume) the run in ``cfg.train.run_dir``; returns a summary dict."""
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)

    tokenizer = prepare_tokenizer(cfg, run_dir, log)
    model = create_model(cfg.model).to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.steps)
    loss_fn = CoCaLoss(cfg.loss.contrastive_weight, cfg.loss.caption_weight, cfg.model.text.pad_id)

    ckpt_root = run_dir / "checkpoints"
    clean_temporaries(ckpt_root)
    step, batches_done, skipped, nonfinite = 0, 0, Counter(), 0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_checkpoint(latest, model, device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        step, batches_done = state["step"], state["batches_done"]
        skipped, nonfinite = Counter(state["skipped"]), state.get("nonfinite_steps", 0)
        log(f"resumed from {latest} at step {step}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", step)
    tb = _TensorBoard(run_dir / "tb", tc.tensorboard)

    def checkpoint() -> Path:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "step": step, "batches_done": batches_done,
                 "skipped": dict(skipped), "nonfinite_steps": nonfinite}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        return save_checkpoint(ckpt_root, step, model, state, tc.keep_checkpoints)

    stop = {"signal": None}

    def on_sigterm(signum, frame):  # finish the current step, checkpoint, exit cleanly
        stop["signal"] = signum

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    batches = train_batches(cfg.data, cfg.model.vision.image_size, tokenizer, tc.seed, start=batches_done)
    val_set = val_batches(cfg.data, cfg.model.vision.image_size, tokenizer, tc.val_batches) if tc.val_every else []

    progress = None
    if tc.progress:
        from tqdm import tqdm
        progress = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t_start, window_t, window_samples = time.time(), time.time(), 0
    last = {}
    try:
        while step < tc.steps and stop["signal"] is None:
            batch = next(batches)
            batches_done += 1
            skipped.update(batch["skipped"])
            if batch["images"].shape[0] < 2:  # contrastive learning needs at least two pairs
                continue
            images = batch["images"].to(device, non_blocking=True)
            tokens = batch["tokens"].to(device, non_blocking=True)
            with autocast(device, tc.precision):
                out = model(images, tokens)
                losses = loss_fn(out, tokens)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(losses["loss"]):
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(f"{nonfinite} non-finite losses in a row at step {step}; "
                                             "lower optim.lr or check the data")
                continue
            nonfinite = 0
            losses["loss"].backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                         if cfg.optim.grad_clip > 0 else None)
            optimizer.step()
            scheduler.step()
            step += 1
            window_samples += images.shape[0]

            if step % tc.log_every == 0 or step == tc.steps:
                now = time.time()
                record = {"step": step, "loss": losses["loss"].item(),
                          "contrastive_loss": losses["contrastive_loss"].item(),
                          "caption_loss": losses["caption_loss"].item(),
                          "lr": scheduler.get_last_lr()[0], "logit_scale": out["logit_scale"].item(),
                          "grad_norm": None if grad_norm is None else grad_norm.item(),
                          "samples_per_s": window_samples / max(now - window_t, 1e-9),
                          "skipped": dict(skipped), "elapsed_s": now - t_start}
                metrics.write(record)
                tb.scalars(record, step)
                window_t, window_samples = now, 0
                last = record
                if progress is not None:
                    postfix = {"loss": f"{record['loss']:.3f}", "samples/s": f"{record['samples_per_s']:.0f}"}
                    if skipped:
                        postfix["skipped"] = sum(skipped.values())
                    progress.set_postfix(postfix, refresh=False)
            if progress is not None:
                progress.update(1)
            if tc.val_every and val_set and (step % tc.val_every == 0 or step == tc.steps):
                record = {"step": step, "split": "val", **validate(model, val_set, loss_fn, device, tc.precision)}
                metrics.write(record)
                tb.scalars(record, step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint()
        if stop["signal"] is not None:
            path = checkpoint()
            log(f"stopped by signal {stop['signal']} at step {step}; checkpoint {path}")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if progress is not None:
            progress.close()
        tb.close()

    summary = {"run_dir": str(run_dir), "step": step, "finished": step >= tc.steps,
               "skipped": dict(skipped), "last": last}
    if step >= tc.steps:
        model.eval()
        summary["model_dir"] = str(model.save_pretrained(run_dir / "model", tokenizer=tokenizer))
    if skipped:
        log(f"skipped samples by reason: {dict(skipped)}")
    return summary
