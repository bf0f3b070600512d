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


def _oracle_logits(games, prefer_illegal: bool = False):  # type: ignore[no-untyped-def]
    """A stand-in model whose logits put the legal moves on top (or an occupied square above them)."""
    import torch

    from featurelens.organisms.othello_model import _pad, game_tokens

    class M:
        def eval(self) -> None:
            return None

        def __call__(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            B, T = input_ids.shape
            out = torch.full((B, T, 3 + games[0].n ** 2), -10.0)
            for i, g in enumerate(games[:B] if B == len(games) else games):
                for t in range(len(g.moves)):
                    if t == 0:
                        out[i, 0, [3 + s for s in (8, 13, 22, 27)]] = 1.0  # 6x6 start: c2, b3, e4, d5 for black
                    elif g.legal[t - 1].any():
                        out[i, t, 3 + np.flatnonzero(g.legal[t - 1])] = 1.0
                    else:
                        out[i, t, 2] = 1.0
                    if prefer_illegal:
                        out[i, t, 3 + 14] = 5.0  # a centre square: always occupied
            return type("O", (), {"logits": out})()

    assert _pad([game_tokens(g) for g in games]).shape[0] == len(games)
    return M()


def test_legality_metric() -> None:
    from featurelens.organisms.othello import Board
    from featurelens.organisms.othello_model import legality

    b = Board(6)
    assert sorted(bits(b.legal(*b.start()))) == [8, 13, 22, 27]
    games = random_games(20, n=6, seed=5)
    good = legality(_oracle_logits(games), games, batch_size=len(games))
    assert good["top1_legal"] == 1.0 and good["legal_set_recovered"] == 1.0
    assert good["positions"] == sum(len(g.moves) for g in games)
    bad = legality(_oracle_logits(games, prefer_illegal=True), games, batch_size=len(games))
    assert bad["top1_legal"] == 0.0 and bad["legal_set_recovered"] == 0.0


def test_othello_model_trains_resumes_and_loads(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A tiny organism: killed after its step-10 checkpoint and rerun, the weights equal an uninterrupted run's;
    the built folder loads through load_model with its move tokenizer, its games file tokenizes to the training
    tokens, and featurelens' sites resolve on it."""
    import torch

    from featurelens.organisms.othello_model import OthelloConfig, game_text, make_tokenizer, train_othello
    from tests.conftest import Killed

    cfg = OthelloConfig(board=6, layers=1, d_model=32, heads=2, d_mlp=64, games=200, eval_games=20, steps=20,
                        batch_size=16, lr=3e-3, checkpoint_every=10)
    whole = train_othello(cfg, tmp_path / "a", progress=False)

    def die(step: int) -> None:
        if step == 15:
            raise Killed

    with pytest.raises(Killed):
        train_othello(cfg, tmp_path / "b", progress=False, on_step=die)
    resumed = train_othello(cfg, tmp_path / "b", progress=False)
    for (k, v), (_, w) in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(v, w), k
    assert 0.0 <= whole["top1_legal"] <= 1.0 and whole["positions"] > 0
    tok = make_tokenizer(6)
    g = random_games(1, n=6, seed=9)[0]
    ids = tok(game_text(g), add_special_tokens=False)["input_ids"]
    from featurelens.organisms.othello_model import game_tokens

    assert ids == game_tokens(g)[1:]  # the text round-trips to the training tokens
    # the organism folder: cached, loadable, its corpus readable, its sites the usual ones
    import json

    from featurelens.models.hooks import ActivationCapture
    from featurelens.models.loading import load_model
    from featurelens.organisms.othello_model import othello_organism

    monkeypatch.setenv("FEATURELENS_CACHE", str(tmp_path / "cache"))
    path = othello_organism(cfg, progress=False)
    assert othello_organism(cfg, progress=False) == path  # cached
    lm = load_model(str(path), device="cpu")
    first = json.loads((path / "games" / "test.jsonl").read_text().splitlines()[0])["text"]
    ids = [1] + list(lm.tokenizer(first, add_special_tokens=False)["input_ids"])
    with torch.no_grad(), ActivationCapture(lm.model, ["blocks.0.hook_resid_post"]) as cap:
        x = cap.forward(torch.tensor([ids]))["blocks.0.hook_resid_post"]
    assert x.shape == (1, len(ids), 32)
    assert json.loads((path / "organism.json").read_text())["legality"]["positions"] > 0
