"""`LmevalCallback`: lmeval's numbers for the model being trained, logged with the rest.

    from lmeval.integrations.transformers import LmevalCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer)
    LmevalCallback("heldout.jsonl", label="heldout", scoring={"max_length": 1024}, out_dir="runs/steps").attach(trainer)
    trainer.train()  # logs lmeval/heldout/ppl, bits_per_token, bits_per_byte, ece at each evaluation

At each `Trainer` evaluation (or every ``every_n_steps`` optimizer steps) the in-memory model
is scored with `InLoopEvaluator`: no reload, no copy to disk, the model's train/eval mode and
every random generator restored afterwards. The values go through ``trainer.log``, so W&B,
TensorBoard, MLflow and ``trainer.state.log_history`` receive them like the loss.

Distributed training (DDP, torchrun / accelerate launch): rank 0 alone scores the whole corpus,
on its full replica of the model, while the other ranks wait; the values are then broadcast,
so every rank logs the same numbers and ``metric_for_best_model`` works on each. Sharded models
(FSDP, DeepSpeed ZeRO-3) hold no full replica on any rank and are refused at train begin.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..errors import ConfigError, ModelError
from .in_loop import InLoopEvaluator, preserved_rng

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("ppl", "bits_per_token", "bits_per_byte", "ece")
KNOWN_METRICS = (
    "ppl",
    "bits_per_token",
    "bits_per_byte",
    "word_ppl",
    "byte_ppl",
    "ppl_doc_mean",
    "nll_mean",
    "ece",
    "mce",
    "brier",
    "top1_accuracy",
    "confidence_mean",
    "entropy_mean",
    "best_temperature",
    "n_tokens",
    "tokens_per_second",
)


class LmevalCallback(TrainerCallback):
    """Log ``lmeval/<label>/<metric>`` for the model in training (see the module docstring).

    ``data``, ``label``, ``scoring``, ``calibration``, ``out_dir`` and ``per_token`` are
    `InLoopEvaluator`'s. ``every_n_steps`` None scores at each Trainer evaluation; an integer
    N scores after every N-th optimizer step instead (no eval_dataset needed). ``metrics``
    are summary columns to log. ``tokenizer`` defaults to the Trainer's ``processing_class``.
    A step is scored once: a second evaluation at the same global step reuses its values.
    """

    def __init__(
        self,
        data,
        *,
        label: str | None = None,
        scoring=None,
        calibration=None,
        every_n_steps: int | None = None,
        out_dir=None,
        per_token: bool = False,
        metrics=DEFAULT_METRICS,
        tokenizer=None,
        trainer=None,
    ):
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ConfigError(
                f"every_n_steps: must be an integer >= 1 or None (got {every_n_steps!r}). "
                "None scores at each Trainer evaluation."
            )
        unknown = [m for m in metrics if m not in KNOWN_METRICS]
        if isinstance(metrics, str) or unknown or not metrics:
            raise ConfigError(f"metrics: must be a non-empty list of {', '.join(KNOWN_METRICS)} (got {metrics!r}).")
        self.evaluator = InLoopEvaluator(
            data, label=label, scoring=scoring, calibration=calibration, out_dir=out_dir, per_token=per_token
        )
        self.every_n_steps = every_n_steps
        self.metrics = tuple(metrics)
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.history: dict[int, dict[str, float]] = {}  # global step -> the values logged
        self._warned = False

    @property
    def label(self) -> str:
        return self.evaluator.label

    def attach(self, trainer) -> LmevalCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- Trainer events ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        _refuse_sharded(args, model)
        if self.tokenizer is None and processing_class is None:  # say so now, not at the first evaluation
            raise ModelError(
                "LmevalCallback: a tokenizer must be known (got none). Pass processing_class=tokenizer "
                "to the Trainer, or tokenizer= to LmevalCallback."
            )

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._log(args, state, self._values(args, state, model, processing_class))

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if self.every_n_steps is not None:
            return
        fresh = state.global_step not in self.history
        values = self._values(args, state, model, processing_class)
        if fresh:
            self._log(args, state, values)
        if metrics is not None:  # `trainer.evaluate()` returns them; metric_for_best_model="lmeval/<label>/ppl" works
            metrics.update({f"eval_{k}": v for k, v in values.items()})

    # -- scoring and logging -------------------------------------------------------------

    def _values(self, args, state, model, processing_class) -> dict[str, float]:
        step = state.global_step
        if step in self.history:
            return self.history[step]
        tokenizer = (
            self.tokenizer if self.tokenizer is not None else getattr(processing_class, "tokenizer", processing_class)
        )
        if model is None or tokenizer is None:
            raise ModelError(
                "LmevalCallback: the Trainer's model and tokenizer must be known (got "
                f"{'no model' if model is None else 'no tokenizer'}). Pass processing_class=tokenizer "
                "to the Trainer, or tokenizer= to LmevalCallback."
            )
        values, error = None, None
        if args.process_index == 0:
            try:
                summary = self.evaluator.evaluate(model, tokenizer, step)
                values = {f"lmeval/{self.label}/{m}": float(summary[m]) for m in self.metrics}
            except Exception as exc:  # tell the waiting ranks before raising here
                error = exc
        values, message = _share_from_rank0(values, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise ModelError(f"LmevalCallback: scoring on rank 0 failed ({message}). See rank 0's traceback.")
        self.history[step] = values
        return values

    def _log(self, args, state, values: dict[str, float]) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(values))  # Trainer.log adds the epoch to the dict it is given
            return
        state.log_history.append({**values, "step": state.global_step})
        if not self._warned and args.process_index == 0:
            log.warning(
                "LmevalCallback was not attached to the Trainer: its values are in trainer.state.log_history "
                "only, not in W&B / TensorBoard. Use LmevalCallback(...).attach(trainer)."
            )
            self._warned = True


def _share_from_rank0(values, error: str | None):
    """Rank 0's (values, error) on every rank of an initialised process group (else as given).

    The broadcast is also the barrier: the other ranks wait here while rank 0 scores."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, error
    box = [(values, error)]
    with preserved_rng():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _refuse_sharded(args, model) -> None:
    """FSDP and ZeRO-3 shard the weights over ranks: no rank can score the model alone."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    sharded = bool(getattr(args, "fsdp", None)) or is_deepspeed_zero3_enabled()
    if model is not None and not sharded:
        sharded = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters())
    if sharded:
        raise ModelError(
            "LmevalCallback: the model must not be sharded over ranks (got FSDP or DeepSpeed ZeRO-3); rank 0 scores "
            "a full replica. Use DDP or ZeRO-1/2, or save checkpoints and score them with `lmeval run`."
        )
