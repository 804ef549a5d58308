"""How the trainer turns an epoch's batches into optimizer steps (`train.pipeline`).

    plain        one `Trainer.train_step` per batch: copy, forward (input dist, lookup, dense,
                 loss), backward, optimizer step, strictly one batch after the other.
    sparse_dist  TorchRec's `TrainPipelineSparseDist`: while batch i runs forward and backward,
                 batch i+1's sparse input dist (the ids' all-to-all) is in flight and batch i+2
                 is copied to the device. On CUDA the copy and the input dist run on their own
                 streams; on CPU there are no streams, but the input dist's collectives run on
                 gloo's own threads while this batch computes. The order of the arithmetic is the
                 plain loop's (an input dist moves ids, never weights), so the losses are the same.

TorchRec's semi-sync pipeline would also overlap the embedding lookup of batch i+1 with batch
i's backward, i.e. read rows before batch i's update: other losses, and stale embeddings. Its
prefetch pipeline serves UVM-cached tables, which distkd does not plan. Hence sparse_dist.

The pipeline pulls batches ahead of the optimizer; the trainer counts the batches it has
stepped on (`Trainer.consumed`), and that, not the loader's position, is what a checkpoint
records, so a resume neither skips nor repeats the batches the pipeline held.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Protocol

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.tracing import Tracer, _get_leaf_module_names

from distkd.objectives.base import StepOutput

logger = logging.getLogger(__name__)


class Steps(Protocol):
    name: str

    def epoch(self, batches: Iterable) -> Iterator[StepOutput]: ...

    def pause(self) -> None: ...


class PlainSteps:
    """`trainer.train_step` on each batch in turn."""

    name = "plain"

    def __init__(self, trainer):
        self.trainer = trainer

    def epoch(self, batches: Iterable) -> Iterator[StepOutput]:
        for batch in batches:
            yield self.trainer.train_step(batch)

    def pause(self) -> None:
        pass


def _rng_kept(device: torch.device):
    """A block whose random draws leave the run's generators as they were: fx tracing may run
    parts of a forward for real (a sampled softmax drew its negatives), and the run must draw
    the same numbers whether or not it traced."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


class _SparseDist(TrainPipelineSparseDist):
    """TorchRec's pipeline, its model rewrite (an fx trace) under `_rng_kept`."""

    def _pipeline_model(self, *args, **kwargs) -> None:
        with _rng_kept(self._device):
            super()._pipeline_model(*args, **kwargs)


class PipelinedSteps:
    """TrainPipelineSparseDist's `progress`, one optimizer step per call (the pipeline zeroes,
    backpropagates and steps itself), the trainer's per-step learning rate set in its forward."""

    name = "sparse_dist"

    def __init__(self, trainer):
        self.trainer, self.told = trainer, False
        self.pipeline = _SparseDist(trainer.dmp, trainer.optimizer, trainer.env.device,
                                                execute_all_batches=True, custom_model_fwd=self._forward)

    def _forward(self, batch) -> tuple[torch.Tensor, StepOutput]:
        # The learning rate is set here, between the pipeline's zero_grad and its backward, where
        # train_step sets it: the fused tables' zero_grad and step() push the param groups' lr into
        # FBGEMM, so setting it before zero_grad would give their backward another lr than plain's.
        self.trainer.schedule.set(self.trainer.state.step)
        out: StepOutput = self.trainer.dmp(batch)
        return out.loss, out  # the pipeline backpropagates the first, returns the second

    def epoch(self, batches: Iterable) -> Iterator[StepOutput]:
        it, trainer = iter(batches), self.trainer
        while True:
            try:
                out = self.pipeline.progress(it)
            except StopIteration:  # the iterator and the pipeline's batches ran out: the epoch is done
                return
            trainer.state.step += 1
            if not self.told:
                self.told = True
                self._tell()
            yield out

    def _tell(self) -> None:
        """Once: which sharded modules the pipeline overlaps (those whose input is a batch
        attribute as it is; any other runs its input dist inside the forward, as plain)."""
        names = [getattr(m.forward, "name", type(m).__name__) for m in self.pipeline._pipelined_modules]
        if names:
            logger.info(f"train.pipeline: sparse_dist, input dist pipelined for {', '.join(names)}")
        else:
            logger.warning("train.pipeline: sparse_dist found no sharded module fed by a batch attribute: "
                           "nothing overlaps, the steps are the plain loop's")

    def pause(self) -> None:
        """Give the sharded modules their own forwards back (validation, export); the batches in
        flight stay, and the next `progress` re-attaches."""
        self.pipeline.detach()


def untraceable(dmp) -> str | None:
    """Why TorchRec's fx tracer cannot trace the train module (the pipeline needs it to find
    which batch attribute feeds each sharded module), or None if it can."""
    model = dmp.module
    try:
        with _rng_kept(dmp.device):
            Tracer(leaf_modules=_get_leaf_module_names(model)).trace(model)
    except Exception as e:  # any tracing failure means: no pipeline, whatever its type
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def steps_for(trainer, kind: str) -> Steps:
    """The job's loop; the plain one, with the reason logged, when the train module cannot be
    pipelined."""
    if kind == "sparse_dist":
        why = untraceable(trainer.dmp)
        if why is None:
            return PipelinedSteps(trainer)
        logger.warning(f"train.pipeline: sparse_dist needs an fx-traceable train module; "
                       f"{type(trainer.dmp.module).__name__} is not ({why}): running the plain loop")
    return PlainSteps(trainer)
