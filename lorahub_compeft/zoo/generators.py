"""The zoo's generators: word pools, one sampler per task family, and per task a function
rng -> (question, target), registered in QUESTIONS (tasks.py holds the specs and the API)."""
from __future__ import annotations

import random
from typing import Callable

# ---------------------------------------------------------------------------- word pools
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf",
           "fox", "rabbit", "mouse", "duck", "goose", "eagle", "owl", "frog", "snake", "whale"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black",
          "white", "gray", "violet", "gold", "silver", "teal", "crimson"]
FOODS = ["apple", "bread", "cheese", "rice", "soup", "pasta", "cake", "egg", "banana",
         "carrot", "potato", "pizza", "salad", "honey", "butter", "cookie", "grape", "lemon"]
OBJECTS = ["chair", "table", "lamp", "book", "pencil", "cup", "door", "window", "clock",
           "phone", "shoe", "hat", "key", "box", "ball", "bottle"]
LIST_WORDS = ANIMALS + COLORS + FOODS + OBJECTS
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Karen", "Leo", "Maria", "Nora", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina",
         "Umar", "Vera", "Walter", "Xena", "Yusuf", "Zoe", "Hugo", "Ida", "Kofi", "Lena"]
BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
OPTION_LETTERS = "ABCDE"


# ---------------------------------------------------------------------------- families
# Each sampler draws one structured case from a family's input distribution; the task
# functions below turn a case into (question, target).

def sample_boolean(rng: random.Random, length: int | None = None) -> tuple[str, bool]:
    """A BBH-style Boolean expression of `length` space-separated tokens (default 4-8),
    e.g. "not ( True ) and False", with its Python value."""
    length = length or rng.randint(4, 8)
    while True:  # rejection: the grammar rarely hits an exact length on the first try
        tokens, value = _bool_expr(rng, depth=0)
        if len(tokens) == length:
            return " ".join(tokens), value


def _bool_expr(rng, depth):
    n_terms = rng.choice([1, 2, 2, 3, 3, 4]) if depth == 0 else rng.choice([1, 2, 2])
    tokens, values, ops = [], [], []
    for i in range(n_terms):
        if i:
            ops.append(rng.choice(["and", "or"]))
            tokens.append(ops[-1])
        t, v = _bool_term(rng, depth)
        tokens += t
        values.append(v)
    # Python precedence: `and` binds tighter than `or`.
    groups, current = [], values[0]
    for op, v in zip(ops, values[1:]):
        if op == "and":
            current = current and v
        else:
            groups.append(current)
            current = v
    groups.append(current)
    return tokens, any(groups)


def _bool_term(rng, depth):
    nots = rng.choice([0, 0, 0, 1, 1, 2, 3])
    if depth < 1 and rng.random() < 0.3:
        inner, v = _bool_expr(rng, depth + 1)
        tokens = ["("] + inner + [")"]
    else:
        v = rng.random() < 0.5
        tokens = ["(", str(v), ")"] if rng.random() < 0.15 else [str(v)]
    return ["not"] * nots + tokens, (v if nots % 2 == 0 else not v)


def sample_liars(rng: random.Random, people: int | None = None) -> dict:
    """A web-of-lies chain: the first person's honesty is stated, each next person comments
    on the previous one. Returns the sentences, the names and each person's honesty."""
    people = people or rng.randint(1, 5)
    names = rng.sample(NAMES, people)
    honest = [rng.random() < 0.5]
    sentences = [f"{names[0]} {'tells the truth' if honest[0] else 'lies'}."]
    for prev, name in zip(names, names[1:]):
        claim = rng.random() < 0.5  # "prev tells the truth" (True) or "prev lies" (False)
        honest.append(claim == honest[-1])
        sentences.append(f"{name} says {prev} {'tells the truth' if claim else 'lies'}.")
    return {"text": " ".join(sentences), "names": names, "honest": honest}


_HEADINGS = {(0, 1): "forward", (0, -1): "backward", (-1, 0): "left", (1, 0): "right"}
_TURNS = {"left": lambda h: (-h[1], h[0]), "right": lambda h: (h[1], -h[0]),
          "around": lambda h: (-h[0], -h[1])}


def sample_walk(rng: random.Random) -> dict:
    """A navigate-style walk, half of which return to the start: either the 'Always face
    forward.' form with absolute directions or the form with turns, both as in BBH."""
    back = rng.random() < 0.5
    while True:
        walk = _walk_facing_forward(rng, back) if rng.random() < 0.5 else _walk_turning(rng, back)
        if walk and len(walk["steps"]) <= 6:
            return walk


def _steps_text(n: int) -> str:
    return f"Take {n} {'step' if n == 1 else 'steps'}"


def _walk_facing_forward(rng, back):
    moves = [(rng.randint(1, 10), rng.choice(list(_HEADINGS))) for _ in range(rng.randint(1, 3))]
    x = sum(n * d[0] for n, d in moves)
    y = sum(n * d[1] for n, d in moves)
    if back:  # add the moves that cancel the displacement on each axis
        for amount, unit in ((x, (1, 0)), (y, (0, 1))):
            if abs(amount) > 10:
                return None
            if amount:
                moves.append((abs(amount), (-unit[0], -unit[1]) if amount > 0 else unit))
        rng.shuffle(moves)
    elif (x, y) == (0, 0):
        return None
    steps = [f"{_steps_text(n)} {_HEADINGS[d]}." for n, d in moves]
    return {"text": "Always face forward. " + " ".join(steps), "steps": steps, "back": back,
            "total": sum(n for n, _ in moves)}


def _walk_turning(rng, back):
    heading, x, y, steps, total = (0, 1), 0, 0, [], 0
    for i in range(rng.randint(2, 5)):
        if i == 0 or rng.random() < 0.6:
            n = rng.randint(1, 10)
            steps.append(f"{_steps_text(n)}.")
            x, y, total = x + n * heading[0], y + n * heading[1], total + n
        else:
            turn = rng.choice(list(_TURNS))
            steps.append(f"Turn {turn}.")
            heading = _TURNS[turn](heading)
    if back and (x, y) != (0, 0):  # walk home, if home is one straight line away
        n = abs(x) + abs(y)
        if (x and y) or n > 10:
            return None
        home = (-x // n, -y // n)
        while heading != home:
            turn = "around" if heading == (-home[0], -home[1]) else rng.choice(["left", "right"])
            steps.append(f"Turn {turn}.")
            heading = _TURNS[turn](heading)
        steps.append(f"{_steps_text(n)}.")
        total += n
    elif not back and (x, y) == (0, 0):
        return None
    return {"text": " ".join(steps), "steps": steps, "back": back, "total": total}


def sample_dyck(rng: random.Random) -> dict:
    """A prefix of a balanced bracket sequence (BBH dyck_languages style) with 1-3 brackets
    left open; returns the prefix and the open stack."""
    while True:
        tokens, stack = [], []
        for _ in range(rng.randint(2, 14)):
            if stack and rng.random() < 0.45:
                tokens.append(BRACKETS[stack.pop()])
            else:
                stack.append(rng.choice(list(BRACKETS)))
                tokens.append(stack[-1])
        if 1 <= len(stack) <= 3:
            return {"text": " ".join(tokens), "stack": stack}


def sample_list(rng: random.Random) -> list[str]:
    return rng.sample(LIST_WORDS, rng.randint(3, 5))


def sample_list_with_one(rng: random.Random, pool: list[str]) -> list[str]:
    """A word list holding exactly one word of `pool`, at a random place."""
    ws = rng.sample([w for w in LIST_WORDS if w not in pool], rng.randint(2, 4))
    ws.insert(rng.randint(0, len(ws)), rng.choice(pool))
    return ws


def sample_pair(rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if a != b:
            return a, b


def sample_options(rng: random.Random) -> dict:
    """Three options, one each of an animal, a colour and a food, in random order."""
    kinds = ["animal", "color", "food"]
    rng.shuffle(kinds)
    pools = {"animal": ANIMALS, "color": COLORS, "food": FOODS}
    words = [rng.choice(pools[k]) for k in kinds]
    text = " ".join(f"({OPTION_LETTERS[i]}) {w}" for i, w in enumerate(words))
    return {"text": text, "word": dict(zip(kinds, words))}


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def _closing(stack: list[str]) -> str:
    return " ".join(BRACKETS[b] for b in reversed(stack))


# ---------------------------------------------------------------------------- tasks
# task name -> rng -> (question, target). The instruction lives in the task's JSON spec.
QUESTIONS: dict[str, Callable[[random.Random], tuple[str, str]]] = {}


def _task(name):
    def register(fn):
        QUESTIONS[name] = fn
        return fn
    return register


@_task("bool_value")
def _(rng):
    e, v = sample_boolean(rng)
    return e, str(v)


@_task("bool_yes_no")
def _(rng):
    e, v = sample_boolean(rng)
    return e, _yes(v)


@_task("bool_count_false")
def _(rng):
    e, _v = sample_boolean(rng)
    return e, str(e.split().count("False"))


@_task("bbh_boolean_expressions")
def _(rng):
    e, v = sample_boolean(rng, length=8)  # BBH: always 8 tokens, then "is"
    return f"{e} is", str(v)


@_task("liars_last_honest")
def _(rng):
    c = sample_liars(rng)
    return f"{c['text']} Is {c['names'][-1]} honest?", _yes(c["honest"][-1])


@_task("liars_count_people")
def _(rng):
    c = sample_liars(rng)
    return c["text"], str(len(c["names"]))


@_task("liars_count_lies")
def _(rng):
    c = sample_liars(rng)
    return c["text"], str(c["text"].split().count("lies."))


@_task("liars_last_true")
def _(rng):
    c = sample_liars(rng)
    return f"{c['text']} Is {c['names'][-1]} honest?", str(c["honest"][-1])


@_task("bbh_web_of_lies")
def _(rng):
    c = sample_liars(rng, people=5)
    return (f"Question: {c['text']} Does {c['names'][-1]} tell the truth?",
            _yes(c["honest"][-1]))


@_task("walk_returns")
def _(rng):
    w = sample_walk(rng)
    return w["text"], _yes(w["back"])


@_task("walk_total_steps")
def _(rng):
    w = sample_walk(rng)
    return w["text"], str(w["total"])


@_task("walk_returns_true")
def _(rng):
    w = sample_walk(rng)
    return w["text"], str(w["back"])


@_task("bbh_navigate")
def _(rng):
    w = sample_walk(rng)
    return ("If you follow these instructions, do you return to the starting point? "
            f"{w['text']}\nOptions:\n- Yes\n- No"), _yes(w["back"])


@_task("dyck_close")
def _(rng):
    d = sample_dyck(rng)
    return d["text"], _closing(d["stack"])


@_task("dyck_count_open")
def _(rng):
    d = sample_dyck(rng)
    return d["text"], str(len(d["stack"]))


@_task("dyck_last_open")
def _(rng):
    d = sample_dyck(rng)
    return d["text"], d["stack"][-1]


@_task("bbh_dyck_languages")
def _(rng):
    d = sample_dyck(rng)
    return ("Complete the rest of the sequence, making sure that the parentheses are closed "
            f"properly. Input: {d['text']}"), _closing(d["stack"])


@_task("list_count")
def _(rng):
    ws = sample_list(rng)
    return " ".join(ws), str(len(ws))


@_task("list_has_animal")
def _(rng):
    ws = sample_list(rng)
    if rng.random() < 0.5:  # half the lists hold no animal, so Yes and No are balanced
        others = [w for w in LIST_WORDS if w not in ANIMALS]
        ws = rng.sample(others, len(ws))
    return " ".join(ws), _yes(any(w in ANIMALS for w in ws))


@_task("list_name_food")
def _(rng):
    ws = sample_list_with_one(rng, FOODS)
    return " ".join(ws), next(w for w in ws if w in FOODS)


@_task("heldout_list_edible")
def _(rng):
    ws = sample_list_with_one(rng, FOODS)
    return " ".join(ws), next(w for w in ws if w in FOODS)


@_task("pair_sum")
def _(rng):
    a, b = sample_pair(rng)
    return f"{a} and {b}", str(a + b)


@_task("pair_max")
def _(rng):
    a, b = sample_pair(rng)
    return f"{a} and {b}", str(max(a, b))


@_task("pair_min")
def _(rng):
    a, b = sample_pair(rng)
    return f"{a} and {b}", str(min(a, b))


@_task("heldout_pair_total")
def _(rng):
    a, b = sample_pair(rng)
    return f"{a} and {b}", str(a + b)


@_task("option_name_animal")
def _(rng):
    o = sample_options(rng)
    return o["text"], o["word"]["animal"]


@_task("option_name_color")
def _(rng):
    o = sample_options(rng)
    return o["text"], o["word"]["color"]


@_task("option_name_food")
def _(rng):
    o = sample_options(rng)
    return o["text"], o["word"]["food"]


@_task("heldout_option_creature")
def _(rng):
    o = sample_options(rng)
    return o["text"], o["word"]["animal"]
