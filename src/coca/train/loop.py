"""The training loop: one process, one device. A run directory resumes itself.

    RUN_DIR/config.yaml          the resolved run config
    RUN_DIR/tokenizer.model      trained on the training captions unless data.tokenizer is given
    RUN_DIR/metrics.jsonl        one JSON line per logged step (and per validation)
    RUN_DIR/tb/                  TensorBoard events
    RUN_DIR/checkpoints/step_N/  the last train.keep_checkpoints checkpoints
    RUN_DIR/model/               the final model (save_pretrained layout, with the tokenizer)
    RUN_DIR/init.json            with train.init_from: what was loaded, missing and unexpected
    RUN_DIR/best/                with train.best_metric: the best model so far, its eval.json beside it
"""

from __future__ import annotations

import dataclasses
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
from ..evaluate.tasks import Evaluation
from ..io import atomic_write_bytes, atomic_write_text
from ..losses import CoCaLoss, contrastive_accuracy
from ..models.coca import create_model
from ..tokenizer import Tokenizer
from .best import BestModel
from .checkpoint import (
    DS_TAG,
    clean_temporaries,
    consolidated_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_deepspeed_checkpoint,
)
from .distributed import (
    Engine,
    GlobalCoCaLoss,
    World,
    deepspeed_config,
    global_sum,
    grad_cache_step,
    init_world,
    shutdown,
)
from .optim import build_optimizer, build_scheduler, describe_groups, freeze
from .warmstart import init_tokenizer, load_init_weights

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
    elif cfg.train.init_from:  # the ids the loaded text weights were trained with; a copy keeps resume exact
        source = init_tokenizer(cfg.train.init_from)
        atomic_write_bytes(run_dir / "tokenizer.model", source.read_bytes())
        tok = Tokenizer(run_dir / "tokenizer.model", context_length=ctx)
        log(f"tokenizer from {source} ({tok.vocab_size} pieces)")
    else:
        t0 = time.time()
        tok = Tokenizer.train(training_captions(cfg.data, cfg.data.tokenizer_train_captions),
                              vocab_size=cfg.data.tokenizer_vocab_size, out_dir=run_dir, context_length=ctx,
                              model_type=cfg.data.tokenizer_model_type)
        log(f"trained a {tok.vocab_size}-piece SentencePiece tokenizer in {time.time() - t0:.1f}s -> {tok.path}")
    t = cfg.model.text
    if tok.vocab_size > t.vocab_size:
        fix = ("use the model directory's own tokenizer (leave data.tokenizer empty)" if cfg.train.init_from
               else f"set model.text.vocab_size >= {tok.vocab_size}")
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's vocabulary "
                          f"(model.text.vocab_size) is {t.vocab_size}; {fix}")
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
def validate(model, batches: list[dict], loss_fn, device, precision, input_dtype=None) -> dict:
    model.eval()
    totals, n = Counter(), 0
    for batch in batches:
        images, tokens = batch["images"].to(device, dtype=input_dtype), batch["tokens"].to(device)
        with torch.no_grad(), autocast(device, precision if input_dtype is None else "fp32"):
            out = model(images, tokens)
            losses = loss_fn(out, tokens)
        i2t, t2i = contrastive_accuracy(out["image_embeds"], out["text_embeds"])
        totals.update({"val_loss": losses["loss"].item(), "val_contrastive_loss": losses["contrastive_loss"].item(),
                       "val_caption_loss": losses["caption_loss"].item(), "val_i2t_acc": i2t, "val_t2i_acc": t2i})
        n += 1
    model.train()
    return {k: v / n for k, v in totals.items()} if n else {}


def run_evaluations(evaluations: list[Evaluation], model, tokenizer, log) -> dict:
    """``{"<name>.<metric>": value}`` of every evaluation, run in fp32 without autocast exactly as
    `coca eval` runs it; an evaluation that fails (e.g. no image readable any more) is logged and
    recorded as ``"<name>.error"`` instead of stopping the run."""
    out = {}
    for evaluation in evaluations:
        t0 = time.time()
        try:
            result = evaluation.run(model, tokenizer)
        except (ValueError, OSError) as e:
            log(f"evaluation {evaluation.cfg.name} failed: {e}")
            out[f"{evaluation.cfg.name}.error"] = str(e)
            continue
        out.update(result.prefixed())
        out[f"{evaluation.cfg.name}.time_s"] = round(time.time() - t0, 2)
        log(f"eval {evaluation.cfg.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                                                       if not k.startswith("n_")))
    return out


def _barrier(world: World) -> None:
    if world.parallel:
        torch.distributed.barrier()


def train(cfg: RunConfig, log=print) -> dict:
    """Train (or resume) the run in ``cfg.train.run_dir``; returns a summary dict.

    With ``train.engine`` ddp or deepspeed every process of the launch runs this function; rank 0
    writes the logs, the config and the final model, and all ranks take part in checkpoints.
    """
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    device = resolve_device(tc.device)
    world = init_world(tc.engine, device.type)
    if device.type == "cuda" and world.parallel:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    main = world.is_main
    say = log if main else (lambda *a, **k: None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    evaluations = [Evaluation(e) for e in tc.eval]  # reads every eval input now: a bad file fails before step 1
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank

    if main:
        tokenizer = prepare_tokenizer(cfg, run_dir, say)
    _barrier(world)
    if not main:  # rank 0 trained or found the tokenizer; the others read the same file
        tokenizer = prepare_tokenizer(cfg, run_dir, say)
    model = create_model(cfg.model).to(device).train()
    ckpt_root = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root)
    if tc.init_from and latest is None:  # a resumed run continues from its checkpoint instead
        report = load_init_weights(model, tc.init_from, tc.init_strict)
        for line in report.lines():
            say(line)
        if main:
            atomic_write_text(run_dir / "init.json", json.dumps(dataclasses.asdict(report), indent=1) + "\n")
    if tc.activation_checkpointing:
        model.set_grad_checkpointing(True)
    freeze(model, cfg.optim.freeze)
    optimizer = build_optimizer(model, cfg.optim)
    for line in describe_groups(optimizer.param_groups, model, cfg.optim):
        say(line)
    best = BestModel(run_dir / "best", tc.best_metric, tc.best_mode) if tc.best_metric and main else None
    scheduler = build_scheduler(optimizer, cfg.optim, tc.steps)
    ds_config = None
    if tc.engine == "deepspeed":
        ds_config = deepspeed_config(cfg, world, tc.deepspeed_config)
        if main:
            atomic_write_text(run_dir / "deepspeed_config.json", json.dumps(ds_config, indent=1) + "\n")
    engine = Engine(tc.engine, model, optimizer, scheduler, device, ds_config)
    input_dtype = torch.bfloat16 if ds_config and ds_config.get("bf16", {}).get("enabled") else None
    # DeepSpeed BF16 holds bf16 weights (fp32 master copies in the optimiser): no autocast there
    precision = "fp32" if input_dtype is not None else tc.precision
    loss_fn = GlobalCoCaLoss(cfg.loss.contrastive_weight, cfg.loss.caption_weight, cfg.model.text.pad_id, world)
    val_loss_fn = CoCaLoss(cfg.loss.contrastive_weight, cfg.loss.caption_weight, cfg.model.text.pad_id)

    if main:
        clean_temporaries(ckpt_root)
    _barrier(world)
    step, batches_done, skipped, nonfinite = 0, 0, Counter(), 0
    if latest is not None:
        if engine.kind == "deepspeed":
            _, state = engine.wrapped.load_checkpoint(str(latest), tag=DS_TAG)
        else:
            state = load_checkpoint(latest, model, device)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        step, batches_done = state["step"], state["batches_done"]
        skipped, nonfinite = Counter(state["skipped"]), state.get("nonfinite_steps", 0)
        say(f"resumed from {latest} at step {step}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", step) if main else None
    tb = _TensorBoard(run_dir / "tb", tc.tensorboard and main)

    def checkpoint() -> Path:
        state = {"rng_cpu": torch.get_rng_state(), "step": step, "batches_done": batches_done,
                 "skipped": dict(skipped), "nonfinite_steps": nonfinite}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        if engine.kind == "deepspeed":
            return save_deepspeed_checkpoint(ckpt_root, step, engine.wrapped, state, tc.keep_checkpoints, world)
        path = ckpt_root / f"step_{step:08d}"
        if main:
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
            path = save_checkpoint(ckpt_root, step, model, state, tc.keep_checkpoints)
        _barrier(world)
        return path

    def evaluate(at_step: int) -> None:
        """Every train.eval task on rank 0 (the other ranks wait); the best model kept."""
        if main:
            record = {"step": at_step, "split": "eval",
                      **run_evaluations(evaluations, model, tokenizer, say)}
            metrics.write(record)
            tb.scalars(record, at_step)
            if best is not None and best.update(record, at_step):
                best.save(model, tokenizer, record, at_step)
                say(f"best {tc.best_metric} so far: {record[tc.best_metric]:.4f} at step {at_step} -> {best.path}")
            model.train()
        _barrier(world)

    stop = {"signal": None}

    def on_sigterm(signum, frame):  # finish the current step, checkpoint, exit cleanly
        stop["signal"] = signum

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    batches = train_batches(cfg.data, cfg.model.vision.image_size, tokenizer, tc.seed, start=batches_done,
                            rank=world.rank, world_size=world.world_size)
    val_set = (val_batches(cfg.data, cfg.model.vision.image_size, tokenizer, tc.val_batches)
               if tc.val_every and main else [])

    progress = None
    if tc.progress and main:
        from tqdm import tqdm
        progress = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t_start, window_t, window_samples = time.time(), time.time(), 0
    last = {}
    try:
        while step < tc.steps and not _agreed_stop(stop["signal"] is not None, world, device):
            micro = []
            for _ in range(tc.accum_steps):
                batch = next(batches)
                batches_done += 1
                skipped.update(batch["skipped"])
                micro.append((batch["images"].to(device, dtype=input_dtype, non_blocking=True),
                              batch["tokens"].to(device, non_blocking=True)))
            rows = sum(images.shape[0] for images, _ in micro)
            if global_sum(rows, world, device) < 2:  # contrastive learning needs at least two pairs
                continue
            engine.zero_grad()
            if tc.accum_steps == 1:
                with autocast(device, precision):
                    out = engine.forward(*micro[0])
                    losses = loss_fn(out, micro[0][1])
            else:  # GradCache runs its own backward passes
                losses = grad_cache_step(engine, micro, loss_fn, lambda: autocast(device, precision))
                out = losses.pop("_out")
            finite = global_sum(0 if torch.isfinite(losses["loss"]) else 1, world, device) == 0
            if finite and tc.accum_steps == 1:
                engine.backward(losses["loss"])
            if not finite:
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(f"{nonfinite} non-finite losses in a row at step {step}; "
                                             "lower optim.lr or check the data")
                engine.zero_grad()
                continue
            nonfinite = 0
            grad_norm = engine.step(cfg.optim.grad_clip)
            step += 1
            window_samples += rows

            if step % tc.log_every == 0 or step == tc.steps:
                # each rank holds its share of the global loss; their mean is the global-batch loss
                shares = {k: global_sum(losses[k].item(), world, device) / world.world_size
                          for k in ("loss", "contrastive_loss", "caption_loss")}
                samples = global_sum(window_samples, world, device)
                now = time.time()
                record = {"step": step, **shares, "lr": engine.last_lr(), "logit_scale": out["logit_scale"].item(),
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "samples_per_s": samples / max(now - window_t, 1e-9),
                          "skipped": dict(skipped), "elapsed_s": now - t_start}
                window_t, window_samples = now, 0
                last = record
                if main:
                    metrics.write(record)
                    tb.scalars(record, step)
                if progress is not None:
                    postfix = {"loss": f"{record['loss']:.3f}", "samples/s": f"{record['samples_per_s']:.0f}"}
                    if skipped:
                        postfix["skipped"] = sum(skipped.values())
                    progress.set_postfix(postfix, refresh=False)
            if progress is not None:
                progress.update(1)
            if val_set and (step % tc.val_every == 0 or step == tc.steps):
                record = {"step": step, "split": "val",
                          **validate(model, val_set, val_loss_fn, device, precision, input_dtype)}
                metrics.write(record)
                tb.scalars(record, step)
            if evaluations and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                evaluate(step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint()
        if evaluations and step >= tc.steps:
            evaluate(step)  # at the end (also of a run of 0 steps: the loaded model's numbers)
        if stop["signal"] is not None or (step < tc.steps):
            path = checkpoint()
            say(f"stopped by signal at step {step}; checkpoint {path}")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if progress is not None:
            progress.close()
        tb.close()

    summary = {"run_dir": str(run_dir), "step": step, "finished": step >= tc.steps,
               "skipped": dict(skipped), "last": last}
    if step >= tc.steps:
        model_dir = run_dir / "model"
        if engine.kind == "deepspeed":
            if main:
                consolidated_model(latest_checkpoint(ckpt_root), cfg.model).save_pretrained(model_dir, tokenizer=tokenizer)
        elif main:
            model.eval()
            model.save_pretrained(model_dir, tokenizer=tokenizer)
        _barrier(world)
        summary["model_dir"] = str(model_dir)
    if skipped:
        say(f"skipped samples by reason: {dict(skipped)}")
    if tc.engine != "single":
        shutdown(world)
    return summary


def _agreed_stop(local_stop: bool, world: World, device) -> bool:
    """A SIGTERM seen by any rank stops every rank at the same step."""
    return global_sum(1 if local_stop else 0, world, device) > 0
