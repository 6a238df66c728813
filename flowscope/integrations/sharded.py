"""Study sweeps sharded over the ranks of a ``torch.distributed`` group (``torchrun``).

Rank 0 prepares the run folder, rank ``r`` runs the configs ``i`` with ``i % world == r``,
rank 0 merges. One folder on a shared file system; an interrupted sweep resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from flowscope.core.errors import FlowscopeError
from flowscope.integrations.distributed import rank_and_world

if TYPE_CHECKING:
    from flowscope.study.engine import StudyResult
    from flowscope.study.spec import Study

__all__ = ["run_study_sharded"]


def run_study_sharded(
    study: Study,
    out_dir: str | Path,
    *,
    device: str | None = None,
    fresh: bool = False,
    group: Any = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> StudyResult | None:
    """Run a study's configs over the ranks of ``group`` into one run folder, resumably.

    Rank 0 prepares the folder; rank ``r`` runs configs ``i`` with ``i % world_size == r``
    that are not finished yet; after every rank is done, rank 0 merges the folder
    (``engine.merge``: frames, configs.json, claims). Launch with ``torchrun
    --nproc_per_node=N`` (for CUDA, call ``torch.cuda.set_device(local_rank)`` first and pass
    ``device="cuda"``). Without a process group it runs every config, like ``run_study``.

    Example (one process: without a process group it runs every config; under ``torchrun``,
    call ``dist.init_process_group("gloo")`` first, as the script in docs/INTEGRATIONS.md does):

        >>> from flowscope.study import spec
        >>> small = ["net.in_dim=16", "net.width=16", "net.depth=3", "data.dim=16"]  # quick
        >>> result = run_study_sharded(spec.load("init-scales", small), "reports/init-scales")
        >>> result.ran, len(result.configs)
        (48, 48)

    Args:
        study: a validated study.
        out_dir: the run folder, shared by every rank (one file system).
        device: overrides ``run.device`` of every config.
        fresh: discard finished configs of an earlier run in the same folder.
        group: the process group (default: the world).
        progress: called as ``progress(done, mine, config_id)`` after each of this rank's
            configs.

    Returns:
        The merged :class:`~flowscope.study.engine.StudyResult` on rank 0, None on the others.

    Raises:
        FlowscopeError: on every rank, when the folder holds another spec or a config raised
            one on any rank (each rank's message is included).
    """
    from flowscope.study import engine

    rank, world = rank_and_world(group)
    out = Path(out_dir)
    error = None
    if rank == 0:
        try:
            engine.prepare_folder(study, out, fresh)
        except FlowscopeError as err:
            error = str(err)
    _raise_any(error, group, world, "preparing the run folder")
    mine = [c for c in study.configs() if c.index % world == rank]
    ran, error = 0, None
    try:
        for done, config in enumerate(mine, 1):
            folder = out / "configs" / config.id
            if not (folder / "done.json").is_file():
                engine.run_config(study, config, folder, device)
                ran += 1
            if progress:
                progress(done, len(mine), config.id)
    except FlowscopeError as err:
        error = str(err)
    total = _raise_any(error, group, world, "running configs", ran)
    result = engine.merge(study, out, total) if rank == 0 else None
    if world > 1:
        dist.barrier(group=group)
    return result


def _raise_any(error: str | None, group: Any, world: int, what: str, count: int = 0) -> int:
    """Gather (error, count) from every rank; raise everywhere if any failed; sum the counts."""
    if world == 1:
        if error:
            raise FlowscopeError(error)
        return count
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (error, count), group=group)
    failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e]
    if failed:
        raise FlowscopeError(f"sharded study failed while {what}: " + " | ".join(failed))
    return sum(c for _, c in everyone)
