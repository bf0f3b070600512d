"""An Othello engine for the board-game organism (issue 17): square boards of even size (8x8, or 6x6 for a
smaller organism), bitboards as Python ints, random legal games from a seed, and the board-state properties
that ground-truth metrics score dictionaries against (Karvonen et al. 2024).

Squares are numbered ``row * n + col`` from the top-left. Black moves first from the standard centre (the
two squares on the main diagonal of the centre white). A player with no legal move passes; the game ends
when neither player can move. :func:`random_game` records, after every move, the state relative to the
player to move next (the one the model must predict a move for): each square mine / theirs / empty, the
legal moves, and the squares the last move flipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurelens.errors import UsageError

PASS = -1
"""A pass in a move list."""
EMPTY, MINE, THEIRS = 0, 1, 2
"""Square states relative to the player to move."""
_DIRS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class Board:
    """Bitboard geometry of an ``n x n`` board: shifts by direction that never wrap around an edge."""

    def __init__(self, n: int = 8) -> None:
        if n < 4 or n % 2:
            raise UsageError(f"board size {n} is invalid: give an even size of at least 4 (8 is standard, 6 is small)")
        self.n = n
        self.full = (1 << (n * n)) - 1
        col = [sum(1 << (r * n + c) for r in range(n)) for c in range(n)]
        not_first, not_last = self.full & ~col[0], self.full & ~col[n - 1]
        # after a shift with a column step of +1 a bit cannot land in column 0 legitimately (it wrapped), and so on
        self._dirs = [(dr * n + dc, not_first if dc == 1 else not_last if dc == -1 else self.full) for dr, dc in _DIRS]

    def shift(self, b: int, d: int) -> int:
        s, mask = self._dirs[d]
        return ((b << s) if s > 0 else (b >> -s)) & mask & self.full

    def start(self) -> tuple[int, int]:
        """``(black, white)`` at the start."""
        n, h = self.n, self.n // 2
        sq = lambda r, c: 1 << (r * n + c)  # noqa: E731
        return sq(h - 1, h) | sq(h, h - 1), sq(h - 1, h - 1) | sq(h, h)

    def legal(self, me: int, opp: int) -> int:
        """Bitboard of ``me``'s legal moves."""
        empty = self.full & ~(me | opp)
        moves = 0
        for d in range(8):
            x = self.shift(me, d) & opp
            for _ in range(self.n - 3):
                x |= self.shift(x, d) & opp
            moves |= self.shift(x, d) & empty
        return moves

    def flips(self, me: int, opp: int, square: int) -> int:
        """Bitboard of the discs a move by ``me`` at ``square`` turns over (0: not a legal move)."""
        m, out = 1 << square, 0
        if (me | opp) & m:
            return 0
        for d in range(8):
            f, x = 0, self.shift(m, d)
            while x & opp:
                f |= x
                x = self.shift(x, d)
            if x & me:
                out |= f
        return out


def bits(b: int) -> list[int]:
    """Square indices set in a bitboard, ascending."""
    out = []
    while b:
        low = b & -b
        out.append(low.bit_length() - 1)
        b ^= low
    return out


def perft(board: Board, me: int, opp: int, depth: int, passed: bool = False) -> int:
    """Leaf positions ``depth`` plies ahead (a pass is a ply; a finished game is a leaf)."""
    if depth == 0:
        return 1
    moves = board.legal(me, opp)
    if not moves:
        if passed:
            return 1
        return perft(board, opp, me, depth - 1, True)
    total = 0
    for sq in bits(moves):
        f = board.flips(me, opp, sq)
        total += perft(board, opp ^ f, me | f | (1 << sq), depth - 1)
    return total


@dataclass(frozen=True)
class Game:
    """One game: its moves and, after each, the state seen by the player to move next."""

    n: int
    """Board size."""
    moves: np.ndarray
    """int16 ``[T]``: squares played (``PASS`` for a pass), in order; black first."""
    state: np.ndarray
    """int8 ``[T, n*n]``: after move ``t``, each square ``EMPTY`` / ``MINE`` / ``THEIRS`` for the player to move."""
    legal: np.ndarray
    """bool ``[T, n*n]``: that player's legal moves after move ``t``."""
    flipped: np.ndarray
    """bool ``[T, n*n]``: squares move ``t`` turned over."""
    black_to_move: np.ndarray
    """bool ``[T]``: whether black moves after move ``t``."""


def _vec(b: int, size: int) -> np.ndarray:
    out = np.zeros(size, bool)
    out[bits(b)] = True
    return out


def random_game(board: Board, rng: np.random.Generator, passes: bool = True) -> Game:
    """A game of uniformly random legal moves. Without ``passes`` the move list omits passes (the next move is
    simply the other player's, as in Othello-GPT's synthetic dataset)."""
    size = board.n * board.n
    black, white = board.start()
    me, opp, black_turn = black, white, True
    moves: list[int] = []
    states: list[np.ndarray] = []
    legals: list[np.ndarray] = []
    flips: list[np.ndarray] = []
    turns: list[bool] = []
    while True:
        legal = board.legal(me, opp)
        if not legal:
            if not board.legal(opp, me):  # neither can move: the game is over (no pass is played)
                break
            me, opp, black_turn = opp, me, not black_turn
            if passes:
                moves.append(PASS)
                flips.append(np.zeros(size, bool))
            elif states:  # no pass token: the last move's state is seen by the player who moves next after all
                states.pop(), legals.pop(), turns.pop()
            else:
                raise AssertionError("a pass before the first move")
            _record(board, me, opp, black_turn, states, legals, turns, size)
            continue
        cands = bits(legal)
        sq = cands[int(rng.integers(len(cands)))]
        f = board.flips(me, opp, sq)
        me, opp = opp ^ f, me | f | (1 << sq)  # the mover becomes "opp"
        black_turn = not black_turn
        moves.append(sq)
        flips.append(_vec(f, size))
        _record(board, me, opp, black_turn, states, legals, turns, size)
    return Game(board.n, np.asarray(moves, np.int16), np.asarray(states, np.int8).reshape(-1, size),
                np.asarray(legals, dtype=np.bool_).reshape(-1, size), np.asarray(flips, dtype=np.bool_).reshape(-1, size),
                np.asarray(turns, dtype=np.bool_))


def _record(board: Board, me: int, opp: int, black_turn: bool, states: list[np.ndarray], legals: list[np.ndarray],
            turns: list[bool], size: int) -> None:
    s = np.zeros(size, np.int8)
    s[bits(me)] = MINE
    s[bits(opp)] = THEIRS
    states.append(s)
    legals.append(_vec(board.legal(me, opp), size))
    turns.append(black_turn)


def random_games(n_games: int, n: int = 8, seed: int = 0, passes: bool = True) -> list[Game]:
    """``n_games`` random games, the same for the same seed."""
    board, rng = Board(n), np.random.default_rng(seed)
    return [random_game(board, rng, passes) for _ in range(n_games)]
