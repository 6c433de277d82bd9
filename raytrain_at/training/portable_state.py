"""The optimiser state of a checkpoint in a form that restores into any world size.

DeepSpeed's ZeRO-1/2 checkpoint (and its BF16_Optimizer's) holds one shard of the flat fp32
master weights and AdamW moments per rank: it loads only into the world size that wrote it.
So every checkpoint also carries ``portable_state.safetensors`` (rank 0's), which holds per
parameter name the full fp32 master weight and every optimiser moment (``exp_avg``,
``exp_avg_sq``), the step count of each parameter group, the module's other entries (buffers,
frozen parameters) and, in its metadata, the LR scheduler's state and the engine's step and
sample counters. A resume at another world size builds the engine as usual and sets all of that
into its new partitions (:func:`restore_portable_state`).

Why this and not DeepSpeed's universal checkpoint: converting to one (``ds_to_universal``) is an
offline step over the whole folder, and loading one calls ``torch.load(weights_only=False)`` on
its files, which a file planted under the storage root would turn into code running in every
worker (see :mod:`.safe_loading`). This file is safetensors with JSON metadata: nothing in it is
unpickled.

The full values come from DeepSpeed's tensor-fragment API
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``): each call
all-reduces one parameter over the data-parallel group, so every rank calls them for the same
parameters in the same order (the module's ``named_parameters()``) and rank 0 writes the file.
That costs about three model-sized all-reduces per checkpoint. Setting values
(``safe_set_full_*``) is local: each rank copies its own fragment out of the full tensor.
ZeRO stage 0 needs none of this: its DeepSpeed checkpoint holds the whole optimiser already.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from raytrain_at.errors import UserError
from raytrain_at.training.checkpoint_manifest import manifest_world_size

PORTABLE_FILE = "portable_state.safetensors"
FORMAT = "1"
# Tensor name prefixes in the file (a parameter name follows the slash).
MASTER = "master/"
MODULE = "module/"  # state-dict entries DeepSpeed does not partition (buffers, frozen params)
STEP = "step/"  # followed by the parameter group's index


def is_partitioned(engine: Any) -> bool:
    """Whether ``engine``'s optimiser state is split over ranks (ZeRO-1/2, BF16_Optimizer): the
    parameters then carry DeepSpeed's fragment mapping. The same answer on every rank."""
    return any(hasattr(p, "_hp_mapping") for p in engine.module.parameters())


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch AdamW that DeepSpeed's ZeRO / BF16 wrapper steps: one flat fp32 partition of
    this rank per parameter group."""
    return engine.optimizer.optimizer


def _moment_keys(engine: Any) -> list[str]:
    """The per-element optimiser state keys (AdamW: ``exp_avg``, ``exp_avg_sq``), empty before
    the first step (torch creates the state lazily). All ranks step together, so every rank
    gets the same list, which keeps the collectives below in step."""
    inner = _inner_optimizer(engine)
    flat = inner.param_groups[0]["params"][0]
    state = inner.state.get(flat, {})
    return sorted(key for key, value in state.items()
                  if torch.is_tensor(value) and value.shape == flat.shape)


def save_portable_state(engine: Any, path: Path, rank: int, world_size: int) -> None:
    """Write ``engine``'s optimiser state, whole, to ``path`` (rank 0 writes; every rank must
    call this, in the same order relative to other collectives: it all-reduces).

    Args:
        engine: a DeepSpeed engine with ZeRO-1/2 or the BF16_Optimizer (see
            :func:`is_partitioned`).
        path: the file to write (in the rank's checkpoint folder, before its manifest).
        rank: this rank.
        world_size: the data-parallel size, recorded for the resume's message.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    keys = _moment_keys(engine)
    if keys:
        _link_moments(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if not hasattr(param, "_hp_mapping"):
            continue
        # Not None: the parameter has the fragment mapping (checked above).
        master = cast(torch.Tensor, safe_get_full_fp32_param(param))
        moments = {key: cast(torch.Tensor, safe_get_full_optimizer_state(param, key))
                   for key in keys}
        if rank == 0:
            tensors[MASTER + name] = master.detach().cpu()
            tensors.update({f"{key}/{name}": value.detach().cpu()
                            for key, value in moments.items()})
    if rank != 0:
        return
    mapped = {name for name, p in engine.module.named_parameters() if hasattr(p, "_hp_mapping")}
    for name, value in engine.module.state_dict().items():
        if name not in mapped:
            tensors[MODULE + name] = value.detach().cpu()
    inner = _inner_optimizer(engine)
    for index, group in enumerate(inner.param_groups):
        step = inner.state.get(group["params"][0], {}).get("step")
        if step is not None:
            tensors[f"{STEP}{index}"] = torch.as_tensor(step).detach().cpu().reshape(1)
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    metadata = {
        "format": FORMAT,
        "world_size": str(world_size),
        "zero_stage": str(int(engine.zero_optimization_stage())),
        "moment_keys": json.dumps(keys),
        "groups": json.dumps(_group_names(engine)),
        # torch's LambdaLR: numbers and lists (its lambdas are None in the state dict).
        "scheduler": json.dumps(scheduler),
        "engine": json.dumps({"global_steps": engine.global_steps,
                              "global_samples": engine.global_samples,
                              "skipped_steps": engine.skipped_steps}),
    }
    # safetensors refuses tensors that share memory or are not contiguous.
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata)


def _group_names(engine: Any) -> list[list[str]]:
    """The parameter names of each optimiser group, sorted: a portable state restores only into
    the same grouping (ZeRO's and BF16's lists of model parameters have different names)."""
    optimizer = engine.optimizer
    groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [sorted(names[id(p)] for p in group) for group in groups]


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read the portable optimiser state {path}: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a portable optimiser state of format {FORMAT}")
    return metadata


def restore_portable_state(engine: Any, path: Path) -> None:
    """Set ``engine``'s weights, fp32 masters, moments, step counts, LR scheduler and engine
    counters from ``path``, re-partitioned for this engine's world size. Local to each rank
    (no collectives); the engine is freshly built and has not stepped.

    Raises:
        UserError: the file is unreadable or does not fit the model (one line naming it and the
            first parameter that is missing or of another shape).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    metadata = _metadata(path)
    keys: list[str] = json.loads(metadata["moment_keys"])
    saved_groups = json.loads(metadata["groups"])
    current_groups = _group_names(engine)
    if saved_groups != current_groups:
        raise UserError(f"{path} holds {len(saved_groups)} parameter groups of other parameters "
                        f"than this model's {len(current_groups)}: it was written for another "
                        "model or optimiser setting")
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())

        def tensor(name: str, like: torch.Tensor | None = None) -> torch.Tensor:
            if name not in names:
                raise UserError(f"{path} has no {name}: it was written for another model")
            value = handle.get_tensor(name)
            if like is not None and value.shape != like.shape:
                raise UserError(f"{path}: {name} has shape {tuple(value.shape)}, the model's "
                                f"{tuple(like.shape)}")
            return value

        _create_optimizer_state(engine, keys, lambda index: tensor(f"{STEP}{index}"))
        for name, param in engine.module.named_parameters():
            if not hasattr(param, "_hp_mapping"):
                continue
            master = tensor(MASTER + name, param).to(param.device)
            safe_set_full_fp32_param(param, master)
            # The bf16 (or fp32) model weight is the master rounded, as DeepSpeed's own step
            # leaves it; it is a view into DeepSpeed's flat buffer, so copy in place.
            with torch.no_grad():
                param.data.copy_(master.to(param.dtype))
            for key in keys:
                safe_set_full_optimizer_state(param, tensor(f"{key}/{name}", param)
                                              .to(param.device), key)
        mapped = {name for name, p in engine.module.named_parameters()
                  if hasattr(p, "_hp_mapping")}
        current = engine.module.state_dict()
        others = {name: tensor(MODULE + name, value) for name, value in current.items()
                  if name not in mapped}
    if others:
        engine.module.load_state_dict(others, strict=False)
    scheduler = json.loads(metadata["scheduler"])
    if scheduler is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(scheduler)
        # The groups' LRs as the last scheduler step left them (a DeepSpeed load restores them
        # with the optimiser's param groups).
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get("_last_lr", [])):
            group["lr"] = lr
    counters = json.loads(metadata["engine"])
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])


def _create_optimizer_state(engine: Any, keys: list[str], step_of) -> None:
    """Give each flat fp32 partition the AdamW state torch would create at its first step
    (zeros and the step count), then link DeepSpeed's per-parameter fragments to it, so that
    ``safe_set_full_optimizer_state`` has views to write into. Without moments (a checkpoint
    before any step) the optimiser stays as built."""
    if not keys:
        return
    inner = _inner_optimizer(engine)
    for index, group in enumerate(inner.param_groups):
        flat = group["params"][0]
        step = step_of(index).reshape(())
        # Where torch's AdamW keeps the step: on the device for the fused / capturable kernels,
        # on the host otherwise (AdamW._init_group).
        device = flat.device if group.get("fused") or group.get("capturable") else "cpu"
        state: dict[str, Any] = {"step": step.to(device)}
        state.update({key: torch.zeros_like(flat, memory_format=torch.preserve_format)
                      for key in keys})
        inner.state[flat] = state
    _link_moments(engine)


def _link_moments(engine: Any) -> None:
    """(Re)point each parameter's fragment at its slice of the moments of its group.

    DeepSpeed links them once, lazily, after its first optimiser step; ZeRO-1/2 step group by
    group and link after group 0's, when the other groups have no state yet, so their
    parameters' fragments stay empty (``safe_get_full_optimizer_state`` then raises "exp_avg
    not found"). AdamW updates its moments in place, so linking again here is exact.
    """
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def load_engine_state(engine: Any, directory: Path, tag: str, world_size: int,
                      say: Callable[[str], None]) -> None:
    """Restore ``engine`` (weights, optimiser, LR schedule, counters) from a verified checkpoint
    folder: through DeepSpeed's own files when the checkpoint's world size (its manifest's) is
    this one, or the optimiser state is not partitioned (ZeRO stage 0); from the portable state
    otherwise, with one line to ``say``.

    Raises:
        UserError: a partitioned checkpoint of another world size without a portable state
            (written before it existed): one line saying which size resumes it.
    """
    saved = manifest_world_size(directory)
    if saved == world_size or not is_partitioned(engine):
        path, _ = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")
        return
    portable = directory / PORTABLE_FILE
    if not portable.is_file():
        raise UserError(f"the checkpoint {directory} was written by {saved} workers without "
                        f"{PORTABLE_FILE}, so its ZeRO optimiser state loads only into "
                        f"{saved} workers: resume it with --num-workers {saved}")
    restore_portable_state(engine, portable)
    say(f"resuming a {saved}-worker checkpoint on {world_size} worker"
        f"{'' if world_size == 1 else 's'}: optimizer state re-partitioned")
