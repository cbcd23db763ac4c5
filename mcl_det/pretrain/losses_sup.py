"""PLACEHOLDER for the supervised MCL terms (memory bank and in-batch variants).

This file only exists on the pretraining-redesign branch so that ``SupervisedCohort`` can call the
agreed interface; it wraps the current ``losses.bank_logits`` / ``losses.supcon_terms`` and treats
every variant alike. The real module (two variants, ``authors`` and ``single_positive``) replaces it
at the merge; only the names and signatures below are the contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from . import losses as L

VARIANTS = ("authors", "single_positive")  # LOSS.SUP_VARIANT


def bank_terms(
    zs: Sequence[Tensor],
    banks: Tensor | Sequence[Tensor],
    idx: Tensor,
    pos: Tensor,
    neg: Tensor,
    tau: float,
    T: float,
    needed: Iterable[str],
    variant: str = "authors",
) -> dict[str, Tensor]:
    """The needed terms against memory banks. zs: M x NxC unit-norm anchors; banks: M x BxC;
    idx: N dataset indices of the anchors; pos: N same-class indices; neg: NxK or K negatives;
    the same indices for every member."""
    needed = L.check_terms(needed)
    grid = L.bank_logits(zs, list(banks), pos, neg, tau, cross=L.needs_cross(needed))
    return L.mcl_loss_terms(grid, T, needed)


def inbatch_terms(
    zs: Sequence[Tensor],
    labels: Tensor,
    tau: float,
    T: float,
    needed: Iterable[str],
    variant: str = "authors",
) -> dict[str, Tensor]:
    """The needed terms with in-batch (SupCon-style) contrast. zs: M x NxC; labels: N."""
    return L.supcon_terms(zs, labels, tau, T, needed)


def bank_update(bank: Tensor, idx: Tensor, z: Tensor, momentum: float) -> None:
    """In place: bank[idx] = normalize(momentum * bank[idx] + (1 - momentum) * z)."""
    L.bank_update(bank, idx, z, momentum)
