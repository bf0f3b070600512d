"""A quick capability check beyond first-token KL: multiple-choice questions scored by log-likelihood.

Each question is put as ``Question: ...\\nAnswer:`` (plain text, no chat template, so the check reads the
language model rather than the chat behaviour an edit targets) and every option is scored by its total
log-probability as the continuation, divided by its length in characters (the length-normalised accuracy
of the common evaluation harnesses); the highest wins. The 60 questions were written for featurelens:
general knowledge, arithmetic, word sense and everyday reasoning, easy enough that a 135M model is well
above the 25% chance level, so an edit that costs capability shows up as lost points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

QUESTIONS: tuple[tuple[str, tuple[str, str, str, str], int], ...] = (
    ("What is the capital of France?", ("Paris", "Berlin", "Madrid", "Rome"), 0),
    ("What is the capital of Japan?", ("Beijing", "Seoul", "Tokyo", "Bangkok"), 2),
    ("What is the capital of Italy?", ("Milan", "Rome", "Venice", "Naples"), 1),
    ("What is the capital of Germany?", ("Munich", "Hamburg", "Vienna", "Berlin"), 3),
    ("What is the capital of Spain?", ("Madrid", "Lisbon", "Barcelona", "Seville"), 0),
    ("What is the capital of England?", ("Dublin", "Edinburgh", "London", "Cardiff"), 2),
    ("What is the capital of Egypt?", ("Cairo", "Nairobi", "Lagos", "Tunis"), 0),
    ("What is the capital of Russia?", ("Kyiv", "Moscow", "Warsaw", "Minsk"), 1),
    ("How many days are in a week?", ("five", "six", "seven", "eight"), 2),
    ("How many legs does a spider have?", ("six", "eight", "ten", "four"), 1),
    ("How many months are in a year?", ("ten", "eleven", "twelve", "thirteen"), 2),
    ("How many hours are in a day?", ("twelve", "twenty-four", "sixty", "one hundred"), 1),
    ("What is 2 + 2?", ("3", "4", "5", "6"), 1),
    ("What is 5 + 3?", ("7", "9", "8", "6"), 2),
    ("What is 10 - 4?", ("6", "5", "7", "4"), 0),
    ("What is 3 times 3?", ("6", "12", "9", "33"), 2),
    ("What is 100 divided by 10?", ("1", "10", "100", "1000"), 1),
    ("What is half of 50?", ("20", "25", "30", "100"), 1),
    ("What color is the sky on a clear day?", ("green", "red", "blue", "black"), 2),
    ("What color is grass?", ("green", "purple", "orange", "white"), 0),
    ("What color is snow?", ("black", "white", "brown", "red"), 1),
    ("What do bees make?", ("milk", "silk", "honey", "wool"), 2),
    ("What do cows drink?", ("water", "oil", "coffee", "gasoline"), 0),
    ("Which animal barks?", ("cat", "dog", "fish", "bird"), 1),
    ("Which animal says meow?", ("dog", "cow", "cat", "sheep"), 2),
    ("Which animal is the largest?", ("mouse", "cat", "horse", "blue whale"), 3),
    ("What do plants need from the sun?", ("light", "sound", "sand", "plastic"), 0),
    ("What gas do humans need to breathe?", ("helium", "oxygen", "neon", "carbon monoxide"), 1),
    ("What is frozen water called?", ("steam", "ice", "fog", "rain"), 1),
    ("At what temperature in Celsius does water freeze?", ("0 degrees", "50 degrees", "100 degrees", "200 degrees"), 0),
    ("Which planet do we live on?", ("Mars", "Venus", "Earth", "Jupiter"), 2),
    ("What is the closest star to Earth?", ("the Moon", "the Sun", "Mars", "Sirius"), 1),
    ("What does the Moon orbit?", ("the Sun", "Mars", "the Earth", "Jupiter"), 2),
    ("Which season comes after winter?", ("autumn", "summer", "spring", "winter"), 2),
    ("Which is the opposite of hot?", ("warm", "cold", "big", "fast"), 1),
    ("Which is the opposite of up?", ("down", "left", "over", "high"), 0),
    ("Which is the opposite of happy?", ("glad", "sad", "tall", "early"), 1),
    ("Which word means the same as big?", ("tiny", "large", "short", "thin"), 1),
    ("Which word means the same as fast?", ("slow", "quick", "heavy", "quiet"), 1),
    ("What do you use to write on paper?", ("a pen", "a spoon", "a shoe", "a pillow"), 0),
    ("What do you use to cut paper?", ("a fork", "scissors", "a cup", "a towel"), 1),
    ("Where do fish live?", ("in trees", "in water", "in the desert", "in the sky"), 1),
    ("What do you wear on your feet?", ("a hat", "gloves", "shoes", "a scarf"), 2),
    ("What do you call a baby dog?", ("a kitten", "a puppy", "a calf", "a chick"), 1),
    ("What do you call a baby cat?", ("a kitten", "a foal", "a lamb", "a cub"), 0),
    ("Which meal is eaten in the morning?", ("dinner", "supper", "breakfast", "midnight snack"), 2),
    ("Which fruit is yellow and curved?", ("apple", "banana", "grape", "cherry"), 1),
    ("Which of these is a vegetable?", ("carrot", "rock", "chair", "spoon"), 0),
    ("Which language is spoken in Brazil?", ("Spanish", "Portuguese", "French", "Italian"), 1),
    ("Which language is mainly spoken in Mexico?", ("Spanish", "German", "Japanese", "Russian"), 0),
    ("Who wrote Romeo and Juliet?", ("Charles Dickens", "William Shakespeare", "Mark Twain", "Jane Austen"), 1),
    ("What is the largest ocean on Earth?", ("the Atlantic", "the Indian", "the Arctic", "the Pacific"), 3),
    ("How many sides does a triangle have?", ("two", "three", "four", "five"), 1),
    ("How many sides does a square have?", ("three", "four", "five", "six"), 1),
    ("What shape is a ball?", ("round", "square", "flat", "triangular"), 0),
    ("If you drop a glass on a stone floor, it will probably", ("break", "float", "grow", "sing"), 0),
    ("If it is raining, you should take", ("an umbrella", "sunglasses only", "a sled", "a swimsuit"), 0),
    ("To boil water, you need", ("heat", "ice", "wind", "darkness"), 0),
    ("A doctor works in a", ("hospital", "bakery", "garage", "farm field"), 0),
    ("A pilot flies a", ("train", "plane", "bicycle", "boat"), 1),
)


@torch.no_grad()
def option_logprobs(lm: Any, context: str, options: Sequence[str]) -> list[float]:
    """Total log-probability of each option (with a leading space) as the continuation of ``context``."""
    tok = lm.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    prefix = list(ctx)
    rows = [prefix + list(tok(" " + o, add_special_tokens=False)["input_ids"]) for o in options]
    T = max(len(r) for r in rows)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # right padding: positions stay 0..len-1 for every row
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
    lp = torch.log_softmax(logits.double().cpu(), -1)
    out = []
    for i, r in enumerate(rows):
        tgt = torch.tensor(r[len(prefix):])
        out.append(float(lp[i, len(prefix) - 1 : len(r) - 1].gather(-1, tgt.unsqueeze(-1)).sum()))
    return out


def capability_check(lm: Any, questions: Sequence[tuple[str, Sequence[str], int]] = QUESTIONS) -> dict[str, Any]:
    """Length-normalised multiple-choice accuracy (with a Wilson interval) and the per-question picks."""
    from featurelens.directions.completions import rate

    picks, right = [], []
    for q, opts, answer in questions:
        lps = option_logprobs(lm, f"Question: {q}\nAnswer:", opts)
        scores = [lp / max(1, len(" " + o)) for lp, o in zip(lps, opts)]
        k = max(range(len(opts)), key=lambda j: scores[j])
        picks.append(k)
        right.append(k == answer)
    return {"accuracy": rate(right), "picks": picks, "n": len(questions)}


__all__ = ["QUESTIONS", "capability_check", "option_logprobs"]
