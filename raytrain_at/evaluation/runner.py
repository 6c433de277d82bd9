"""Sharded, resumable AutoAttack: chunks of images, spread over workers, saved on disk.

The evaluated images (ids in the dataset file) are cut into consecutive chunks of one attack batch
each. Every (threat model, chunk) pair has a JSON record in the job's state folder, rewritten after
each attack (:mod:`raytrain_at.evaluation.autoattack`). Workers (Ray tasks, a GPU each on a
cluster, CPU processes locally; or this process when there is one) take disjoint sets of these
(chunk, threat model) units, skip finished records and resume unfinished ones after their last
finished attack. A unit's result depends only on its images, the threat model, the model and the
seed, never on which worker ran it or whether it was interrupted, so the merged result equals a
single-process run.

The state folder is keyed by everything that changes the result (weights hash, data file, image
ids, resolution, preprocessing, version, seed, batch size), so a re-run of the same evaluation
resumes and a different one starts afresh. The key is computed once, on the driver, from what
every node agrees on (the data file's name, size and full sha256, never its resolved path), and it
lies under the storage root (:mod:`raytrain_at.runtime.storage`): ``s3://`` or a shared folder on a
cluster, so the driver merges what workers on other machines wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from raytrain_at.data.provenance import beton_sha256
from raytrain_at.data.watchdog import default_loader_timeout
from raytrain_at.errors import UserError
from raytrain_at.evaluation.autoattack import (MISCLASSIFIED, ROBUST, VERSIONS, ChunkRecord,
                                               attack_chunk, build_autoattack)
from raytrain_at.evaluation.device_choice import evaluation_uses_gpu
from raytrain_at.evaluation.guards import capture_autoattack_warnings
from raytrain_at.evaluation.kernels import attack_model
from raytrain_at.evaluation.threats import ThreatModel
from raytrain_at.runtime.worker_output import worker_log_file
from raytrain_at.runtime.ray_init import init_ray
from raytrain_at.evaluation.lease import StateLease
from raytrain_at.runtime.storage import default_home, filesystem, is_uri, write_durably

log = logging.getLogger(__name__)

# 2: the data's full-file sha256 in the key, norm and eps in every record.
FORMAT = 2
# Retries of an evaluation task lost with its worker or node (a unit's result depends only on its
# images, so a retry resuming the saved records changes nothing). 3: a spot cluster can lose a
# node or two during one long evaluation; a task that keeps failing (a node that dies whenever
# the shard starts) still ends the evaluation with one line, and the same command resumes.
# (Retries were off for a day: the rehearsal's single-process reference was wrong, not the
# retry: FFCV's recycled label buffers, fixed in DeviceBatches.)
TASK_RETRIES = 3


@dataclass(frozen=True)
class EvalJob:
    """One sharded evaluation: a model on some images at one resolution, several threat models.

    Attributes:
        model_ref: what workers load (a path or MLflow reference).
        weights_sha256: the hash the driver saw; workers refuse other weights.
        data_path: the .beton file.
        ids: the evaluated sample ids, in order.
        resolution: input side; ``crop_pct`` the eval preprocessing crop ratio.
        threats: the threat models (all attacked on the same chunks).
        version: ``standard | fast | apgdt`` (see :mod:`raytrain_at.evaluation.autoattack`).
        seed: AutoAttack's seed (every chunk uses it, as every batch in the reference does).
        batch_size: images per chunk and per attack batch.
        num_classes: the model's outputs (caps the number of target classes).
        state_root: folder or ``s3://`` URI under which the job's state folder is made (on a
            cluster, the shared storage root: every worker writes there, the driver merges).
        tracking_uri: MLflow tracking URI for ``runs:/`` / ``models:/`` references.
        kernels: ``exact`` or ``fast`` (:mod:`raytrain_at.evaluation.kernels`).
        state_key: the state folder's name (:func:`state_key`); computed when left empty.
        loader_timeout_s: the loader watchdog's limit (``$RAYTRAIN_AT_LOADER_TIMEOUT_S``).
    """

    model_ref: str
    weights_sha256: str
    data_path: str
    ids: tuple[int, ...]
    resolution: int
    crop_pct: float
    threats: tuple[ThreatModel, ...]
    version: str
    seed: int
    batch_size: int
    num_classes: int
    state_root: str
    tracking_uri: str | None = None
    kernels: str = "exact"
    state_key: str = ""
    # Longest wait for one batch of images (a stuck reader of a damaged file becomes one line);
    # not part of the key: it changes no result.
    loader_timeout_s: float = field(default_factory=default_loader_timeout)

    def __post_init__(self) -> None:
        if not self.state_key:  # on the driver; workers receive the driver's key
            object.__setattr__(self, "state_key", state_key(
                weights_sha256=self.weights_sha256, data_path=self.data_path, ids=self.ids,
                resolution=self.resolution, crop_pct=self.crop_pct, version=self.version,
                seed=self.seed, batch_size=self.batch_size, kernels=self.kernels))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalJob:
        data = dict(data, ids=tuple(data["ids"]),
                    threats=tuple(ThreatModel(**t) for t in data["threats"]))
        return cls(**data)

    def chunks(self) -> list[tuple[int, ...]]:
        return [self.ids[i:i + self.batch_size] for i in range(0, len(self.ids), self.batch_size)]

    @property
    def state_dir(self) -> str:
        """The job's state folder: a local path or an ``s3://`` URI under ``state_root``."""
        return f"{self.state_root.rstrip('/')}/{self.state_key}"

    def record_path(self, threat: ThreatModel, chunk: int) -> str:
        return f"{self.state_dir}/{threat.key}/chunk-{chunk:05d}.json"


def data_fingerprint(data_path: str) -> list:
    """What identifies a data file wherever it lies: its name, size and the sha256 of the whole
    file (checked against its provenance, :func:`raytrain_at.data.provenance.beton_sha256`). Not
    its path (a staged copy has another one on each node) nor its mtime (each copy has its own),
    which a key hashed on one node would disagree on with the others."""
    path = Path(data_path)
    return [path.name, path.stat().st_size, beton_sha256(path)]


def state_key(*, weights_sha256: str, data_path: str, ids: tuple[int, ...], resolution: int,
              crop_pct: float, version: str, seed: int, batch_size: int,
              kernels: str = "exact") -> str:
    """The state folder name of a job: a hash of everything that changes its result, computed
    once on the driver and shipped to the workers with the job."""
    identity = {
        "format": FORMAT, "weights": weights_sha256, "data": data_fingerprint(data_path),
        "ids": hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest(),
        "resolution": resolution, "crop_pct": crop_pct, "version": version, "seed": seed,
        "batch_size": batch_size,
    }
    if kernels != "exact":
        identity["kernels"] = kernels
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _fs_path(path: str):
    return filesystem(path)


def read_record(path: str | Path) -> ChunkRecord | None:
    """The chunk record at ``path`` (local or ``s3://``), None when there is none yet or what is
    there is not a record (empty, not JSON, wrong fields: logged, and then attacked again)."""
    import pyarrow.fs as pafs

    fs, inner = _fs_path(str(path))
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as handle:
        raw = handle.read()
    try:
        return ChunkRecord(**json.loads(raw.decode()))
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        log.warning("chunk record %s is unreadable (%s): attacking its chunk again", path,
                    str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__)
        return None


def record_problem(record: ChunkRecord, ids: tuple[int, ...], threat: ThreatModel,
                   version: str) -> str | None:
    """What makes ``record`` unfit for its unit (chunk ``ids`` under ``threat``), or None."""
    attacks = VERSIONS[version]
    allowed = {MISCLASSIFIED, ROBUST, *attacks}
    if not isinstance(record.ids, list) or list(record.ids) != list(ids):
        return "its image ids are not the chunk's"
    if not isinstance(record.status, list) or len(record.status) != len(ids):
        return (f"it has {len(record.status) if isinstance(record.status, list) else 'no'} "
                f"statuses for {len(ids)} images")
    if any(s not in allowed for s in record.status):
        return "it has a status that is no attack of this version"
    if not isinstance(record.attacks_done, list) or any(a not in attacks
                                                        for a in record.attacks_done):
        return "it lists an attack that is not of this version"
    if record.complete and set(record.attacks_done) != set(attacks):
        return "it is marked complete without every attack"
    if record.norm != threat.norm or not isinstance(record.eps, (int, float)) \
            or not math.isclose(record.eps, threat.eps, rel_tol=1e-9, abs_tol=1e-12):
        return f"it was attacked under {record.norm or '?'} eps {record.eps}, not {threat.key}"
    if not (isinstance(record.max_perturbation, (int, float))
            and math.isfinite(record.max_perturbation) and record.max_perturbation >= 0):
        return "its largest perturbation is not a finite number"
    return None


def read_unit(job: EvalJob, threat: ThreatModel, number: int) -> ChunkRecord | None:
    """The record of one unit, validated against its chunk; None (logged, so it is attacked
    again from the start) when there is none or it does not fit."""
    path = job.record_path(threat, number)
    record = read_record(path)
    if record is None:
        return None
    problem = record_problem(record, job.chunks()[number], threat, job.version)
    if problem is not None:
        log.warning("chunk record %s does not fit its chunk (%s): attacking it again", path,
                    problem)
        return None
    return record


def write_record(path: str | Path, record: ChunkRecord) -> None:
    """Atomically and durably: a worker killed mid-write (or a machine losing power) leaves the
    previous record, never half of one. A local file is written, fsynced and renamed into place
    and its folder fsynced; an object store's PUT is atomic and durable by itself."""
    data = json.dumps(record.as_dict()).encode()
    fs, inner = _fs_path(str(path))
    if is_uri(str(path)):
        with fs.open_output_stream(inner) as handle:
            handle.write(data)
        return
    write_durably(Path(inner), data)


# One unit of work: a chunk under one threat model, by chunk number and threat key.
Unit = tuple[int, str]


def pending_units(job: EvalJob) -> list[Unit]:
    """The (chunk, threat) pairs whose record is not finished, chunk by chunk."""
    return [(number, threat.key) for number in range(len(job.chunks())) for threat in job.threats
            if not ((r := read_unit(job, threat, number)) is not None and r.complete)]


def deal_units(pending: list[Unit], workers: int) -> list[list[Unit]]:
    """Each worker's share of the pending units, none empty. Whole chunks while there are at
    least as many chunks as workers (a worker then loads only its own images); with fewer
    chunks, single units, so that a small evaluation in several norms still uses every worker."""
    chunks = sorted({number for number, _ in pending})
    if len(chunks) >= workers:
        return [[u for u in pending if u[0] in chunks[w::workers]] for w in range(workers)]
    return [share for w in range(workers) if (share := pending[w::workers])]


def pending_chunks(job: EvalJob) -> list[int]:
    """Chunks with at least one unfinished threat record."""
    return sorted({number for number, _ in pending_units(job)})


def finished_images(job: EvalJob) -> int:
    """Images attacked so far, summed over threat models (what the progress bar counts)."""
    import pyarrow.fs as pafs

    sizes = [len(chunk) for chunk in job.chunks()]
    finished = 0
    for threat in job.threats:
        folder = f"{job.state_dir}/{threat.key}"
        fs, inner = _fs_path(folder)
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        for info in infos:
            name = info.base_name
            if not (name.startswith("chunk-") and name.endswith(".json")):
                continue
            number = int(name[len("chunk-"):-len(".json")])
            if number < len(sizes) and (record := read_unit(job, threat, number)) \
                    and record.complete:
                finished += sizes[number]
    return finished


def load_images(data_path: str, ids: list[int], *, resolution: int, crop_pct: float,
                batch_size: int, device: torch.device,
                timeout_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``ids`` (sorted) with the paper's eval preprocessing, as one tensor; each
    batch awaited at most ``timeout_s`` (default :func:`default_loader_timeout`)."""
    from raytrain_at.data.ffcv_loaders import eval_loader

    loader = eval_loader(data_path, batch_size=batch_size, resolution=resolution,
                         crop_pct=crop_pct, num_workers=1, device=device,
                         indices=np.asarray(sorted(ids), dtype=np.int64),
                         timeout_s=timeout_s or default_loader_timeout())
    xs, ys = zip(*[(x, y) for x, y in loader])
    # Channels-first memory: pyautoattack views gradients as (n, -1), which a channels-last
    # (FFCV's layout) gradient does not allow.
    return torch.cat(xs).contiguous(), torch.cat(ys)


def evaluate_chunks(job: EvalJob, chunk_numbers: list[int], *, device: str = "cpu",
                    on_record: Callable[[], object] = lambda: None) -> None:
    """Attack the given chunks under every threat model, resuming saved records."""
    evaluate_units(job, [(number, threat.key) for number in chunk_numbers
                         for threat in job.threats], device=device, on_record=on_record)


def evaluate_units(job: EvalJob, units: list[Unit], *, device: str = "cpu",
                   on_record: Callable[[], object] = lambda: None) -> None:
    """Attack each (chunk, threat) unit, resuming its saved record."""
    from raytrain_at.model_refs import resolve_model

    chunks = job.chunks()
    threats = {threat.key: threat for threat in job.threats}
    # Each unit's saved record, read once: skipped when complete, resumed otherwise.
    todo: list[tuple[int, ThreatModel, ChunkRecord | None]] = []
    for number, key in units:
        record = read_unit(job, threats[key], number)
        if record is None or not record.complete:
            todo.append((number, threats[key], record))
    if not todo:
        return
    torch_device = torch.device(device)
    loaded = resolve_model(job.model_ref, resolution=job.resolution, device=torch_device,
                           tracking_uri=job.tracking_uri)
    if loaded.weights_sha256 != job.weights_sha256:
        raise UserError(f"{job.model_ref!r} changed while it was evaluated (weights hash "
                        f"{loaded.weights_sha256[:12]} != {job.weights_sha256[:12]})")
    model = loaded.module
    # The attacks need gradients with respect to the images only. FAB calls backward(), which
    # would also compute (and accumulate) every weight's gradient: on a CPU that doubled FAB-T's
    # time. Frozen weights leave the input gradients, and so every result, unchanged.
    model.requires_grad_(False)
    wanted = sorted({i for number, _, _ in todo for i in chunks[number]})
    x_all, y_all = load_images(job.data_path, wanted, resolution=job.resolution,
                               crop_pct=job.crop_pct, batch_size=job.batch_size,
                               device=torch_device, timeout_s=job.loader_timeout_s)
    position = {sample: k for k, sample in enumerate(wanted)}
    fast = attack_model(model, job.kernels, torch_device)
    attackers = {t: build_autoattack(fast, t, job.version, job.seed, torch_device,
                                     job.num_classes) for t in job.threats}
    # The exact model's own AutoAttack re-attacks images whose fast break does not hold.
    exact_attackers = attackers if fast is model else {
        t: build_autoattack(model, t, job.version, job.seed, torch_device, job.num_classes)
        for t in job.threats}
    for number, threat, record in todo:
        rows = torch.tensor([position[i] for i in chunks[number]], device=torch_device)
        x, y = x_all[rows], y_all[rows]
        path = job.record_path(threat, number)

        def save(r: ChunkRecord, p: str = path, t: ThreatModel = threat) -> None:
            r.norm, r.eps = t.norm, t.eps
            write_record(p, r)

        with capture_autoattack_warnings() as seen:
            attack_chunk(fast, attackers[threat], x, y, list(chunks[number]), threat.norm,
                         batch_size=job.batch_size, record=record, save=save, warnings=seen,
                         kernels=job.kernels, exact_model=model,
                         exact_aa=exact_attackers[threat])
        on_record()


def _ray_evaluate_chunks(job_data: dict, units: list[Unit], device: str, threads: int) -> None:
    """Body of one Ray evaluation worker: its share of the (chunk, threat) units."""
    torch.set_num_threads(threads)
    evaluate_units(EvalJob.from_dict(job_data), units, device=device)


def shard_resources(gpu: bool, workers: int, cluster: Mapping[str, float]) -> tuple[int, int]:
    """``(CPUs, GPUs)`` one evaluation shard asks Ray for.

    Args:
        gpu: the shards run on GPUs (:func:`~raytrain_at.evaluation.device_choice.
            evaluation_uses_gpu`): one GPU and one CPU each.
        workers: shards running at once (on CPUs they share the cluster's CPUs).
        cluster: ``ray.cluster_resources()``.
    """
    if gpu:
        return 1, 1
    return max(1, int(cluster.get("CPU", workers)) // workers), 0


def run_job(job: EvalJob, *, workers: int = 1, address: str | None = None,
            use_gpu: bool | None = None, description: str = "AutoAttack") -> None:
    """Evaluate every chunk of ``job`` (resuming), on ``workers`` Ray workers or in this process
    (one worker and no cluster address), with a progress bar over the attacked images.

    ``use_gpu`` None: a GPU per shard where this machine has GPUs, or with ``address`` where the
    cluster has or can start GPU nodes (:func:`~raytrain_at.evaluation.device_choice.
    evaluation_uses_gpu`)."""
    if job.version not in VERSIONS:
        raise UserError(f"unknown attack version {job.version!r}")
    if not (workers == 1 and address is None):
        init_ray(address)  # before the bar: an unreachable address is then one clean line
    # Before the lease: "--gpu or --no-gpu" leaves nothing behind.
    gpu = evaluation_uses_gpu(use_gpu, address)
    # Counted in images (over all threat models), so the bar shows images/s and an ETA. Off a
    # terminal it redraws once a minute: a log file gets a few updates, not hundreds.
    total = len(job.threats) * len(job.ids)
    # One driver at a time on a state folder (a second one stops here with one line).
    with StateLease(job.state_dir) as lease:
        bar = tqdm(total=total, initial=finished_images(job), desc=description, unit="img",
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 60.0)
        try:
            if workers == 1 and address is None:
                def on_record() -> None:
                    lease.check()
                    bar.update(finished_images(job) - bar.n)

                evaluate_chunks(job, list(range(len(job.chunks()))),
                                device="cuda" if gpu else "cpu", on_record=on_record)
                return
            _run_on_ray(job, workers, address, gpu, bar, lease)
        finally:
            bar.close()


def submit_shards(job: EvalJob, shares: list[list[Unit]], gpu: bool) -> list:
    """Submit one Ray task per share of units, each asking for :func:`shard_resources`; returns
    their object refs. Ray must be initialised."""
    import ray

    cpus, gpus = shard_resources(gpu, len(shares), ray.cluster_resources())
    # A task whose worker or node dies (a spot preemption) runs again: a unit's result depends
    # only on its images, so re-running one (resuming its saved record) changes nothing.
    task = ray.remote(_ray_evaluate_chunks).options(num_cpus=cpus, num_gpus=gpus,
                                                    max_retries=TASK_RETRIES)
    return [task.remote(job.to_dict(), share, "cuda" if gpu else "cpu", cpus)
            for share in shares]


def _run_on_ray(job: EvalJob, workers: int, address: str | None, gpu: bool,
                bar, lease: StateLease) -> None:
    import ray
    import ray.exceptions

    init_ray(address)
    shares = deal_units(pending_units(job), workers)
    if not shares:
        return
    refs = submit_shards(job, shares, gpu)
    remaining = list(refs)
    # The workers' own output (pyautoattack's prints, warnings) goes to the job's console log.
    with worker_log_file(_console_log(job)):
        while remaining:
            _, remaining = ray.wait(remaining, timeout=1.0)
            try:
                lease.check()
            except UserError:
                for ref in remaining:
                    ray.cancel(ref, force=True)
                raise
            finished = finished_images(job)
            if finished != bar.n:
                bar.update(finished - bar.n)
    try:
        ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else exc
        if isinstance(cause, UserError):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:
        # A node or worker process lost mid-shard: its finished chunks are kept, so the same
        # command resumes; no result is written from a partial job.
        done = len(job.chunks()) - len(pending_chunks(job))
        raise UserError(f"an evaluation worker was lost ({type(exc).__name__}); {done} of "
                        f"{len(job.chunks())} chunks are saved in {job.state_dir}: run the "
                        "same command again to resume") from None


@dataclass
class ThreatOutcome:
    """The merged result of one threat model over all images."""

    threat: ThreatModel
    n: int
    clean_accuracy: float
    robust_accuracy: float
    after_attack: dict[str, float]
    broken_by: dict[str, int]
    max_perturbation: float
    warnings: dict[str, str] = field(default_factory=dict)
    status: list[str] = field(default_factory=list)
    unconfirmed: int = 0  # fast kernels: breaks that did not hold, re-attacked exactly


def merge(job: EvalJob) -> dict[ThreatModel, ThreatOutcome]:
    """Per threat: the chunk records joined in image order, with the per-attack breakdown."""
    outcomes = {}
    attacks = VERSIONS[job.version]
    for threat in job.threats:
        status: list[str] = []
        largest, warnings, unconfirmed = 0.0, {}, 0
        for number in range(len(job.chunks())):
            record = read_unit(job, threat, number)
            if record is None or not record.complete:  # never merge a partial or unfit record
                raise UserError(f"chunk record {job.record_path(threat, number)} is unfinished "
                                "or does not fit its chunk: run the same command again to "
                                "attack it")
            status.extend(record.status)
            largest = max(largest, record.max_perturbation)
            warnings.update(record.warnings)
            unconfirmed += record.unconfirmed
        n = len(status)
        wrong = status.count(MISCLASSIFIED)
        broken = {a: status.count(a) for a in attacks}
        after, fallen = {}, wrong
        for attack in attacks:
            fallen += broken[attack]
            after[attack] = (n - fallen) / n
        outcomes[threat] = ThreatOutcome(
            threat=threat, n=n, clean_accuracy=(n - wrong) / n,
            robust_accuracy=status.count(ROBUST) / n, after_attack=after, broken_by=broken,
            max_perturbation=largest, warnings=warnings, status=status,
            unconfirmed=unconfirmed)
    return outcomes


def _console_log(job: EvalJob) -> Path:
    """Where the workers' own output goes: the job's state folder when it is local, this
    machine's home otherwise (a log file is appended line by line, which S3 cannot do)."""
    if is_uri(job.state_root):
        return default_home() / "eval-logs" / job.state_key / "console.log"
    return Path(job.state_dir) / "console.log"
