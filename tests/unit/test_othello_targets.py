"""The Othello organism's "legal" training target and its KL-to-the-random-player diagnostic, against
independent computations: the engine's flips (not its legal-move bitboard), F.cross_entropy per token, and
scipy's KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurelens.errors import UsageError
from featurelens.organisms.othello import PASS, Board, random_games
from featurelens.organisms.othello_model import (
    OthelloConfig,
    _pad,
    game_tokens,
    legal_targets,
    legality,
    soft_ce,
    train_othello,
)


def _replayed_legal_squares(g, passes: bool) -> list[set[int]]:  # type: ignore[no-untyped-def]
    """Before each move, the squares where the player to move flips something (found by trying every square).
    Without pass tokens a player who cannot move is skipped silently, so the other player's squares count."""
    board = Board(g.n)
    me, opp = board.start()
    out = []
    for m in g.moves:
        ok = {sq for sq in range(g.n * g.n) if board.flips(me, opp, sq)}
        if not ok and not passes:
            me, opp = opp, me
            ok = {sq for sq in range(g.n * g.n) if board.flips(me, opp, sq)}
        out.append(ok)
        if m == PASS:
            me, opp = opp, me
            continue
        f = board.flips(me, opp, int(m))
        me, opp = opp ^ f, me | f | (1 << int(m))
    return out


@pytest.mark.parametrize("passes", [True, False])
def test_legal_targets_are_uniform_over_the_moves_the_rules_allow(passes: bool) -> None:
    games = random_games(12, n=6, seed=3, passes=passes)
    tgt = legal_targets(games, 3 + 36)
    for i, g in enumerate(games):
        for t, ok in enumerate(_replayed_legal_squares(g, passes)):
            want = {3 + s for s in ok} or {2}
            row = tgt[i, t]
            assert set(torch.nonzero(row).flatten().tolist()) == want, (i, t)
            assert torch.allclose(row[list(want)], torch.full((len(want),), 1.0 / len(want)))
            if g.moves[t] != PASS:  # the move actually played is always one of them
                assert 3 + int(g.moves[t]) in want
        assert float(tgt[i, len(g.moves):].abs().sum()) == 0.0  # the last token and the padding predict nothing


def test_soft_ce_is_the_mean_of_the_move_targets_cross_entropies() -> None:
    """The "legal" loss at a position is the average over the legal moves of the ordinary next-token loss:
    exactly the expected loss when the move is drawn uniformly among them (what the random player does)."""
    games = random_games(6, n=6, seed=8)
    tgt = legal_targets(games, 39)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*tgt.shape, generator=g, dtype=torch.float64) * 3
    per_pos = []
    for i in range(len(games)):
        for t in range(tgt.shape[1]):
            legal = torch.nonzero(tgt[i, t]).flatten()
            if len(legal):
                ce = F.cross_entropy(logits[i, t].expand(len(legal), -1), legal, reduction="none")
                per_pos.append(float(ce.mean()))
    assert float(soft_ce(logits, tgt)) == pytest.approx(float(np.mean(per_pos)), rel=1e-6)


def test_legality_kl_to_the_random_player_against_scipy() -> None:
    from scipy.stats import entropy

    games = random_games(5, n=6, seed=2)
    g = torch.Generator().manual_seed(1)

    class Model:
        def __init__(self) -> None:
            ids = _pad([game_tokens(x) for x in games])
            self.logits = torch.randn(ids.shape[0], ids.shape[1], 39, generator=g)

        def __call__(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            class Out:
                logits = self.logits
            return Out()

    m = Model()
    res = legality(m, games, batch_size=len(games))
    tgt = legal_targets(games, 39)
    kls = []
    for i, x in enumerate(games):
        for t in range(len(x.moves)):
            p = torch.softmax(m.logits[i, t].double(), -1).numpy()
            kls.append(entropy(tgt[i, t].double().numpy(), p))
    assert res["kl_to_uniform_legal"] == pytest.approx(float(np.mean(kls)), rel=1e-5)
    assert res["positions"] == len(kls)


def test_targets_key_and_errors() -> None:
    # the first organisms' keys (pinned from before the option existed) are unchanged; the new target keys anew
    first = dict(layers=4, games=200_000, steps=6000, targets="moves")  # the defaults before the legal target
    assert OthelloConfig(**first).key() == "ce152e1d3d9d"
    assert OthelloConfig(**{**first, "games": 50000}, eval_every=250).key() == "2b3788570497"
    assert OthelloConfig(**{**first, "targets": "legal"}).key() != "ce152e1d3d9d"
    # the default is the measured 8-block organism (README); eval_every does not key it
    assert OthelloConfig().key() == OthelloConfig(eval_every=0).key() == "b290d2db4cb7"
    with pytest.raises(UsageError, match="--targets"):
        OthelloConfig(targets="soft")
    with pytest.raises(UsageError, match="--eval-every"):
        OthelloConfig(eval_every=-1)


def test_legal_target_training_records_a_curve_and_beats_the_move_target(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On a tiny model and the same games and steps, training on the legal-move distribution ends closer to the
    random player (lower KL) than training on the single move played; the curve survives a resume."""
    base = dict(board=6, layers=1, d_model=32, heads=2, d_mlp=64, games=300, eval_games=40, steps=60,
                batch_size=16, lr=3e-3, checkpoint_every=30, eval_every=30)
    soft = train_othello(OthelloConfig(**base, targets="legal"), tmp_path / "s", progress=False)
    hard = train_othello(OthelloConfig(**base, targets="moves"), tmp_path / "h", progress=False)
    assert [c["step"] for c in soft["curve"]] == [30, 60]
    assert soft["kl_to_uniform_legal"] < hard["kl_to_uniform_legal"]
    again = train_othello(OthelloConfig(**base, targets="legal"), tmp_path / "s", progress=False)  # from step 60
    assert [c["step"] for c in again["curve"]] == [30, 60]
    assert again["kl_to_uniform_legal"] == pytest.approx(soft["kl_to_uniform_legal"], abs=1e-6)


def test_gpt2_organism_has_learned_positions_keys_apart_and_its_sites_match_hidden_states(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--arch gpt2 builds a GPT-2 (learned absolute positions, no dropout: training is deterministic) that trains,
    resumes to the same weights and whose residual sites are the model's own hidden states; it keys apart from
    the Llama organism, whose key is unchanged."""
    import torch

    from featurelens.models.hooks import ActivationCapture
    from featurelens.organisms.othello_model import build_model

    assert OthelloConfig(arch="gpt2").key() != OthelloConfig().key() == OthelloConfig(arch="llama").key()
    with pytest.raises(UsageError, match="--arch"):
        OthelloConfig(arch="mamba")
    cfg = OthelloConfig(board=6, layers=2, d_model=32, heads=2, d_mlp=64, games=200, eval_games=20, steps=20,
                        batch_size=16, lr=3e-3, checkpoint_every=10, eval_every=0, arch="gpt2")
    model = build_model(cfg)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.transformer.wpe.weight.shape[0] >= 37
    a = train_othello(cfg, tmp_path / "a", progress=False)
    b = train_othello(cfg, tmp_path / "b", progress=False)
    for (k, v), (_, w) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert torch.equal(v, w), k
    m = a["model"].eval()
    ids = torch.tensor([[1, 3 + 8, 3 + 9, 3 + 14]])
    with torch.no_grad(), ActivationCapture(m, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]) as cap:
        got = cap.forward(ids)
    with torch.no_grad():
        hs = m(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got["blocks.0.hook_resid_post"], hs[1])
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"], hs[1])
