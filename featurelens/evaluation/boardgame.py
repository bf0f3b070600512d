"""Board-game ground truth for dictionaries (Karvonen et al. 2024, *Measuring Progress in Dictionary Learning
for Language Model Interpretability with Board Game Models*): latents scored as classifiers of known board
properties.

Properties per position, relative to the player to move (:func:`board_properties`): for each square, mine /
theirs / empty; each square's legality; each square flipped by the last move.

* **Coverage**: at a threshold ``tau`` (a fraction of each latent's max activation), latent ``l`` predicts
  property ``p`` where its activation exceeds ``tau * max_l``. For each property take the best F1 over latents,
  average over properties; report the best over ``tau`` in ``0, 0.1, ..., 1`` (and the curve).
* **Board reconstruction**: on a fitting split, latents that are high-precision classifiers of a board-state
  property (precision >= 0.95 with at least 10 firings) are kept; on held-out positions each kept latent that
  fires predicts its property; F1 of the predicted (square, state) pairs against the true ones, where a square
  predicted in two states counts as wrong both ways; best over ``tau``.

The activations can come from any dictionary (SAE latents, MLP neurons, probe outputs): ``acts [P, L]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from featurelens.errors import UsageError
from featurelens.organisms.othello import EMPTY, MINE, THEIRS, Game

TAUS = tuple(round(0.1 * i, 1) for i in range(11))


def board_properties(games: Sequence[Game]) -> tuple[np.ndarray, list[str]]:
    """``bool [P, 5 * n^2]`` over every recorded position of ``games`` (in order), and the property names:
    ``mine@sq``, ``theirs@sq``, ``empty@sq``, ``legal@sq``, ``flipped@sq``."""
    if not games:
        raise UsageError("no games to take board properties from")
    n2 = games[0].state.shape[1]
    st = np.concatenate([g.state for g in games])
    props = np.concatenate([st == MINE, st == THEIRS, st == EMPTY, np.concatenate([g.legal for g in games]),
                            np.concatenate([g.flipped for g in games])], axis=1)
    names = [f"{k}@{s}" for k in ("mine", "theirs", "empty", "legal", "flipped") for s in range(n2)]
    return props, names


def _counts(fire: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives ``[L, Q]``, firings ``[L]``, positives ``[Q]`` of boolean ``fire [P, L]`` and ``y [P, Q]``."""
    f, t = fire.float(), y.float()
    return f.T @ t, f.sum(0), t.sum(0)


def _f1(tp: torch.Tensor, fired: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    denom = fired[:, None] + pos[None, :]
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-12), torch.zeros_like(tp))


@dataclass(frozen=True)
class BoardScores:
    """Coverage and board reconstruction of one dictionary."""

    coverage: float
    """Best over thresholds of the mean over properties of the best latent's F1."""
    coverage_tau: float
    """The threshold that gave it."""
    coverage_curve: tuple[float, ...]
    """Coverage at each threshold of :data:`TAUS`."""
    reconstruction: float
    """Best over thresholds of the reconstructed board's F1 on held-out positions."""
    reconstruction_tau: float
    """The threshold that gave it."""
    n_classifiers: int
    """High-precision latents kept at that threshold."""


def coverage_curve(acts: torch.Tensor, props: np.ndarray, max_act: torch.Tensor | None = None,
                   taus: Sequence[float] = TAUS) -> list[float]:
    """Coverage at each threshold (``acts [P, L]``, ``props bool [P, Q]``)."""
    a = acts.float()
    mx = a.max(0).values if max_act is None else max_act.float()
    y = torch.as_tensor(props)
    out = []
    for tau in taus:
        fire = (a > tau * mx) & (mx > 0)
        tp, fired, pos = _counts(fire, y)
        best = _f1(tp, fired, pos).max(0).values  # [Q]
        out.append(float(best[pos > 0].mean()) if bool((pos > 0).any()) else float("nan"))
    return out


def reconstruction_f1(fit_acts: torch.Tensor, fit_props: np.ndarray, test_acts: torch.Tensor, test_props: np.ndarray,
                      n_squares: int, tau: float, max_act: torch.Tensor, min_precision: float = 0.95,
                      min_firings: int = 10) -> tuple[float, int]:
    """F1 of the board (mine / theirs / empty per square) rebuilt from high-precision latents at ``tau``, and how
    many (latent, property) classifiers were kept. ``*_props`` hold the board-state block first (``3 n^2``)."""
    q = 3 * n_squares
    yf, yt = torch.as_tensor(fit_props[:, :q]), torch.as_tensor(test_props[:, :q])
    mx = max_act.float()
    ff = (fit_acts.float() > tau * mx) & (mx > 0)
    tp, fired, _ = _counts(ff, yf)
    keep = (tp / fired.clamp_min(1)[:, None] >= min_precision) & (fired[:, None] >= min_firings)  # [L, Q]
    if not bool(keep.any()):
        return 0.0, 0
    ft = ((test_acts.float() > tau * mx) & (mx > 0)).float()
    pred = (ft @ keep.float()) > 0  # [P, Q]: some kept latent fires for that property
    per_square = pred.reshape(-1, 3, n_squares)  # mine / theirs / empty blocks
    clash = per_square.sum(1, keepdim=True) > 1  # a square predicted in two states: wrong both ways
    truth = yt.reshape(-1, 3, n_squares)
    right = per_square & truth & ~clash
    tp_ = float(right.sum())
    fp = float((per_square & ~right).sum())
    fn = float((truth & ~right).sum())
    return (2 * tp_ / (2 * tp_ + fp + fn) if tp_ + fp + fn > 0 else 0.0), int(keep.sum())


def board_scores(fit_acts: torch.Tensor, fit_props: np.ndarray, test_acts: torch.Tensor, test_props: np.ndarray,
                 n_squares: int, taus: Sequence[float] = TAUS) -> BoardScores:
    """Coverage on the test positions (thresholds from each latent's max there) and board reconstruction
    (classifiers chosen on the fit positions, thresholds from each latent's max on them)."""
    mx = fit_acts.float().max(0).values
    curve = coverage_curve(test_acts, test_props, None, taus)
    i = int(np.nanargmax(curve))
    recs = [reconstruction_f1(fit_acts, fit_props, test_acts, test_props, n_squares, t, mx) for t in taus]
    j = int(np.argmax([r[0] for r in recs]))
    return BoardScores(curve[i], float(taus[i]), tuple(curve), recs[j][0], float(taus[j]), recs[j][1])
