"""Board-game metrics (issue 17): per-(latent, property) F1 equals scikit-learn's; latents that are the board
properties themselves score coverage 1 and reconstruction 1 while random latents of the same density score far
lower; a square predicted in two states counts as wrong both ways (hand-computed F1); properties from games are
the engine's states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurelens.evaluation.boardgame import _counts, _f1, board_properties, board_scores, reconstruction_f1
from featurelens.organisms.othello import random_games


def test_f1_equals_sklearn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    fire, y = rng.random((200, 7)) < 0.3, rng.random((200, 5)) < 0.2
    y[:, 4] = False  # a property that never holds
    f1 = _f1(*_counts(torch.as_tensor(fire), torch.as_tensor(y))).numpy()
    for j in range(7):
        for q in range(5):
            assert f1[j, q] == pytest.approx(f1_score(y[:, q], fire[:, j], zero_division=0.0), abs=1e-6)


def test_planted_and_random_dictionaries() -> None:
    games = random_games(40, n=6, seed=0)
    props, names = board_properties(games)
    assert props.shape[1] == 5 * 36 == len(names) and names[0] == "mine@0" and names[-1] == "flipped@35"
    np.testing.assert_array_equal(props[:, 72:108], np.concatenate([g.state for g in games]) == 0)  # empty block
    half = len(props) // 2
    rng = np.random.default_rng(1)
    exact = torch.as_tensor(props, dtype=torch.float32) * torch.as_tensor(rng.uniform(0.5, 2, props.shape[1]),
                                                                         dtype=torch.float32)
    good = board_scores(exact[:half], props[:half], exact[half:], props[half:], 36)
    assert good.coverage == pytest.approx(1.0) and good.coverage_tau == 0.0
    # reconstruction: every board-state property seen >= 10 times while fitting has its exact latent kept; the
    # rule also keeps correlational classifiers (an empty square implying an empty corner at precision >= 0.95
    # on the fit positions), which err now and then on held-out ones
    kept = props[:half, :108].sum(0) >= 10
    assert good.n_classifiers > kept.sum() and 0.95 < good.reconstruction < 1.0
    density = props.mean(0)
    noise = torch.as_tensor(rng.random(props.shape) < density, dtype=torch.float32) * torch.rand(props.shape)
    bad = board_scores(noise[:half], props[:half], noise[half:], props[half:], 36)
    assert bad.coverage < 0.6 and bad.reconstruction < 0.3


def test_a_square_predicted_two_ways_is_wrong() -> None:
    """One square (properties mine / theirs / empty). Latent 0 fires exactly on 'mine', latent 1 exactly on
    'theirs' but also on the first 'mine' position; on test positions [mine, mine, theirs, empty]:
    position 0 is predicted mine and theirs (a clash: FP 2... counted below), 1 mine (TP), 2 theirs (TP)."""
    fit_props = np.array([[1, 0, 0]] * 12 + [[0, 1, 0]] * 12 + [[0, 0, 1]] * 4, bool)
    fit = torch.zeros(28, 2)
    fit[:12, 0] = 1.0
    fit[12:24, 1] = 1.0
    test_props = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)
    test = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    f1, kept = reconstruction_f1(fit, fit_props, test, test_props, 1, 0.0, fit.max(0).values)
    # position 0: predicted {mine, theirs}, clash -> both wrong: FP 2, FN 1; position 1: TP; position 2: TP;
    # position 3: nothing predicted -> FN 1. F1 = 2*2 / (2*2 + 2 + 2) = 0.5
    assert kept == 2 and f1 == pytest.approx(0.5)
