"""What the Trainer needs from a training method: the ``CohortMethod`` interface.

The engine's ``Trainer`` runs the same loop for every method (data, SGD, AMP, lr schedule,
checkpoints, monitor, log) and never asks which method it runs; everything that makes a method
what it is sits behind this interface, so a new method is a new subclass (plus its entry in
``models.cohort_class``) and no change to the loop. The order the Trainer uses it in:

1. ``balanced_batches`` and ``min_classes`` (class attributes, read before anything is built): how
   the training batches are sampled and how many class folders the data must have;
2. ``from_config(cfg, num_classes, targets)``: the cohort itself;
3. per iteration ``training_step(forward, batch)`` -> ``Step``, backward and optimizer step by the
   Trainer, then ``after_step(step.state)``;
4. at evaluation epochs ``evaluate(cfg, EvalData)`` -> one ``metric`` value per member.

Besides, a cohort is an ``nn.Module`` whose ``forward`` takes the images of a batch (what
``training_step`` hands ``forward``), with ``archs`` (one torchvision ResNet name per member,
stored in the checkpoint) and ``members`` (an ``nn.ModuleList``; member k's backbone is
``members.{k}.encoder.*``, the key layout the checkpoint's readers rely on, docs/DESIGN.md).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn
from yacs.config import CfgNode

from .evaluation import EvalData


class Step(NamedTuple):
    """What one training step hands the Trainer."""

    loss: Tensor  # the scalar to back-propagate
    terms: dict[str, Tensor]  # logged as loss_<name>
    state: Any  # what ``after_step`` needs once the optimizer has stepped


Forward = Callable[..., Any]  # the wrapped cohort (DDP / compile, inputs to device, autocast)


class CohortMethod(nn.Module, metaclass=abc.ABCMeta):
    """A cohort of M networks trained by one method; see the module docstring for the contract.

    Subclasses set ``metric`` and, where the defaults do not fit, ``balanced_batches`` and
    ``min_classes``, and implement the four abstract methods.
    """

    #: name of the monitor metric ``evaluate`` returns per member ("knn_top1", "top1"); the
    #: Trainer names the values in log.jsonl and the checkpoint's ``member_metrics`` by it
    metric: ClassVar[str]
    #: whether each batch must hold SUP.SAMPLES_PER_CLASS images of each of its classes (in-batch
    #: positives); read by the Trainer to build its batch sampler, before the cohort exists
    balanced_batches: ClassVar[bool] = False
    #: fewest class folders the training data must hold for the loss and the monitor to mean
    #: anything; fewer is a user error before training starts
    min_classes: ClassVar[int] = 1

    archs: list[str]
    members: nn.ModuleList

    @classmethod
    @abc.abstractmethod
    def from_config(
        cls, cfg: CfgNode, num_classes: int = 0, targets: Sequence[int] = ()
    ) -> CohortMethod:
        """Build the cohort a resolved config describes. ``num_classes``: classes of the training
        set (or MODEL.NUM_CLASSES); ``targets``: the training labels in dataset order
        (class-sorted), for methods whose state is indexed by dataset image (memory banks). The
        Trainer calls it once, after the data and before the optimizer, so the cohort can size
        itself by the data."""
        raise NotImplementedError

    @abc.abstractmethod
    def training_step(self, forward: Forward, batch: tuple) -> Step:
        """Loss, logged terms and after-step state of one loader batch (after the input
        pipeline's device stage). The networks must run through ``forward(*images)`` (the cohort
        wrapped in DDP / torch.compile, images moved to the device, under autocast), not through
        ``self``: only then are the gradients synchronised across ranks. Nothing may change
        here that a diverged step (non-finite loss or gradients, checked by the Trainer after
        this returns) should not have changed: updates go into ``after_step``."""
        raise NotImplementedError

    @abc.abstractmethod
    def after_step(self, state: Any) -> None:
        """Update the method's memory outside the networks (queue enqueue, bank update) with the
        ``Step.state`` of the step just taken, once the optimizer has stepped; the Trainer calls
        it on every rank, so gathered updates keep the ranks identical."""
        raise NotImplementedError

    @abc.abstractmethod
    def evaluate(self, cfg: CfgNode, data: EvalData) -> tuple[list[float], dict[str, Any]]:
        """The monitor: one ``metric`` value per member (in member order) and extra values for
        the eval log line (e.g. the ensemble's). The Trainer calls it on rank 0 only, at the
        end of evaluation epochs (MONITOR.EVAL_PERIOD), with the model in eval mode, and logs
        and checkpoints what it returns."""
        raise NotImplementedError
