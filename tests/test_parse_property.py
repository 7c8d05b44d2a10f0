"""Model output is input too: `parse_ranking` and `parse_setwise` never raise, on any string, and always return a
permutation / None or a valid index. 12,000 random and adversarial completions from one seeded `random.Random`.
"""

import random

from rearank import answer_format, parse_ranking
from setwise import parse_setwise

# pieces a completion can be made of: tags (also broken and nested), brackets, separators, ids of every kind
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<answer><answer>", "</answer></answer>", "<think><answer>",
        "</think></answer>", "<answer", "answer>", "</", "<", ">", "<<answer>>"]
DIGITS = "0123456789٠١٢٣٤٥٦٧٨٩０１２３４５６７８９۳৩߃१๓"  # ASCII, Arabic-Indic, fullwidth, Persian, Bengali, NKo, ...
NOISE = ["[", "]", "[]", "[[", "]]", " > ", ">", ">>", "-", ", ", "\n", "\t", " ", "...", "①", "²", "½", "Ⅷ", "𝟙",
         "\x00", "\ud800", "é", "漢字", "🙂", "\u200b", "\ufeff", "passage", "rank"]


def number(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return str(rng.randint(-5, 30))  # in and around the usual range, negatives included
    if kind == 1:
        return "9" * rng.choice([10, 20, 300, 5000])  # huge: int() refuses more than 4,300 digits
    if kind == 2:
        return "".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 4)))  # unicode digits
    if kind == 3:
        return "0" * rng.randint(1, 12) + str(rng.randint(0, 9))  # leading zeros
    if kind == 4:
        return f"{rng.uniform(-3, 30):.2f}"
    if kind == 5:
        return str(rng.randint(-(10**12), 10**12))
    return rng.choice(["", "-0", "+3", "1e3", "0x1f", "nan", "inf"])


def piece(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(TAGS)
    if kind == 1:
        return f"[{number(rng)}]"
    if kind == 2:
        return number(rng)
    return rng.choice(NOISE)


def completion(rng: random.Random, i: int) -> str:
    if i % 400 == 0:  # a 100k-character answer: a ranking list, or one id repeated, or plain noise
        body = rng.choice([" > ".join(f"[{k % 25}]" for k in range(20_000)), "[1]" * 34_000, "x" * 100_000])
        return f"<think>{'a' * rng.randint(0, 1000)}</think><answer>{body}</answer>"[: 100_000 + 40]
    if i % 7 == 0:  # random characters of any kind
        return "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 200)))
    return "".join(piece(rng) for _ in range(rng.randint(0, 60)))


def cases(count: int = 12_000):
    """(completion, number of passages shown) pairs, the same ones on every run."""
    rng = random.Random(0)
    for i in range(count):
        yield completion(rng, i), rng.choice([0, 1, 2, 3, 5, 10, 20, 30])


def test_parsers_never_raise_and_return_valid_results():
    for text, n in cases():
        order = parse_ranking(text, n)
        assert sorted(order) == list(range(n)), (text[:200], n)
        pick = parse_setwise(text, n)
        assert pick is None or (type(pick) is int and 0 <= pick < n), (text[:200], n, pick)
        f1, f2 = answer_format(text)
        assert isinstance(f1, bool) and isinstance(f2, bool)


def test_the_generator_reaches_the_cases_it_is_for():
    # guards the property test itself: the adversarial kinds really occur in the 12,000 completions
    texts = [text for text, _ in cases()]
    assert any(len(t) >= 100_000 for t in texts)
    assert any("9" * 5000 in t for t in texts)
    assert any("٣" in t for t in texts) and any("[-" in t for t in texts)
    assert any("<answer><answer>" in t for t in texts)
    # and the parsers read something out of some of them (not all fall back to the input order)
    assert sum(parse_ranking(t, 10) != list(range(10)) for t in texts) > 1000
    assert sum(parse_setwise(t, 10) is not None for t in texts) > 1000
