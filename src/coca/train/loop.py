"""The trainer: build, resume, step, log, validate, evaluate, checkpoint, export. One process or
every rank of a DDP / DeepSpeed launch runs it; the engine (``engines.py``) owns what differs
between backends, so nothing here asks which one it has. A run directory (its names in
``coca.layout.RunLayout``) resumes itself:

    RUN_DIR/config.yaml          the resolved run config
    RUN_DIR/tokenizer.model      data.tokenizer, the init_from directory's, or one trained on the captions
    RUN_DIR/metrics.jsonl        one JSON line per logged step, validation ("split": "val") and evaluation ("eval")
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
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, RunConfig
from ..data.loader import train_batches, training_captions, val_batches
from ..errors import TrainingDiverged, UserError
from ..evaluate.tasks import Evaluation
from ..io import atomic_write_bytes, atomic_write_text
from ..layout import RunLayout, step_name
from ..losses import CoCaLoss, contrastive_accuracy
from ..models.coca import create_model
from ..tokenizer import Tokenizer
from .best import BestModel
from .checkpoint import (
    checkpoint_dirs,
    clean_temporaries,
    is_damage,
    latest_checkpoint,
    set_aside,
)
from .distributed import World, barrier, global_sum, init_world, shutdown
from .engines import Engine, Outcome, engine_for_run
from .metrics import MetricsLog, TensorBoard
from .optim import build_optimizer, build_scheduler, describe_groups, freeze
from .precision import resolve_device, resolve_precision
from .run_lock import RunLock, in_use_error
from .step import StepOptions, attention_buckets, packed_attention_kernel
from .warmstart import init_tokenizer, load_init_weights

MAX_NONFINITE_IN_A_ROW = 20
# Steps in a row whose batches hold too few valid samples before the run stops: data that is
# all bad must end with a clear error, never loop forever. A stream with some bad samples
# recovers long before (at half the samples bad, 2 pairs short 50 times in a row is ~1e-15).
MAX_SHORT_STEPS_IN_A_ROW = 50


def prepare_tokenizer(cfg: RunConfig, layout: RunLayout, log) -> Tokenizer:
    ctx = cfg.model.text.context_length
    if cfg.model.family == "open_clip":
        tok = clip_tokenizer(cfg, layout, log)
    elif layout.tokenizer.is_file() and (not cfg.data.tokenizer or same_tokenizer(layout, layout.tokenizer,
                                                                                   Path(cfg.data.tokenizer))):
        tok = Tokenizer(layout.tokenizer, context_length=ctx)  # resumed run: the ids the weights were trained with
    elif cfg.data.tokenizer:  # kept in the run directory: a resume can tell if it changed
        Tokenizer(cfg.data.tokenizer, context_length=ctx)  # a bad file fails here, before it is copied
        atomic_write_bytes(layout.tokenizer, Path(cfg.data.tokenizer).read_bytes())
        tok = Tokenizer(layout.tokenizer, context_length=ctx)
    elif cfg.train.init_from:  # the ids the loaded text weights were trained with; a copy keeps resume exact
        source = init_tokenizer(cfg.train.init_from)
        atomic_write_bytes(layout.tokenizer, source.read_bytes())
        tok = Tokenizer(layout.tokenizer, context_length=ctx)
        log(f"tokenizer from {source} ({tok.vocab_size} pieces)")
    else:
        t0 = time.time()
        try:
            tok = Tokenizer.train(training_captions(cfg.data, cfg.data.tokenizer_train_captions),
                                  vocab_size=cfg.data.tokenizer_vocab_size, out_dir=layout.root, context_length=ctx,
                                  model_type=cfg.data.tokenizer_model_type)
        except UserError as e:
            raise UserError(f"tokenizer training on data.train={cfg.data.train!r} ({cfg.data.kind}): {e}") from None
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


def fingerprint(path: Path) -> str:
    """A tokenizer file's identity: the start of its SHA-256."""
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def same_tokenizer(layout: RunLayout, kept: Path, given: Path) -> bool:
    """Whether ``given`` (data.tokenizer) is the run's own copy ``kept``. A run with a checkpoint
    refuses another one: its weights learnt what the kept ids mean; before the first checkpoint the
    given one replaces the copy (False)."""
    if not given.is_file():
        return False  # the caller reports the missing file
    if fingerprint(given) == fingerprint(kept):
        return True
    if latest_checkpoint(layout.checkpoints) is None:
        return False
    raise ConfigError(f"data.tokenizer {str(given)!r} (fingerprint {fingerprint(given)}) is not the tokenizer this "
                      f"run's checkpoints were trained with, {kept} (fingerprint {fingerprint(kept)}): its ids would "
                      "mean other pieces to the weights. Resume with that one (data.tokenizer set to it, or left "
                      "empty), or start a new train.run_dir")


def clip_tokenizer(cfg: RunConfig, layout: RunLayout, log):
    """The open_clip family's tokenizer, CLIP's: its merges file from data.tokenizer, a resumed
    run's copy, the init_from directory, or the installed open_clip package, kept in the run
    directory (a copy keeps resume exact). It is never trained."""
    from ..clip_tokenizer import VOCAB_FILE, CLIPTokenizer, packaged_vocab
    kept, ctx = layout.root / VOCAB_FILE, cfg.model.text.context_length
    if kept.is_file() and (not cfg.data.tokenizer or same_tokenizer(layout, kept, Path(cfg.data.tokenizer))):
        return CLIPTokenizer(kept, ctx)
    init = Path(cfg.train.init_from) / VOCAB_FILE if cfg.train.init_from else None
    source = Path(cfg.data.tokenizer) if cfg.data.tokenizer else init if init is not None and init.is_file() \
        else packaged_vocab()
    if source is None:
        raise ConfigError(f"the open_clip family uses CLIP's tokenizer: set data.tokenizer to its {VOCAB_FILE} "
                          "(a converted model directory holds one), or install open_clip_torch, which ships it")
    CLIPTokenizer(source, ctx)  # a bad file fails here, before it is copied
    atomic_write_bytes(kept, source.read_bytes())
    log(f"tokenizer: CLIP's BPE from {source}")
    return CLIPTokenizer(kept, ctx)


@torch.no_grad()
def validate(engine, batches: list[dict], loss_fn: CoCaLoss) -> dict:
    """Mean losses and in-batch retrieval accuracy over a fixed validation set (one process)."""
    model = engine.model
    model.eval()
    totals, n = Counter(), 0
    for batch in batches:
        images = batch["images"].to(engine.device, dtype=engine.input_dtype)
        tokens = batch["tokens"].to(engine.device)
        with engine.autocast():
            out = model(images, tokens, return_logits=loss_fn.wants_logits)
            losses = loss_fn(out, tokens)
        i2t, t2i = contrastive_accuracy(out["image_embeds"], out["text_embeds"])
        totals.update({f"val_{k}": v for k, v in losses.as_floats().items()})
        totals.update({"val_i2t_acc": i2t, "val_t2i_acc": t2i})
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
        except UserError as e:  # bad input (an image set no longer readable); a bug still raises
            log(f"evaluation {evaluation.cfg.name} failed: {e}")
            out[f"{evaluation.cfg.name}.error"] = str(e)
            continue
        out.update(result.prefixed())
        out[f"{evaluation.cfg.name}.time_s"] = round(time.time() - t0, 2)
        log(f"eval {evaluation.cfg.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                                                       if not k.startswith("n_")))
    return out


@dataclasses.dataclass
class Progress:
    """What a checkpoint stores besides weights and optimiser: where the run is."""

    step: int = 0
    batches_done: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass
class TrainingParts:
    """What ``Trainer.build`` puts together for a run."""

    world: World
    device: torch.device
    tokenizer: Tokenizer
    model: torch.nn.Module           # the plain CoCa module (the engine may run a wrapped one)
    engine: Engine
    loss_fn: CoCaLoss                # the training loss, over every rank's batch
    val_loss_fn: CoCaLoss            # validation, on rank 0 alone
    evaluations: list[Evaluation]
    best: BestModel | None           # rank 0, with train.best_metric
    packed_attention: str = "groups"  # the kernel of ``train.packed_attention`` on this device


class Trainer:
    def __init__(self, cfg: RunConfig, log=print):
        self.cfg, self.tc = cfg, cfg.train
        self.layout = RunLayout(self.tc.run_dir)
        self.run_dir, self.ckpt_root = self.layout.root, self.layout.checkpoints
        self._log = log
        self.progress = Progress()
        self.stop_signal = None
        self.short_steps = 0  # steps in a row with too few valid samples
        self.parts: TrainingParts | None = None  # build()'s, set by setup()
        self.lock = RunLock(self.layout.root)  # held from build() to the end of fit()

    def say(self, *args) -> None:
        if self.parts is None or self.parts.world.is_main:
            self._log(*args)

    def setup(self) -> None:
        """Build the run's parts, then resume from its newest checkpoint (if any)."""
        self.parts = self.build()
        self.resume()

    # --- build ---------------------------------------------------------------------------------
    def build(self) -> TrainingParts:
        cfg, tc, layout = self.cfg, self.tc, self.layout
        device = resolve_device(tc.device)
        world = init_world(tc.engine, device.type)
        if device.type == "cuda" and world.parallel:
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        main = world.is_main
        say = self._log if main else (lambda *args: None)
        packed_attention = packed_attention_kernel(tc.packed_attention, device, cfg.model.text.dropout)
        # rank 0 locks the run directory for the whole launch, before anything is written there
        holder = self.lock.acquire() if main else None
        if global_sum(0 if holder is None else 1, world, device) > 0:
            raise in_use_error(layout.root, holder or "the process holding rank 0's lock")
        if tc.precision == "auto":  # decided here, and saved in config.yaml as decided
            tc.precision = resolve_precision(tc.precision, device)
            say(f"train.precision=auto: {tc.precision} on this {device.type}")
        if main:
            layout.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(layout.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        evaluations = [Evaluation(e) for e in tc.eval]  # reads every eval input now: a bad file fails before step 1
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank

        if main:
            tokenizer = prepare_tokenizer(cfg, layout, say)
        barrier(world)
        if not main:  # rank 0 trained or found the tokenizer; the others read the same file
            tokenizer = prepare_tokenizer(cfg, layout, say)

        model = create_model(cfg.model).to(device).train()
        if tc.init_from and latest_checkpoint(layout.checkpoints) is None:  # a resumed run has its checkpoint
            report = load_init_weights(model, tc.init_from, tc.init_strict)
            for line in report.lines():
                say(line)
            if main:
                atomic_write_text(layout.init_report, json.dumps(dataclasses.asdict(report), indent=1) + "\n")
        model.set_grad_checkpointing(tc.activation_checkpointing)
        freeze(model, cfg.optim.freeze)
        optimizer = build_optimizer(model, cfg.optim)
        for line in describe_groups(optimizer.param_groups, model, cfg.optim):
            say(line)
        scheduler = build_scheduler(optimizer, cfg.optim, tc.steps)
        engine = engine_for_run(cfg, model, optimizer, scheduler, device, world, layout)
        lc, pad, head = cfg.loss, cfg.model.text.pad_id, model.text_decoder.lm_head.weight
        return TrainingParts(
            world=world, device=device, tokenizer=tokenizer, model=model, engine=engine,
            loss_fn=CoCaLoss(lc.contrastive_weight, lc.caption_weight, pad, world, lc.caption_chunk_tokens, head),
            val_loss_fn=CoCaLoss(lc.contrastive_weight, lc.caption_weight, pad,
                                 caption_chunk_tokens=lc.caption_chunk_tokens, lm_head_weight=head),
            evaluations=evaluations,
            best=BestModel(layout.best, tc.best_metric, tc.best_mode) if tc.best_metric and main else None,
            packed_attention=packed_attention)

    # --- resume --------------------------------------------------------------------------------
    def resume(self) -> None:
        if self.parts.world.is_main:
            clean_temporaries(self.ckpt_root)
        barrier(self.parts.world)
        latest = self.load_newest_checkpoint()
        if latest is not None:
            self.say(f"resumed from {latest} at step {self.progress.step}")
        main = self.parts.world.is_main
        self.metrics = MetricsLog(self.layout.metrics, self.progress.step, self.say) if main else None
        self.tb = TensorBoard(self.layout.tensorboard, self.tc.tensorboard and main)

    def load_newest_checkpoint(self) -> Path | None:
        """Restore the newest checkpoint that loads. A damaged one (truncated, garbled, a file
        missing) is set aside with a warning and the one before it is tried; every rank takes the
        same decision. None when there is no checkpoint; an error when none of them loads."""
        candidates = checkpoint_dirs(self.ckpt_root)[::-1]
        set_aside_to = []
        for path in candidates:
            try:
                state = self.parts.engine.load(path)
                rng = state["rng_cpu"]
                progress = Progress(state["step"], state["batches_done"], Counter(state["skipped"]))
                nonfinite = state.get("nonfinite_steps", 0)
                error = None
            except Exception as e:  # noqa: BLE001 - sorted by is_damage below
                if not is_damage(e):
                    raise
                error = e
            if global_sum(0 if error is None else 1, self.parts.world, self.parts.device) == 0:
                torch.set_rng_state(rng)
                if self.parts.device.type == "cuda" and "rng_cuda" in state:
                    torch.cuda.set_rng_state(state["rng_cuda"], self.parts.device)
                self.progress = progress
                self.parts.engine.streak.restore(nonfinite)
                return path
            barrier(self.parts.world)  # every rank is done reading it before it moves
            if self.parts.world.is_main:
                moved = set_aside(path)
                set_aside_to.append(str(moved))
                reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
                self.say(f"warning: checkpoint {path} does not load ({reason[:300]}); moved aside to {moved}")
            barrier(self.parts.world)
        if candidates:
            raise UserError(f"no checkpoint in {self.ckpt_root} loads; the damaged ones were moved aside "
                            f"({', '.join(set_aside_to) or 'on rank 0'}); a rerun starts the run from step 0")
        return None

    # --- one step ------------------------------------------------------------------------------
    def next_micro_batches(self, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        micro = []
        for _ in range(self.tc.accum_steps):
            batch = next(batches)
            self.progress.batches_done += 1
            self.progress.skipped.update(batch["skipped"])
            micro.append((batch["images"].to(self.parts.device, dtype=self.parts.engine.input_dtype, non_blocking=True),
                          batch["tokens"].to(self.parts.device, non_blocking=True)))
        return micro

    def train_step(self, micro) -> Outcome | None:
        """One optimiser step; None when it was skipped (too few pairs, or a non-finite loss seen
        on the host)."""
        rows = sum(images.shape[0] for images, _ in micro)
        # contrastive learning needs two pairs; a caption-only run, one
        needed = 2 if self.cfg.loss.contrastive_weight > 0 else 1
        if global_sum(rows, self.parts.world, self.parts.device) < needed:
            self.short_steps += 1
            if self.short_steps >= MAX_SHORT_STEPS_IN_A_ROW:
                raise UserError(f"{self.short_steps} steps in a row had fewer than {needed} valid samples "
                                f"(data.kind={self.cfg.data.kind}, data.train={self.cfg.data.train!r}); samples "
                                f"skipped so far by reason: {dict(self.progress.skipped) or 'none'}")
            return None
        self.short_steps = 0
        outcome = self.parts.engine.run_step(micro, self.parts.loss_fn, self.step_options())
        if not outcome.counted:
            self.nonfinite_in_a_row()
            return None
        self.progress.step += 1
        return outcome

    def step_options(self) -> StepOptions:
        """Packing as configured; patch dropout until ``patch_dropout_until`` of the steps, then none."""
        tc = self.tc
        masked = self.progress.step < tc.patch_dropout_until * tc.steps
        # the open_clip family runs its text at full length (the CLS's position depends on it)
        pack = tc.pack_text and self.cfg.model.family == "t5"
        return StepOptions(pack_text=pack, patch_dropout=tc.patch_dropout if masked else 0.0,
                           attention_buckets=attention_buckets(self.parts.device, tc.compile),
                           packed_attention=self.parts.packed_attention)

    # --- log, validate, evaluate ---------------------------------------------------------------
    def log_step(self, result: Outcome, samples: int, elapsed: float) -> dict:
        """The metrics line of a log step: each rank holds its share of the global loss, their
        mean is the global-batch loss."""
        world, step = self.parts.world, self.progress.step
        nonfinite = self.nonfinite_in_a_row()
        shares = {k: global_sum(v, world, self.parts.device) / world.world_size for k, v in result.losses.as_floats().items()}
        record = {"step": step, **shares, "lr": self.parts.engine.last_lr(), "logit_scale": float(result.logit_scale),
                  "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
                  "samples_per_s": global_sum(samples, world, self.parts.device) / max(elapsed, 1e-9),
                  "skipped": dict(self.progress.skipped), "nonfinite_in_a_row": nonfinite,
                  "elapsed_s": time.time() - self.t_start}
        self.write(record)
        return record

    def nonfinite_in_a_row(self) -> int:
        """The engine's count of non-finite steps in a row (on the device for engines that decide
        there: a synchronisation, so at log steps, checkpoints and host-seen skips only); too many
        in a row stop the run."""
        n = self.parts.engine.streak.value()
        if n >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingDiverged(f"{n} non-finite losses in a row by step {self.progress.step}; "
                                   "lower optim.lr or check the data")
        return n

    def write(self, record: dict) -> None:
        if self.parts.world.is_main:
            self.metrics.write(record)
            self.tb.scalars(record, record["step"])

    def validate(self, val_set: list[dict]) -> None:
        self.write({"step": self.progress.step, "split": "val", **validate(self.parts.engine, val_set, self.parts.val_loss_fn)})

    def evaluate(self) -> None:
        """Every train.eval task on rank 0 (the other ranks wait); the best model kept."""
        step = self.progress.step
        if self.parts.world.is_main:
            record = {"step": step, "split": "eval", **run_evaluations(self.parts.evaluations, self.parts.model, self.parts.tokenizer, self.say)}
            self.write(record)
            if self.parts.best is not None and self.tc.best_metric not in record:
                self.say(f"warning: train.best_metric {self.tc.best_metric} is not among this evaluation's "
                         "metrics (it failed or does not report it); best/ was not updated")
            if self.parts.best is not None and self.parts.best.update(record, step):
                self.parts.best.save(self.parts.model, self.parts.tokenizer, record, step)
                self.say(f"best {self.tc.best_metric} so far: {record[self.tc.best_metric]:.4f} at step {step} "
                         f"-> {self.parts.best.path}")
            self.parts.model.train()
        barrier(self.parts.world)

    # --- checkpoint, export --------------------------------------------------------------------
    def checkpoint(self) -> Path:
        p = self.progress
        state = {"rng_cpu": torch.get_rng_state(), "step": p.step, "batches_done": p.batches_done,
                 "skipped": dict(p.skipped), "nonfinite_steps": self.nonfinite_in_a_row()}
        if self.parts.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.parts.device)
        return self.parts.engine.save(self.ckpt_root, p.step, state, self.tc.keep_checkpoints)

    def export(self) -> Path:
        return self.parts.engine.export(self.layout.model, self.parts.tokenizer, self.ckpt_root, self.cfg.model)

    # --- the loop ------------------------------------------------------------------------------
    def agreed_stop(self) -> bool:
        """A SIGTERM seen by any rank stops every rank at the same step."""
        return global_sum(1 if self.stop_signal is not None else 0, self.parts.world, self.parts.device) > 0

    def fit(self) -> dict:
        """Train (or resume) the run in ``train.run_dir``; returns a summary dict. The run
        directory is locked meanwhile (``run_lock``): a second run on it refuses at once."""
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> dict:
        tc = self.tc
        self.setup()

        def on_stop(signum, frame):  # finish the current step, checkpoint, exit cleanly
            # (nothing printed here: a handler that interrupts a print and prints itself can fail)
            if signum == signal.SIGINT and self.stop_signal is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once, no checkpoint
            self.stop_signal = signum

        previous_handlers = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        p, main = self.progress, self.parts.world.is_main
        batches = train_batches(self.cfg.data, self.cfg.model.vision.image_size, self.parts.tokenizer, tc.seed,
                                start=p.batches_done, rank=self.parts.world.rank, world_size=self.parts.world.world_size)
        val_set = (val_batches(self.cfg.data, self.cfg.model.vision.image_size, self.parts.tokenizer, tc.val_batches)
                   if tc.val_every and main else [])
        bar = None
        if tc.progress and main:
            from ..progress import progress_bar
            bar = progress_bar(tc.steps, desc="train", unit="step", initial=p.step)
        self.t_start = window_t = time.time()
        window_samples, last = 0, {}
        try:
            while p.step < tc.steps and not self.agreed_stop():
                result = self.train_step(self.next_micro_batches(batches))
                if result is None:
                    continue
                window_samples += result.rows
                step = p.step
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.time()
                    last = self.log_step(result, window_samples, now - window_t)
                    window_t, window_samples = now, 0
                    if bar is not None:
                        postfix = {"loss": f"{last['loss']:.3f}", "samples/s": f"{last['samples_per_s']:.0f}"}
                        if p.skipped:
                            postfix["skipped"] = sum(p.skipped.values())
                        bar.set_postfix(postfix, refresh=False)
                if bar is not None:
                    bar.update(1)
                if val_set and (step % tc.val_every == 0 or step == tc.steps):
                    self.validate(val_set)
                if self.parts.evaluations and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    self.evaluate()
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    self.checkpoint()
            if self.parts.evaluations and p.step >= tc.steps:
                self.evaluate()  # at the end (also of a run of 0 steps: the loaded model's numbers)
            if p.step < tc.steps:  # stopped early (agreed by all ranks): save where it stopped
                latest = latest_checkpoint(self.ckpt_root)
                path = latest if latest is not None and latest.name == step_name(p.step) else self.checkpoint()
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal on another rank"
                self.say(f"stopped by signal ({name}) at step {p.step}; checkpoint {path}")
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            if bar is not None:
                bar.close()
            self.tb.close()

        summary = {"run_dir": str(self.run_dir), "step": p.step, "finished": p.step >= tc.steps,
                   "skipped": dict(p.skipped), "last": last}
        if p.step >= tc.steps:
            summary["model_dir"] = str(self.export())
        if p.skipped:
            self.say(f"skipped samples by reason: {dict(p.skipped)}")
        if self.parts.world.parallel:
            shutdown(self.parts.world)
        return summary


def train(cfg: RunConfig, log=print) -> dict:
    """Train (or resume) the run in ``cfg.train.run_dir``; returns a summary dict.

    With ``train.engine`` ddp or deepspeed every process of the launch runs this; rank 0 writes
    the logs, the config and the final model, and all ranks take part in checkpoints."""
    return Trainer(cfg, log).fit()


__all__ = ["Trainer", "train"]
