"""The per-worker training loop: one class that runs with or without Ray.

Per step (``WorkerLoop.train_step``): sharded FFCV batch -> on-device augmentation -> inner
maximisation (model in eval mode) -> objective -> DeepSpeed backward/step -> EMA update.
Per epoch: held-out clean and APGD robust accuracy of the EMA weights (summed over ranks), a
checkpoint (each rank writes its DeepSpeed shard; rank 0 adds the EMA and the loop state) and one
report. The loop knows nothing about Ray or MLflow: it calls the ``report`` function it is given
(Ray's in ``train_loop_per_worker``, a plain one in single-process runs and benchmarks).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file

from raytrain_at.attacks import APGD, FGSM, PGD
from raytrain_at.attacks.base import Attack
from raytrain_at.config import RunConfig
from raytrain_at.errors import NonFiniteLoss, UserError
from raytrain_at.data.device_augment import DeviceAugment
from raytrain_at.data.ffcv_loaders import eval_loader, inspect_beton, train_loader
from raytrain_at.model_refs import init_normalisation, local_weights, named_as
from raytrain_at.models import (LoadReport, build_robust_model, load_backbone_weights,
                                with_normalisation)
from raytrain_at.models.model_files import MODEL_FILE, ModelSpec, save_model_file
from raytrain_at.models.pixel_space import normalisation_of
from raytrain_at.tracking.redact import redacted_config_dump
from raytrain_at.training.checkpoint_manifest import write_manifest
from raytrain_at.training.engine import (build_ema, build_engine, freeze_all_but_head,
                                         resolve_precision)
from raytrain_at.training.memory_format import channels_last_weights, keep_channels_last
from raytrain_at.training.objectives import StepLoss, training_step_loss
from raytrain_at.training.portable_state import (PORTABLE_FILE, is_partitioned,
                                                 load_engine_state, save_portable_state)
from raytrain_at.training.schedules import radius_factor
from raytrain_at.training.selection import (SCORE_KEY, Selection, checkpoint_score,
                                            selection_description, selection_metric)

log = logging.getLogger(__name__)

DS_TAG = "state"
STATE_FILE = "loop_state.json"
# The selected (best held-out) epoch's evaluated weights (rank 0), in the first checkpoint after
# a selection whose own epoch was not checkpointed (.selection says where they are otherwise);
# checkpoints written before that rule have a copy in each.
SELECTED_FILE = "selected.safetensors"
# Where the selected weights are, once a checkpoint holds them: another checkpoint's epoch and
# file name; a resume whose checkpoint does not hold them itself reads them from there.
SelectedLookup = Callable[[int, str], dict[str, torch.Tensor]]
# Test hook: a worker writes its PID here so a test can kill it mid-epoch.
PID_DIR_ENV = "RAYTRAIN_AT_PID_DIR"

Report = Callable[[dict[str, float], Path | None], None]


@dataclass(frozen=True)
class StepProgress:
    """Where training stands within an epoch, every ``schedule.log_every_steps`` steps.

    ``loss`` and ``accuracy`` average this rank's batches since the previous report;
    ``images_per_s`` is this rank's rate times the world size (all ranks step together).
    """

    epoch: int  # 1-based, the epoch in progress
    epochs: int
    step: int  # steps done in this epoch
    steps: int  # steps per epoch
    global_step: int
    loss: float
    accuracy: float
    images_per_s: float
    lr: float
    eta_s: float  # until the end of this epoch's training steps


Progress = Callable[[StepProgress], None]


@dataclass(frozen=True)
class WorkerPlace:
    """Where this worker sits in the job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def _first(count: int | None, path: str) -> np.ndarray | None:
    """Indices of the first ``count`` samples of ``path`` (all when None)."""
    if count is None:
        return None
    return np.arange(min(count, inspect_beton(path).num_samples))


@dataclass
class _Interval:
    """Running sums at the previous progress report of an epoch."""

    epoch_start: float
    time: float = 0.0
    steps: int = 0
    seen: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0

    def __post_init__(self) -> None:
        self.time = self.epoch_start


def _check_finite(loss: float, epoch: int, step: int) -> None:
    """Stop on a non-finite loss. Called where the loop reads its loss sums on the host anyway
    (each progress report on rank 0, the epoch's all-reduce on every rank): no extra sync."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the training loss is {loss} in epoch {epoch} (by step {step}): "
                            "training stopped; the last checkpoint before this epoch is kept "
                            "(lower optim.lr, set optim.grad_clip, or check the data)")


class _Unperturbed:
    """Stands in for the attack while the radius schedule is at 0."""

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x


def build_attack(model: nn.Module, config: RunConfig, eps: float, seed: int):
    """The training attack at radius ``eps`` (None for clean objectives).

    ``eps`` is ``config.attack.eps`` (a float since the config was built) times the radius
    schedule's factor (:meth:`WorkerLoop.current_eps`); it goes to ``APGD.for_training`` as is:
    docs/training.md lists these hops.

    The loop's images are the loader's uint8 / 255, augmented and clamped to [0, 1], so APGD
    skips its range check, which would make the host wait for the device every step.
    """
    attack = config.attack
    if attack.kind == "none" or config.objective.kind == "clean":
        return None
    if eps <= 0:
        return _Unperturbed()
    if attack.kind == "apgd":
        return APGD.for_training(model, norm=attack.norm, eps=eps, n_iter=attack.steps, seed=seed,
                                 random_start=attack.random_start, check_range=False,
                                 compile_step=config.scaling.compile)
    if attack.kind == "pgd":
        return PGD(model, norm=attack.norm, eps=eps, n_iter=attack.steps, seed=seed,
                   random_start=attack.random_start, check_range=False)
    return FGSM(model, norm=attack.norm, eps=eps, seed=seed, random_start=attack.random_start,
                check_range=False)


def build_model(config: RunConfig) -> nn.Module:
    """The model of a run, with its clean weights or full initial checkpoint."""
    return build_model_and_report(config)[0]


def build_model_and_report(config: RunConfig) -> tuple[nn.Module, LoadReport | None]:
    """:func:`build_model` and the report of the load it starts from (``model.init`` if set,
    else ``model.pretrained``; None for random weights). Either may be a MODEL_REF:
    :mod:`raytrain_at.model_refs` fetches it, and errors name the reference. The model
    normalises as its starting weights were trained (e.g. raw pixels of an imported RobustBench
    model)."""
    m = config.model
    extra: dict[str, Any] = {"drop_path_rate": m.drop_path_rate} if m.drop_path_rate else {}
    if m.layer_scale is not None:
        extra["ls_init_value"] = m.layer_scale
    pretrained = local_weights(m.pretrained)
    with named_as(m.pretrained, pretrained):
        model, report = build_robust_model(m.name, num_classes=m.num_classes, stem=m.stem,
                                           weights=pretrained, small_input=m.small_input,
                                           skip_head="if_mismatched", **extra)
    if m.init is not None:
        init = local_weights(m.init)
        with named_as(m.init, init):
            report = load_backbone_weights(model, init, model_name=m.name,
                                           skip_head=True if m.new_head else "if_mismatched",
                                           include_stem=True)
        model = with_normalisation(model.backbone, report)
    if m.linear_probe:
        freeze_all_but_head(model)
    return model, report


def run_model_spec(config: RunConfig,
                   normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                   ) -> ModelSpec:
    """The spec of a run's model files. ``normalisation`` is the (mean, std) the run's model
    applies, as built from its starting weights (:func:`normalisation_of`): DeiT weights give
    ImageNet's, an imported RobustBench model raw pixels, whatever the timm name's own cfg says.
    Without it, a run that starts from a model file keeps that file's normalisation."""
    mean, std = normalisation or init_normalisation(config.model.init) or (None, None)
    return ModelSpec(name=config.model.name, num_classes=config.model.num_classes,
                     stem=config.model.stem, small_input=config.model.small_input,
                     resolution=config.data.resolution, mean=mean, std=std,
                     crop_pct=config.data.evaluation_crop_pct)


def training_metadata(config: RunConfig, epoch: int,
                      selected_by: str | None = None) -> dict[str, str]:
    """What a model file records about its training (read back by ``register``): the epoch
    whose weights it holds and, for a selected model, what selected it."""
    meta = {"raytrain_at.epoch": str(epoch),
            # Without the tracking URI's credentials: model files travel to the registry.
            "raytrain_at.run_config": json.dumps(
                redacted_config_dump(config.model_dump(mode="json")))}
    if selected_by is not None:
        meta["raytrain_at.selected_by"] = selected_by
    return meta


class WorkerLoop:
    """Everything one worker needs to train: model, engine, EMA, loaders, augmentation."""

    # For the type checker: DeepSpeed returns the torch optimizer or its own wrapper (both have
    # param_groups). The engine's and the EMA's ``module`` are typed Tensor | Module: cast below.
    optimizer: Any

    def __init__(self, config: RunConfig, place: WorkerPlace, train_path: str,
                 heldout_path: str | None) -> None:
        self.config = config
        self.place = place
        self.precision = resolve_precision(config, place.device)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.train_data = train_loader(
            train_path, indices=_first(config.data.train_size, train_path),
            batch_size=config.per_worker_batch_size,
            resolution=config.data.resolution, rank=place.rank, world_size=place.world_size,
            seed=config.seed, num_workers=config.data.loader_workers,
            flip=config.aug.preset != "basic", device=place.device,
            timeout_s=config.data.loader_timeout_s)
        self.heldout_path = heldout_path
        self._heldout_data = None
        model, self.init_report = build_model_and_report(config)
        # What the model files of this run record (taken before DeepSpeed casts the buffers).
        self.model_spec = run_model_spec(config, normalisation_of(model))
        model = model.to(place.device)
        if config.scaling.channels_last and place.device.type == "cuda":
            # Stored so that DeepSpeed's flat ZeRO buffers keep the weights channels_last.
            model = keep_channels_last(model)
        # The order of the conv weights' elements in ZeRO's flat optimiser state follows the
        # layout: a checkpoint restores only into a run with the same one (checked in load).
        self.nhwc_weights = bool(channels_last_weights(model))
        # Before DeepSpeed casts the module to bf16: the EMA starts from the fp32 weights and
        # stays fp32 (each update lerps the bf16 live weights into it in fp32).
        self.ema = build_ema(model, config.optim.ema_decay)
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, config, len(self.train_data), place.device)
        if config.scaling.compile:
            # DeepSpeed compiles the wrapped module in place (torch.compile); attacks and the
            # training step then run the compiled graph, and the APGD step is compiled too.
            self.engine.compile()
        self.augment = DeviceAugment(
            config.aug.preset, config.model.num_classes, seed=config.seed + 1000 * place.rank,
            label_smoothing=config.objective.label_smoothing,
            mixup_alpha=config.aug.mixup_alpha, cutmix_alpha=config.aug.cutmix_alpha,
            erase_prob=config.aug.erase_prob,
            # uint8 / 255 from the loader: in [0, 1] by construction, and the check would make
            # the host wait for the previous step's kernels before queueing this one's.
            check_range=False)
        self.objective = config.objective
        self.epoch = 0  # epochs completed
        self.selection = Selection(selection_metric(config))
        self.selected_by = selection_description(config, heldout_path is not None)
        # Called every schedule.log_every_steps steps (the launcher gives it to rank 0 only);
        # None costs nothing: no host-device sync for progress.
        self.on_progress: Progress | None = None
        # Rank 0's tracking: gets each epoch's metrics before its checkpoint is written, and
        # adds its files (the undelivered tracking records) to each checkpoint it writes.
        self.on_epoch_metrics: Callable[[dict[str, float]], None] | None = None
        self.checkpoint_extras: Callable[[Path], None] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and shipped: the EMA when kept, else the live model."""
        return cast(nn.Module, self.ema.module if self.ema is not None else self.engine.module)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.place.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _all_reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.place.device)
        if self.place.world_size > 1 and dist.is_initialized():
            dist.all_reduce(tensor)
        return tensor.tolist()

    def current_eps(self, epoch_progress: float) -> float:
        attack = self.config.attack
        return attack.eps * radius_factor(epoch_progress, schedule=attack.eps_schedule,
                                          t1=attack.eps_t1, t2=attack.eps_t2)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self) -> dict[str, float]:
        """Train one epoch; returns metrics averaged over ranks."""
        # Linear probing keeps the frozen backbone in eval mode (BatchNorm statistics, dropout);
        # the head is a linear layer, which behaves the same in both modes.
        cast(nn.Module, self.engine.module).train(not self.config.model.linear_probe)
        self.train_data.set_epoch(self.epoch)
        eps = self.current_eps(float(self.epoch))
        attack = build_attack(cast(nn.Module, self.engine.module), self.config, eps,
                              seed=self.config.seed + 7919 * self.epoch + self.place.rank)
        totals = torch.zeros(2, dtype=torch.float64, device=self.place.device)
        seen = 0  # batch sizes are known on the host: no device tensor per step for the count
        self._write_pid()
        start = time.perf_counter()
        interval = _Interval(start)
        batches = iter(self.train_data)
        upcoming = self._next_augmented(batches)
        while upcoming is not None:
            images, targets = upcoming
            out, upcoming = self.train_step(attack, images, targets, batches)
            batch = images.shape[0]
            seen += batch
            totals += torch.stack([out.loss.detach().double(), out.accuracy.double()]) * batch
            interval.steps += 1
            # Not at the end of the epoch: the epoch's own report follows at once.
            if (self.on_progress is not None and upcoming is not None
                    and interval.steps % self.config.schedule.log_every_steps == 0):
                self.on_progress(self._progress(interval, totals, seen))
        loss_sum, correct, count = self._all_reduce(totals.tolist() + [float(seen)])
        # Summed over ranks, so every rank stops here together, before the epoch's checkpoint.
        _check_finite(loss_sum / count, self.epoch + 1, interval.steps)
        self.epoch += 1
        return {"train_loss": loss_sum / count, "train_accuracy": correct / count,
                "train_eps": eps, "lr": float(self.optimizer.param_groups[0]["lr"]),
                "epoch_seconds": time.perf_counter() - start}

    def train_step(self, attack: Attack | None, images: torch.Tensor, targets: torch.Tensor,
                   batches: Iterator | None = None
                   ) -> tuple[StepLoss, tuple[torch.Tensor, torch.Tensor] | None]:
        """The training step, top to bottom: attack -> loss -> backward -> step -> EMA.

        The one step there is: :meth:`train_epoch` runs it for every batch, and the speed
        benchmark times it. The loss is the pure unit
        :func:`raytrain_at.training.objectives.training_step_loss`.

        Args:
            attack: the epoch's attack (:func:`build_attack`; None for clean objectives).
            images: an augmented batch in [0, 1] on the device.
            targets: its class indices or soft targets.
            batches: the epoch's remaining loader batches, to fetch and augment the next one
                during this step; None for a step on its own.

        Returns:
            The step's loss record and the next augmented batch (None after the last, or
            without ``batches``), fetched between backward and step (see the comment there).
        """
        model = cast(nn.Module, self.engine.module)
        with self._autocast():
            out = training_step_loss(model, attack, images, targets, self.objective)
        self.engine.backward(out.loss)
        # One batch of lookahead: DeepSpeed's step makes the host wait for the device (its
        # gradient checks), so the next batch is fetched and its augmentation queued before
        # that wait, while the GPU still runs this backward. Augmentation draws depend only on
        # (seed, call index) and leave the global RNGs as they were, so the order changes
        # nothing (tested: the same weights as fetching after the step).
        upcoming = self._next_augmented(batches) if batches is not None else None
        self.engine.step()
        if self.ema is not None:
            self.ema.update(model)
        return out, upcoming

    def _progress(self, interval: _Interval, totals: torch.Tensor, seen: int) -> StepProgress:
        """The progress since the last report (reads the running sums: one host sync)."""
        now = time.perf_counter()
        loss_sum, correct = totals.tolist()
        images = seen - interval.seen
        # The sums are on the host here anyway: a NaN stops the run within the epoch.
        _check_finite((loss_sum - interval.loss_sum) / max(images, 1), self.epoch + 1,
                      interval.steps)
        steps = len(self.train_data)
        per_step = (now - interval.epoch_start) / interval.steps
        progress = StepProgress(
            epoch=self.epoch + 1, epochs=self.config.schedule.epochs, step=interval.steps,
            steps=steps, global_step=self.epoch * steps + interval.steps,
            loss=(loss_sum - interval.loss_sum) / max(images, 1),
            accuracy=(correct - interval.correct) / max(images, 1),
            images_per_s=images * self.place.world_size / max(now - interval.time, 1e-9),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            eta_s=per_step * max(steps - interval.steps, 0))
        interval.time, interval.seen = now, seen
        interval.loss_sum, interval.correct = loss_sum, correct
        return progress

    def _next_augmented(self, batches) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next batch of ``batches``, augmented (queued on the device), or None at the end."""
        batch = next(batches, None)
        return None if batch is None else self.augment(*batch)

    def evaluate_heldout(self) -> dict[str, float]:
        """Clean and APGD robust accuracy of the EMA weights on this rank's held-out shard,
        summed over ranks (the paper's checkpoint-selection signal)."""
        if self.heldout_path is None:
            return {}
        model = self.eval_model
        attack = APGD(model, norm=self.config.attack.norm, eps=self.config.attack.eps,
                      n_iter=self.config.attack.heldout_steps, loss="ce", seed=self.config.seed,
                      check_range=False, compile_step=self.config.scaling.compile)
        if self._heldout_data is None:  # built once: FFCV compiles a pipeline per loader
            self._heldout_data = eval_loader(
                self.heldout_path, batch_size=self.config.per_worker_batch_size,
                resolution=self.config.data.resolution,
                crop_pct=self.config.data.evaluation_crop_pct, rank=self.place.rank,
                world_size=self.place.world_size, device=self.place.device,
                num_workers=self.config.data.loader_workers,
                indices=_first(self.config.data.heldout_size, self.heldout_path),
                timeout_s=self.config.data.loader_timeout_s)
        loader = self._heldout_data
        # Counts stay on the device until the end: a read per batch would stall the queue.
        correct = torch.zeros(2, dtype=torch.float64, device=self.place.device)
        count = 0
        was_training = model.training
        model.eval()
        for images, labels in loader:
            with self._autocast():
                with torch.no_grad():
                    correct[0] += (model(images).argmax(1) == labels).sum()
                # Robust accuracy at the target radius also for clean runs (to compare them).
                x_adv = attack.perturb(images, labels)
                with torch.no_grad():
                    correct[1] += (model(x_adv).argmax(1) == labels).sum()
            count += labels.shape[0]
        model.train(was_training)
        clean, robust, count = self._all_reduce(correct.tolist() + [float(count)])
        return {"heldout_clean_accuracy": clean / count, "heldout_robust_accuracy": robust / count}

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> bool:
        """Write this rank's part of a checkpoint into ``directory``; returns whether the
        checkpoint holds the selected weights (the same answer on every rank)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=DS_TAG)
        if is_partitioned(self.engine):
            # ZeRO's shards load only into this world size; this file into any (all ranks
            # gather it, rank 0 writes it).
            save_portable_state(self.engine, directory / PORTABLE_FILE, self.place.rank,
                                self.place.world_size)
        # The selected weights once: this epoch's model file when it is the selected one, else
        # a copy only while no checkpoint holds them (.selection).
        holder = self.selection.file_for(self.epoch, MODEL_FILE, SELECTED_FILE)
        if holder is not None:
            self.selection.stored_in = (self.epoch, holder)
        if self.place.rank == 0:
            # The evaluated weights (EMA when kept) with their model spec: what `evaluate` and
            # `register` read, and where a resumed run gets its EMA back from.
            save_model_file(directory / MODEL_FILE, self.eval_model, self.model_spec,
                            training_metadata(self.config, self.epoch))
            if holder == SELECTED_FILE:
                self.save_selected(directory / SELECTED_FILE)
            # The augmentation draws depend on its call count: a resumed run must go on from it.
            state = {"epoch": self.epoch, "selection": self.selection.state(),
                     "augment_calls": self.augment.calls, "nhwc_weights": self.nhwc_weights,
                     "config": self.config.model_dump(mode="json")}
            (directory / STATE_FILE).write_text(json.dumps(state))
        if self.checkpoint_extras is not None:
            self.checkpoint_extras(directory)
        # Last: the sizes and digests of what this rank wrote, checked before a resume.
        write_manifest(directory, self.place.rank, self.place.world_size)
        return holder is not None

    def load(self, directory: Path, earlier: SelectedLookup | None = None,
             say: Callable[[str], None] = log.info) -> None:
        """Restore weights, optimiser, LR schedule, EMA, epoch and augmentation count.

        A checkpoint of another world size restores its optimiser state re-partitioned
        (:mod:`.portable_state`), and ``say`` gets one line saying so.

        Every file is read without unpickling objects: DeepSpeed's through the engine's
        weights-only loading (:mod:`.safe_loading`: a planted object is a one-line
        :class:`UserError` naming the file), the rest as safetensors and JSON. Which checkpoint
        to load is :func:`.checkpoint_manifest.restore_first_good`'s choice. Rank 0 gets the
        selected weights from this checkpoint or, where an earlier one holds them, through
        ``earlier`` (epoch, file name -> weights; the launcher reads the run's checkpoints).
        """
        # The config's learning rate and weight decay, not the checkpoint's: a resume allowed to
        # change optim.lr or optim.weight_decay (--allow-change) trains with the new values,
        # which the restored optimiser and scheduler states would otherwise put back.
        state = json.loads((directory / STATE_FILE).read_text())
        if bool(state.get("nhwc_weights", False)) != self.nhwc_weights:
            layouts = {True: "channels_last (a CUDA run with scaling.channels_last)",
                       False: "NCHW"}
            raise UserError(f"the checkpoint in {directory} holds its conv weights "
                            f"{layouts[not self.nhwc_weights]}, this run "
                            f"{layouts[self.nhwc_weights]}: resume it on the kind of device and "
                            "with the scaling.channels_last it was written with")
        groups = self.scheduler.optimizer.param_groups
        base_lrs, decays = list(self.scheduler.base_lrs), [g["weight_decay"] for g in groups]
        load_engine_state(self.engine, directory, DS_TAG, self.place.world_size, say)
        self.scheduler.base_lrs = base_lrs
        for group, base, decay, factor in zip(groups, base_lrs, decays,
                                              self.scheduler.lr_lambdas, strict=True):
            group.update(initial_lr=base, weight_decay=decay,
                         lr=base * factor(self.scheduler.last_epoch))
        if self.ema is not None:
            self.ema.module.load_state_dict(load_file(str(directory / MODEL_FILE)))
        self.epoch = int(state["epoch"])
        selection = state.get("selection") or {}
        weights = (self._selected_weights(directory, selection, earlier)
                   if self.place.rank == 0 else None)
        self.selection.restore(selection, weights)
        self.augment.calls = int(state["augment_calls"])

    def _selected_weights(self, directory: Path, selection: dict,
                          earlier: SelectedLookup | None) -> dict[str, torch.Tensor] | None:
        """The selected weights a checkpoint's state points to (see :meth:`load`)."""
        stored = selection.get("stored_in")
        if stored is None:
            # Written before checkpoints recorded where: each holds its own copy, if any.
            legacy = directory / SELECTED_FILE
            return load_file(str(legacy)) if legacy.is_file() else None
        epoch, name = int(stored[0]), str(stored[1])
        if epoch == self.epoch:
            return load_file(str(directory / name))
        if earlier is None:
            raise UserError(f"the checkpoint in {directory} keeps its selected weights in the "
                            f"checkpoint of epoch {epoch}, which this resume cannot read")
        return earlier(epoch, name)

    def save_selected(self, path: Path, extra: dict[str, str] | None = None) -> Path:
        """Write the selected epoch's weights (rank 0) as a model file, or the current ones
        before any epoch was selected; ``extra`` adds metadata (e.g. the MLflow run)."""
        model = self.eval_model
        epoch = self.selection.epoch if self.selection.epoch is not None else self.epoch
        if self.selection.weights is not None:
            model = copy.deepcopy(model)
            model.load_state_dict(self.selection.weights)
        return save_model_file(path, model, self.model_spec,
                               dict(training_metadata(self.config, epoch, self.selected_by),
                                    **(extra or {})))

    def _write_pid(self) -> None:
        pid_dir = os.environ.get(PID_DIR_ENV)
        if pid_dir:
            Path(pid_dir, f"rank{self.place.rank}-epoch{self.epoch}.pid").write_text(
                str(os.getpid()))

    # ------------------------------------------------------------------ the run
    def run(self, report: Report, checkpoint_root: Path) -> None:
        """Train the remaining epochs, reporting metrics and a checkpoint after each."""
        schedule = self.config.schedule
        while self.epoch < schedule.epochs:
            metrics = self.train_epoch()
            metrics.update(self.evaluate_heldout())
            self.selection.consider(self.epoch, metrics,
                                    self.eval_model if self.place.rank == 0 else None)
            metrics.update(self.selection.report())
            metrics["epoch"] = self.epoch
            if self.on_epoch_metrics is not None:
                self.on_epoch_metrics(metrics)
            checkpoint = None
            if self.epoch % schedule.checkpoint_every == 0 or self.epoch == schedule.epochs:
                checkpoint = checkpoint_root / f"epoch-{self.epoch:04d}-rank{self.place.rank}"
                holds = self.save(checkpoint)
                # What Ray Train's retention ranks by (keeps the holder of the selection).
                metrics = dict(metrics, **{SCORE_KEY: checkpoint_score(self.epoch, holds)})
            report(metrics, checkpoint)
