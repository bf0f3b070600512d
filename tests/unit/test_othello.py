"""The Othello engine (issue 17): perft from the start equals the published counts (4, 12, 56, 244, 1396, 8200);
legal moves and flips equal a slow reference written over a 2D array; every recorded state follows from the
previous one by the recorded move; the next move is always legal in the recorded state (with and without
pass tokens); games end only when neither player can move; a seed fixes the games."""

from __future__ import annotations

import numpy as np
import pytest

from featurelens.errors import UsageError
from featurelens.organisms.othello import EMPTY, MINE, PASS, THEIRS, Board, bits, perft, random_games


def test_perft_from_the_start() -> None:
    b = Board(8)
    black, white = b.start()
    assert [perft(b, black, white, d) for d in range(1, 7)] == [4, 12, 56, 244, 1396, 8200]


def _naive(grid: np.ndarray, r: int, c: int) -> list[tuple[int, int]]:
    """Discs a move by 1 at (r, c) flips on a grid of 0 empty / 1 mover / 2 opponent, walking each ray."""
    n = grid.shape[0]
    if grid[r, c] != 0:
        return []
    out = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            ray, rr, cc = [], r + dr, c + dc
            while 0 <= rr < n and 0 <= cc < n and grid[rr, cc] == 2:
                ray.append((rr, cc))
                rr, cc = rr + dr, cc + dc
            if ray and 0 <= rr < n and 0 <= cc < n and grid[rr, cc] == 1:
                out += ray
    return out


@pytest.mark.parametrize("n", [8, 6])
def test_engine_equals_a_slow_reference(n: int) -> None:
    board = Board(n)
    for g in random_games(30, n=n, seed=n):
        for t in range(len(g.moves)):
            grid = g.state[t].reshape(n, n)
            me = sum(1 << int(i) for i in np.flatnonzero(g.state[t] == MINE))
            opp = sum(1 << int(i) for i in np.flatnonzero(g.state[t] == THEIRS))
            naive_legal = {r * n + c for r in range(n) for c in range(n) if _naive(grid, r, c)}
            assert set(bits(board.legal(me, opp))) == naive_legal == set(np.flatnonzero(g.legal[t]))
            for sq in list(naive_legal)[:3]:
                assert set(bits(board.flips(me, opp, sq))) == {r * n + c for r, c in _naive(grid, sq // n, sq % n)}


@pytest.mark.parametrize("passes", [True, False])
def test_games_follow_the_rules(passes: bool) -> None:
    games = random_games(60, n=6, seed=1, passes=passes)
    n2 = 36
    saw_pass = False
    for g in games:
        T = len(g.moves)
        assert g.state.shape == (T, n2) and g.legal.shape == (T, n2) and g.flipped.shape == (T, n2)
        start = np.zeros(n2, np.int8)
        start[[14, 21]], start[[15, 20]] = THEIRS, MINE  # as black sees it: white on the diagonal (2,2), (3,3)
        prev = start  # always the view of the player who makes the next listed move
        swap = lambda v: np.where(v == MINE, THEIRS, np.where(v == THEIRS, MINE, EMPTY)).astype(np.int8)  # noqa: E731
        for t, m in enumerate(g.moves):
            now = g.state[t]
            mover = True if t == 0 else bool(g.black_to_move[t - 1])
            if m == PASS:
                saw_pass = True
                assert t > 0 and not g.legal[t - 1].any()  # passes only without a legal move
                np.testing.assert_array_equal(now, swap(prev))  # same discs, seen by the other player
                assert not g.flipped[t].any() and bool(g.black_to_move[t]) != mover
            else:
                assert prev[m] == EMPTY
                flipped = np.flatnonzero(g.flipped[t])
                assert flipped.size and (prev[flipped] == THEIRS).all()
                view = prev.copy()
                view[m] = MINE
                view[flipped] = MINE
                # the opponent moves next, or (no pass token) the mover again when the opponent must pass
                np.testing.assert_array_equal(now, swap(view) if bool(g.black_to_move[t]) != mover else view)
            if t + 1 < T and g.moves[t + 1] != PASS:
                assert g.legal[t][g.moves[t + 1]]  # the next move is legal in the recorded state
            prev = now
        last_me = sum(1 << int(i) for i in np.flatnonzero(g.state[-1] == MINE))
        last_opp = sum(1 << int(i) for i in np.flatnonzero(g.state[-1] == THEIRS))
        b = Board(6)
        assert b.legal(last_me, last_opp) == 0 and b.legal(last_opp, last_me) == 0  # over: nobody can move
        assert (g.moves != PASS).sum() + 4 == (g.state[-1] != EMPTY).sum()  # one disc per move
        assert not g.black_to_move[0]  # white moves after black's first move
    assert saw_pass == passes  # 60 random 6x6 games hold passes; without the token none is listed


def test_seeded_and_validated() -> None:
    a, b = random_games(5, seed=3), random_games(5, seed=3)
    assert all(np.array_equal(x.moves, y.moves) for x, y in zip(a, b))
    assert not all(np.array_equal(x.moves, y.moves) for x, y in zip(a, random_games(5, seed=4)))
    with pytest.raises(UsageError, match="even size"):
        Board(7)
