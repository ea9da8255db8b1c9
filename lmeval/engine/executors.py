"""Ray: `lmeval run CONFIG --executor ray` maps the unfinished parts over a pool of actors.

The driver (the process that runs the command) does what rank 0 does: it locks and prepares
``output.dir``, lists the unfinished parts, and merges the parts as they land. Each actor
loads the corpus and, once per pass, the pass's models (one model load per actor and pass,
never per part), and scores the tasks it is handed with the engine's own pass
(`run.score_pass`, the function the ranks and shards run), writing the same parts into the
shared ``output.dir``; nothing but part indices travels through Ray. A pass's unfinished parts
are cut into about four tasks per actor, balanced by characters (`distributed.assign`), and
handed to whichever actor is free, so a slow actor does not hold up the others.

The cluster is ``RAY_ADDRESS`` (as ``ray.init`` reads it), or a local one started for the run.
Actors ask for one GPU each when the cluster has GPUs. ``output.dir`` and the data must be on
a file system every actor's node sees.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..analyses import analyses_for
from ..errors import ConfigError, DataError, LmevalError
from . import distributed
from .config import Config
from .lock import RunLock
from .merge import Merger, layout_of
from .passes import Models, PassJob, check_tokenizers, plan_passes
from .plan import plan_parts
from .progress import ScoringProgress
from .run import (
    _finish,
    _identity,
    _NoMerge,
    _open_run,
    _part_paths,
    _require_whole,
    _unfinished,
    pass_left,
    score_pass,
)

log = logging.getLogger(__name__)

TASKS_PER_ACTOR = 4  # finer tasks balance better; each costs a pass's setup (its options, its protocol)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor: ray must be installed for --executor ray (got no module named 'ray'). "
            "Install it with `pip install 'lmeval[ray]'`, or run without --executor.",
            source="command line",
        ) from None
    return ray


class PartScorer:
    """A Ray actor's work: the corpus, its plan and the current pass's models, kept between tasks."""

    def __init__(self, config: Config, identity_hash: str, fingerprint: str):
        from .data import load_documents

        self.config, self.idh = config, identity_hash
        self.corpus = load_documents(config.data)
        if self.corpus.fingerprint != fingerprint:
            raise DataError(
                f"data.path: {config.data.path} must hold the same corpus on every Ray node (got fingerprint "
                f"{self.corpus.fingerprint} here, {fingerprint} on the driver). Put the data on a file system every "
                "node sees, or the same copy on each."
            )
        self.analyses = analyses_for(config)
        c = config.scoring
        self.plans = plan_parts(self.corpus, c.documents, c.separator, config.output.part_chars)
        self.passes = plan_passes(config)
        self.models = Models(config)
        self.current: tuple[int, dict] = (-1, {})  # (pass index, name -> loaded model)

    def get(self, index: int):
        """The loader of pass ``index``'s models: each loaded once per actor, the last pass's dropped."""
        if self.current[0] != index:
            self.current = (index, {})
        loaded = self.current[1]

        def get(spec):
            if spec.name not in loaded:
                loaded[spec.name] = self.models.get(spec)
            return loaded[spec.name]

        return get

    def score(self, index: int, chosen: list[int], todo: dict[str, list[int]]) -> list[int]:
        """Score pass ``index`` over the plan indices ``chosen``; its parts land in output.dir."""
        parts = Path(self.config.output.dir) / "parts"
        bar = ScoringProgress(False)

        def job_for(folder: Path) -> PassJob:
            return PassJob(self.config, self.corpus, self.analyses, self.idh, folder, _NoMerge(), bar)

        score_pass(self.passes[index], chosen, self.plans, todo, self.get(index), job_for, parts)
        return chosen


def run_ray(
    config: Config,
    *,
    actors: int | None = None,
    overwrite: bool = False,
    fresh: bool = False,
    show_progress: bool = True,
    return_tokens: bool = True,
) -> dict:
    """`run` with the parts mapped over Ray actors; the same parts and the same tables.

    ``actors``: the pool's size (default: the cluster's GPUs, else 2). The cluster is
    ``RAY_ADDRESS`` when set, else a local one this call starts and stops."""
    if actors is not None and actors < 1:
        raise ConfigError(f"--ray-actors: must be an integer >= 1 (got {actors}). Pass e.g. --ray-actors 4.")
    ray = import_ray()
    started = time.time()
    analyses = analyses_for(config)
    lock = RunLock(Path(config.output.dir))
    merger: Merger | None = None
    try:
        out, corpus, parts, replaced = _open_run(config, analyses, overwrite, fresh, lock)
        try:
            plans = plan_parts(corpus, config.scoring.documents, config.scoring.separator, config.output.part_chars)
            _require_whole(analyses, plans, corpus)
            idh = _identity_hash(config, corpus, analyses)
            todo = _unfinished(corpus, config, parts, plans, idh)
            merger = Merger(out, analyses, _part_paths(config, corpus, parts, plans), layout_of(config, corpus))
            if any(todo.values()):
                check_tokenizers(config, plan_passes(config))
                _map_parts(ray, config, corpus, plans, todo, idh, merger, actors, show_progress)
            scored = time.time()
        except BaseException:
            if merger is not None:
                merger.abort()
            replaced.restore_if_nothing_scored()
            raise
        timing = {"started": started, "scored": scored}
        return _finish(out, config, corpus, parts, merger, return_tokens, timing, replaced)
    finally:
        lock.release()


def _identity_hash(config, corpus, analyses) -> str:
    from .parts import identity_hash

    return identity_hash(_identity(config, corpus, analyses))


def _map_parts(ray, config, corpus, plans, todo, idh, merger: Merger, actors, show_progress) -> None:
    """Every pass in config order, its unfinished parts as tasks over the actor pool; the
    driver folds parts into the merge as they land."""
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS") or None
        local = {} if address else {"num_cpus": max(actors or 2, os.cpu_count() or 1)}  # room for every actor
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **local)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = actors or gpus or 2
        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(PartScorer)
        pool = ActorPool([remote.remote(config, idh, corpus.fingerprint) for _ in range(n)])
        passes = plan_passes(config)
        lefts = [pass_left(p, todo) for p in passes]
        # parts, not tokens: the actors' token counts stay on the actors
        bar = tqdm(desc="scoring (ray)", unit="part", total=sum(map(len, lefts)), disable=not show_progress)
        try:
            for k, left in enumerate(lefts):
                if not left:
                    continue
                tasks = distributed.assign(
                    [plans[i] for i in left], [plans[i].weight for i in left], min(len(left), n * TASKS_PER_ACTOR)
                )
                chunks = [[left[j] for j in share] for share in tasks if share]

                def submit(actor, chosen: list[int], k: int = k):
                    return actor.score.remote(k, chosen, todo)

                for done in pool.map_unordered(submit, chunks):
                    bar.update(len(done))
                    merger.fold_ready()  # what just landed, and whatever was waiting on it
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            if isinstance(cause, LmevalError):
                raise cause from None  # a user's error on an actor: its message, as the CLI prints one
            raise
        finally:
            bar.close()
    finally:
        if started_here:
            ray.shutdown()
