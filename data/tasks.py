"""Chat data and tasks with checkable answers, for the SFT and RL stages.

    chat template   format_chat(turns=...) -> (ids, loss_mask) in Gemma's layout; parse_chat
                    inverts decoded text; prompt_ids / completion_text for sampling
    SFT rows        pack_examples packs whole (ids, mask) examples into rows of the same batch
                    format as data/pipeline.py; sft_rows does format + pack; get_batch / batches
                    serve them in a seeded order per epoch, addressable by batch index
    data sources    load_jsonl (prompt/response or messages lines, strictly checked) and the
                    registered task generators TASKS, picked by name with make_task

    from data import tasks
    train = tasks.make_task("arithmetic", split="train", n=10_000, seed=0, max_value=50)
    rows = tasks.sft_rows(examples=train, tokenizer=tok, seq_len=32)
    batch = tasks.get_batch(rows, batch_size=16, seed=0, index=step)   # resumes by step alone
    ids = tasks.prompt_ids(prompt=train[0]["prompt"], tokenizer=tok)   # for sampling (RL, eval)

Every task example is {"id", "prompt", "answer", "response"} (code examples add "tests"); the
rewards that check answers live in data/rewards.py.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from data.pipeline import BatchSource
from data.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer

# ---------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------

_ROLE_ALIASES = {"user": "user", "model": "model", "assistant": "model"}
VALID_ROLES = ("user", "model", "assistant", "system")


def _control_id(tokenizer: Tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token!r} token; the chat template needs it")
    return i


def normalize_turns(turns: Sequence[dict]) -> list[dict]:
    """Turns as Gemma sees them: roles user/model, alternating from user, system merged.

    "assistant" becomes "model"; a leading "system" turn is prepended to the first user turn's
    content followed by a blank line (Gemma has no system role). Raises ValueError on any other
    role, a system turn that is not first or not followed by a user turn, non-alternating roles,
    or content that contains a turn marker (it would become a control token).
    """
    out: list[dict] = []
    system: str | None = None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"turn {i} must be a dict with 'role' and 'content', got {turn!r}")
        role, content = turn["role"], turn["content"]
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: content must be a string, got {type(content).__name__}")
        for marker in (START_OF_TURN, END_OF_TURN):
            if marker in content:
                raise ValueError(f"turn {i}: content contains the turn marker {marker!r}")
        if role == "system":
            if i != 0:
                raise ValueError(f"turn {i}: a 'system' turn may only be the first turn")
            system = content
            continue
        if role not in _ROLE_ALIASES:
            raise ValueError(f"turn {i}: unknown role {role!r}; valid roles: {list(VALID_ROLES)}")
        role = _ROLE_ALIASES[role]
        want = "user" if len(out) % 2 == 0 else "model"
        if role != want:
            raise ValueError(
                f"turn {i}: role {turn['role']!r} out of order; roles must alternate "
                "user/model/user/... starting with user (after an optional system turn)"
            )
        if system is not None:
            content, system = f"{system}\n\n{content}", None
        out.append({"role": role, "content": content})
    if system is not None:
        raise ValueError("a 'system' turn must be followed by a user turn")
    return out


def format_chat(
    *, turns: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation in Gemma's chat layout.

        [BOS] <start_of_turn>user\\n{content}<end_of_turn>\\n <start_of_turn>model\\n{content}...

    BOS and the turn markers are token ids, never text. loss_mask is 1 exactly on the content
    tokens of model turns and their <end_of_turn> (what the model must produce, stopping
    included), 0 on BOS, user turns, role headers and the "\\n" after <end_of_turn>.

    Each piece (header, content, marker, newline) is tokenized on its own and the ids are
    concatenated, so no BPE merge crosses a mask boundary and the mask is exact; the ids can
    differ from tokenizing the whole string at once where a merge would have crossed a boundary.
    add_generation_prompt appends "<start_of_turn>model\\n" (mask 0) for sampling a reply.
    """
    sot = _control_id(tokenizer, START_OF_TURN)
    eot = _control_id(tokenizer, END_OF_TURN)
    newline = tokenizer.encode("\n")
    headers = {role: [sot, *tokenizer.encode(f"{role}\n")] for role in ("user", "model")}
    ids, mask = [tokenizer.bos_id], [0]

    def add(piece: list[int], learn: bool) -> None:
        ids.extend(piece)
        mask.extend([int(learn)] * len(piece))

    for turn in normalize_turns(turns):
        learn = turn["role"] == "model"
        add(headers[turn["role"]], False)
        add(tokenizer.encode(turn["content"]), learn)
        add([eot], learn)
        add(newline, False)
    if add_generation_prompt:
        add(headers["model"], False)
    return ids, mask


_TURN = re.compile(
    re.escape(START_OF_TURN) + r"([^\n]*)\n(.*?)(" + re.escape(END_OF_TURN) + r"\n?|\Z)", re.S
)


def parse_chat(text: str) -> list[dict]:
    """The turns of decoded chat text, the inverse of decode(format_chat(...)).

    A leading "<bos>" and trailing "<eos>"/"<pad>" are ignored. A last turn without
    <end_of_turn> (a generation prompt, or a sample cut short) is returned with the text so far.
    A merged system turn comes back as part of the first user turn. Raises ValueError on text
    outside turns.
    """
    text = text.removeprefix("<bos>")
    text = re.sub(r"(<eos>|<pad>)+\Z", "", text)
    turns, pos = [], 0
    while pos < len(text):
        m = _TURN.match(text, pos)
        if m is None:
            raise ValueError(f"text outside a turn at character {pos}: {text[pos : pos + 40]!r}")
        turns.append({"role": m.group(1), "content": m.group(2)})
        pos = m.end()
    return turns


def prompt_ids(*, prompt: str, tokenizer: Tokenizer) -> list[int]:
    """A single user turn followed by the model's header: what sampling continues from."""
    ids, _ = format_chat(
        turns=[{"role": "user", "content": prompt}], tokenizer=tokenizer, add_generation_prompt=True
    )
    return ids


def completion_text(*, ids: Sequence[int], tokenizer: Tokenizer) -> str:
    """Sampled ids decoded up to (excluding) the first <end_of_turn> or <eos>."""
    stops = {_control_id(tokenizer, END_OF_TURN), tokenizer.eos_id}
    ids = [int(i) for i in ids]
    end = next((k for k, i in enumerate(ids) if i in stops), len(ids))
    return tokenizer.decode(ids[:end])


# ---------------------------------------------------------------------------------------------
# Packing for SFT
# ---------------------------------------------------------------------------------------------


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices per row, each example in the first row with room (first-fit).

    A max-tree over the rows' free space finds that row in O(log n) rather than scanning all
    open rows; unopened rows have full capacity, so the leftmost fitting row is either an open
    row or the next new one.
    """
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [0] * (2 * size)
    for i in range(len(lengths)):
        tree[size + i] = capacity
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    rows: list[list[int]] = []
    for example, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(example)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def pack_examples(
    *, examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Whole (ids, loss_mask) examples packed first-fit into rows, in data/pipeline.py's format.

    Each row holds seq_len + 1 tokens; inputs = row[:-1], targets = row[1:], so an example of up
    to seq_len + 1 tokens fits one row whole. A longer example is truncated to its first
    seq_len + 1 tokens (what follows, typically the end of the reply, is dropped). Examples are
    placed in input order into the first row with room, so the packing is deterministic.

    Returns arrays of shape [rows, seq_len]: inputs, targets (int32; pad_id where the next token
    is not of the same example), loss_mask (float32; the example mask of the target token, 0
    across example boundaries and on padding), segment_ids (int32; 1, 2, ... per example in the
    row, 0 on padding), positions (int32; from 0 in each example).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if not examples:
        raise ValueError("no examples to pack")
    width = seq_len + 1
    clipped = []
    for k, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise ValueError(f"example {k}: {len(ids)} ids but {len(mask)} mask values")
        if not ids:
            raise ValueError(f"example {k} is empty")
        clipped.append((ids[:width], mask[:width]))
    rows = _first_fit([len(ids) for ids, _ in clipped], width)
    tokens = np.full([len(rows), width], pad_id, np.int32)
    masks = np.zeros([len(rows), width], np.float32)
    segments = np.zeros([len(rows), width], np.int32)
    positions = np.zeros([len(rows), width], np.int32)
    for r, members in enumerate(rows):
        start = 0
        for segment, k in enumerate(members, start=1):
            ids, mask = clipped[k]
            end = start + len(ids)
            tokens[r, start:end] = ids
            masks[r, start:end] = mask
            segments[r, start:end] = segment
            positions[r, start:end] = np.arange(len(ids))
            start = end
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    return {
        "inputs": tokens[:, :-1].copy(),
        "targets": np.where(same, tokens[:, 1:], pad_id).astype(np.int32),
        "loss_mask": np.where(same, masks[:, 1:], 0).astype(np.float32),
        "segment_ids": segments[:, :-1].copy(),
        "positions": positions[:, :-1].copy(),
    }


def example_turns(example: dict) -> list[dict]:
    """The conversation of an example: its "messages", or its prompt and response."""
    if "messages" in example:
        return list(example["messages"])
    if "prompt" in example and "response" in example:
        return [
            {"role": "user", "content": example["prompt"]},
            {"role": "model", "content": example["response"]},
        ]
    raise ValueError(
        f"example {example.get('id', '?')!r} has neither 'messages' nor 'prompt' and "
        "'response'; SFT needs a reply to learn"
    )


def sft_rows(*, examples: Sequence[dict], tokenizer: Tokenizer, seq_len: int) -> dict:
    """All examples formatted as chats and packed: arrays of shape [rows, seq_len]."""
    formatted = [
        format_chat(turns=example_turns(example), tokenizer=tokenizer) for example in examples
    ]
    return pack_examples(examples=formatted, seq_len=seq_len, pad_id=tokenizer.pad_id)


class _ArrayRows:
    """Packed row arrays behind the interface BatchSource reads (len and rows(row_ids))."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.arrays = rows
        self.num_rows = len(rows["inputs"])
        if self.num_rows == 0:
            raise ValueError("no rows to batch")

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[row_ids] for k, v in self.arrays.items()}


def batch_source(rows: dict, *, batch_size: int, seed: int | None) -> BatchSource:
    """The endless shuffled-epoch stream of `rows`, indexable by batch: hold one per stage, so
    an epoch's order is drawn once (it caches it), not once per batch."""
    # The same stream as the pretraining pipeline: epoch e is the rows in the order
    # np.random.default_rng([seed, e]).permutation, epochs back to back, batch b its entries
    # [b * batch_size, (b + 1) * batch_size) (a batch may span two epochs).
    return BatchSource(
        _ArrayRows(rows),
        global_batch_size=batch_size,
        seed=seed,
        num_epochs=None,
        process_index=0,
        process_count=1,
    )


def get_batch(rows: dict, *, batch_size: int, seed: int | None, index: int) -> dict:
    """Batch `index` of the endless shuffled-epoch stream of `rows`: a pure function of its args.

    seed=None serves the rows in order every epoch.
    """
    return batch_source(rows, batch_size=batch_size, seed=seed)[index]


def batches(
    rows: dict, *, batch_size: int, seed: int | None, start_batch: int = 0
) -> Iterator[dict]:
    """Batches start_batch, start_batch + 1, ... of the stream get_batch defines (endless)."""
    source = batch_source(rows, batch_size=batch_size, seed=seed)
    index = start_batch
    while True:
        yield source[index]
        index += 1


# ---------------------------------------------------------------------------------------------
# JSONL chat data
# ---------------------------------------------------------------------------------------------

_JSONL_KEYS = ("id", "prompt", "response", "messages", "answer", "tests")


def _check_record(record: object) -> str | None:
    """What is wrong with one JSONL record, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    unknown = sorted(set(record) - set(_JSONL_KEYS))
    if unknown:
        return f"unknown keys {unknown}; valid keys: {list(_JSONL_KEYS)}"
    for key in ("id", "prompt", "response", "answer"):
        if key in record and not isinstance(record[key], str):
            return f"{key!r} must be a string, got {type(record[key]).__name__}"
    tests = record.get("tests", [])
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        return "'tests' must be a list of strings"
    if "messages" in record:
        if "prompt" in record or "response" in record:
            return "has both 'messages' and 'prompt'/'response'; use one form"
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {'role', 'content'} objects"
        try:
            normalize_turns(messages)
        except ValueError as e:
            return f"'messages': {e}"
        return None
    if "prompt" not in record:
        return "missing key 'prompt' (or 'messages')"
    if "response" not in record and "answer" not in record:
        return "a 'prompt' needs a 'response' (for SFT) or an 'answer' (for RL)"
    return None


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Chat examples from a JSONL file, one object a line (blank lines skipped).

    A line is {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]},
    optionally with "answer" (str), "tests" (list of str) and "id" (str; default
    "<file name>:<line>"); a prompt without response needs an answer (an RL prompt). Errors
    name the file, the line and what is wrong.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat data file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from e
            problem = _check_record(record)
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: {problem}")
            examples.append({"id": f"{os.path.basename(path)}:{lineno}", **record})
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


# ---------------------------------------------------------------------------------------------
# Tasks with checkable answers
# ---------------------------------------------------------------------------------------------

SPLITS = ("train", "test")
# The share of the problem space held out for test, by a hash of the prompt text: a problem
# lands in the same split whatever the seed, n or options (e.g. a wider number range).
TEST_PERCENT = 10


def split_of(key: str) -> str:
    """The split a problem belongs to, from a hash of its prompt (or other canonical key)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _draw(
    *, task: str, split: str, n: int, seed: int, problem: Callable[[np.random.Generator], dict]
) -> list[dict]:
    """n problems of `split`, drawn by `problem(rng)` and kept when their prompt hashes there.

    Problems are distinct while the problem space allows (up to 20 * n draws that repeat one
    already taken), then repeat: a small space still yields n examples.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out, seen, repeats, draws = [], set(), 0, 0
    while len(out) < n:
        draws += 1
        if draws > 1000 * n + 10_000:
            raise ValueError(f"task {task!r}: found no {split} problems; widen the options")
        p = problem(rng)
        if split_of(p["prompt"]) != split:
            continue
        if p["prompt"] in seen and repeats < 20 * n:
            repeats += 1
            continue
        seen.add(p["prompt"])
        out.append({"id": f"{task}-{split}-{seed}-{len(out)}", **p})
    return out


def _check_count(n: object) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")


def _check_numbers(*, min_value: int, max_value: int, ops: str, terms: int) -> list[str]:
    errors = []
    for name, v in (("min_value", min_value), ("max_value", max_value), ("terms", terms)):
        if not isinstance(v, int) or isinstance(v, bool):
            errors.append(f"{name}={v!r} must be an integer")
    if not errors and min_value > max_value:
        errors.append(f"min_value={min_value} is above max_value={max_value}")
    if not errors and terms < 2:
        errors.append(f"terms={terms} must be at least 2")
    if not isinstance(ops, str) or not ops or set(ops) - set("+-*"):
        errors.append(f"ops={ops!r} must be a non-empty string of the operators + - *")
    return errors


def _evaluate(values: Sequence[int], ops: Sequence[str]) -> int:
    """values[0] ops[0] values[1] ... with * before + and -, as Python evaluates it."""
    sums, product = [], values[0]
    signs = [1]
    for op, v in zip(ops, values[1:], strict=True):
        if op == "*":
            product *= v
        else:
            sums.append(product)
            signs.append(1 if op == "+" else -1)
            product = v
    sums.append(product)
    return sum(s * t for s, t in zip(signs, sums, strict=True))


def _expression(
    rng: np.random.Generator, *, min_value: int, max_value: int, ops: str, terms: int
) -> tuple[str, int]:
    values = [int(v) for v in rng.integers(min_value, max_value + 1, size=terms)]
    chosen = [ops[int(i)] for i in rng.integers(0, len(ops), size=terms - 1)]
    text = str(values[0])
    for op, v in zip(chosen, values[1:], strict=True):
        text += f" {op} " + (f"({v})" if v < 0 else str(v))
    return text, _evaluate(values, chosen)


def _imperfect(
    examples: list[dict], *, wrong_fraction: float, hedge_fraction: float, seed: int
) -> list[dict]:
    """Flaws of an imperfect teacher in the reference responses (deterministic per example);
    `answer` stays the ground truth, so a verifiable reward can correct what SFT learned:
    - wrong_fraction: the answer is off by 1-3;
    - hedge_fraction: a correct answer followed by a wrong second guess ("19, or maybe 21"),
      which the last-number rule (`math_exact`) scores wrong: a habit, not a gap in knowledge.
    """
    for name, f in (("wrong_fraction", wrong_fraction), ("hedge_fraction", hedge_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name}={f!r} must be in [0, 1)")
    out = []
    for k, ex in enumerate(examples):
        rng = np.random.default_rng([seed, k, 7919])
        draw = rng.random()
        offset = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        wrong = str(int(ex["answer"]) + offset)
        if draw < wrong_fraction:
            ex = {**ex, "response": wrong}
        elif draw < wrong_fraction + hedge_fraction:
            ex = {**ex, "response": f"{ex['answer']}, or maybe {wrong}"}
        out.append(ex)
    return out


def _raise_on(errors: list[str], task: str) -> None:
    if errors:
        raise ValueError(f"task {task!r}: " + "; ".join(errors))


def arithmetic(
    *,
    split: str,
    n: int,
    seed: int,
    min_value: int = 0,
    max_value: int = 20,
    ops: str = "+-",
    terms: int = 2,
    wrong_fraction: float = 0.0,
    hedge_fraction: float = 0.0,
) -> list[dict]:
    """Prompts like "What is 7 + 12?" -> "19".

    `terms` integers drawn from [min_value, max_value], joined by operators drawn from `ops`
    (* binds before + and -); negative operands after the first are parenthesized.
    `wrong_fraction` of the reference responses are off by 1-3 and `hedge_fraction` add a wrong
    second guess (an imperfect teacher's flaws, see `_imperfect`).
    """
    options = dict(min_value=min_value, max_value=max_value, ops=ops, terms=terms)
    _raise_on(_check_numbers(**options), "arithmetic")

    def problem(rng):
        text, value = _expression(rng, **options)
        return {"prompt": f"What is {text}?", "answer": str(value), "response": str(value)}

    examples = _draw(task="arithmetic", split=split, n=n, seed=seed, problem=problem)
    return _imperfect(
        examples, wrong_fraction=wrong_fraction, hedge_fraction=hedge_fraction, seed=seed
    )


def chain_sum(
    *,
    split: str,
    n: int,
    seed: int,
    min_value: int = 0,
    max_value: int = 9,
    ops: str = "+",
    terms: int = 3,
) -> list[dict]:
    """Prompts like "3 + 5 + 2 =" -> "10": reasoning-gym's chain_sum, short."""
    options = dict(min_value=min_value, max_value=max_value, ops=ops, terms=terms)
    _raise_on(_check_numbers(**options), "chain_sum")

    def problem(rng):
        text, value = _expression(rng, **options)
        return {"prompt": f"{text} =", "answer": str(value), "response": str(value)}

    return _draw(task="chain_sum", split=split, n=n, seed=seed, problem=problem)


# (prompt, reference solution, tests). Tests are asserts run against the completion's code by
# the code-execution reward (sandboxed there); every 4th task (indices 3, 7, 11) is test split.
CODE_PROBLEMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "Write a Python function add(a, b) that returns a + b.",
        "def add(a, b):\n    return a + b",
        ("assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"),
    ),
    (
        "Write a Python function square(x) that returns x squared.",
        "def square(x):\n    return x * x",
        ("assert square(3) == 9", "assert square(-4) == 16", "assert square(0) == 0"),
    ),
    (
        "Write a Python function is_even(n) that returns True if n is even, else False.",
        "def is_even(n):\n    return n % 2 == 0",
        ("assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"),
    ),
    (
        "Write a Python function reverse_string(s) that returns s reversed.",
        "def reverse_string(s):\n    return s[::-1]",
        ("assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''"),
    ),
    (
        "Write a Python function maximum(xs) that returns the largest number in the list xs.",
        "def maximum(xs):\n    return max(xs)",
        ("assert maximum([1, 5, 3]) == 5", "assert maximum([-2, -7]) == -2"),
    ),
    (
        "Write a Python function sum_list(xs) that returns the sum of the numbers in xs.",
        "def sum_list(xs):\n    return sum(xs)",
        ("assert sum_list([1, 2, 3]) == 6", "assert sum_list([]) == 0"),
    ),
    (
        "Write a Python function factorial(n) that returns n! for n >= 0.",
        "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n"
        "        result *= k\n    return result",
        ("assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(1) == 1"),
    ),
    (
        "Write a Python function count_vowels(s) that returns how many of the letters a, e, i,"
        " o, u are in s.",
        "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
        ("assert count_vowels('banana') == 3", "assert count_vowels('xyz') == 0"),
    ),
    (
        "Write a Python function fibonacci(n) that returns the n-th Fibonacci number, with"
        " fibonacci(0) = 0 and fibonacci(1) = 1.",
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a",
        ("assert fibonacci(0) == 0", "assert fibonacci(1) == 1", "assert fibonacci(10) == 55"),
    ),
    (
        "Write a Python function is_palindrome(s) that returns True if s reads the same backwards.",
        "def is_palindrome(s):\n    return s == s[::-1]",
        ("assert is_palindrome('level') is True", "assert is_palindrome('abc') is False"),
    ),
    (
        "Write a Python function absolute(x) that returns the absolute value of x.",
        "def absolute(x):\n    return x if x >= 0 else -x",
        ("assert absolute(-3) == 3", "assert absolute(4) == 4", "assert absolute(0) == 0"),
    ),
    (
        "Write a Python function clamp(x, lo, hi) that returns x limited to the range [lo, hi].",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))",
        ("assert clamp(5, 0, 3) == 3", "assert clamp(-1, 0, 3) == 0", "assert clamp(2, 0, 3) == 2"),
    ),
)


def _take(*, items: list[dict], task: str, split: str, n: int, seed: int) -> list[dict]:
    """n of a fixed list in a seeded order. Train repeats the list (a new order each pass) when
    n exceeds it; test never repeats and asks for at most all of it."""
    if split == "test" and n > len(items):
        raise ValueError(f"task {task!r}: the test split has {len(items)} examples, asked for {n}")
    if not items:
        raise ValueError(f"task {task!r}: the {split} split is empty")
    out = []
    for epoch in range(-(-n // len(items))):
        order = np.random.default_rng([seed, SPLITS.index(split), epoch]).permutation(len(items))
        out += [copy.deepcopy(items[int(i)]) for i in order]
    return out[:n]


def code(*, split: str, n: int, seed: int) -> list[dict]:
    """Tiny Python function tasks with assert tests; response is the fenced reference."""
    items = [
        {
            "id": f"code-{i}",
            "prompt": prompt,
            "answer": solution,
            "response": f"```python\n{solution}\n```",
            "tests": list(tests),
        }
        for i, (prompt, solution, tests) in enumerate(CODE_PROBLEMS)
        if (i % 4 == 3) == (split == "test")
    ]
    return _take(items=items, task="code", split=split, n=n, seed=seed)


def jsonl(*, split: str, n: int, seed: int, path: str, test_path: str | None = None) -> list[dict]:
    """Examples from JSONL files (see load_jsonl).

    With test_path, the test split is that file and the train split `path`; without, both come
    from `path`, divided by a hash of each example's prompt (or messages).
    """
    if test_path is not None:
        items = load_jsonl(test_path if split == "test" else path)
    else:
        items = [
            e
            for e in load_jsonl(path)
            if split_of(e["prompt"] if "prompt" in e else json.dumps(e["messages"])) == split
        ]
    return _take(items=items, task="jsonl", split=split, n=n, seed=seed)


TASKS: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic,
    "chain_sum": chain_sum,
    "code": code,
    "jsonl": jsonl,
}


def _check_arithmetic(*, wrong_fraction: float, hedge_fraction: float, **numbers) -> list[str]:
    errors = _check_numbers(**numbers)
    for name, f in (("wrong_fraction", wrong_fraction), ("hedge_fraction", hedge_fraction)):
        if not isinstance(f, int | float) or not 0.0 <= f < 1.0:
            errors.append(f"{name}={f!r} must be a number in [0, 1)")
    if not errors and wrong_fraction + hedge_fraction >= 1.0:
        errors.append("wrong_fraction + hedge_fraction must be below 1")
    return errors


_VALIDATORS: dict[str, Callable[..., list[str]]] = {
    "arithmetic": _check_arithmetic,
    "chain_sum": _check_numbers,
}
_COMMON = ("split", "n", "seed")


def _option_params(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(TASKS[name]).parameters
    return {k: p for k, p in params.items() if k not in _COMMON}


def check_task(name: str, options: dict) -> list[str]:
    """Errors in a task name and its options (empty when fine), for early config validation."""
    if name not in TASKS:
        return [f"unknown task {name!r}; valid tasks: {sorted(TASKS)}"]
    params = _option_params(name)
    errors = [
        f"task {name!r}: unknown option {k!r}; valid options: {sorted(params)}"
        for k in options
        if k not in params
    ]
    errors += [
        f"task {name!r}: missing required option {k!r}"
        for k, p in params.items()
        if p.default is inspect.Parameter.empty and k not in options
    ]
    if not errors and name in _VALIDATORS:
        given = {k: p.default for k, p in params.items()} | dict(options)
        errors += [f"task {name!r}: {e}" for e in _VALIDATORS[name](**given)]
    return errors


def make_task(name: str, *, split: str, n: int, seed: int, **options) -> list[dict]:
    """n examples of task `name` from `split` ("train" or "test"); deterministic in all args.

    Train and test never share a problem (a hash of the prompt decides its split; the code and
    jsonl tasks divide fixed lists).
    """
    errors = check_task(name, options)
    if errors:
        raise ValueError("; ".join(errors))
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid splits: {list(SPLITS)}")
    _check_count(n)
    return TASKS[name](split=split, n=n, seed=seed, **options)
