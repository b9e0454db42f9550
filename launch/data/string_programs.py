"""A synthetic few-shot string-program task: hidden transforms, standard and lame prompts.

The stand-in for code generation in USCD (Wang, Ding, Shen, Luo, He, Yu, Tao, "USCD:
Improving Code Generation of LLMs by Uncertainty-Aware Selective Contrastive Decoding",
2024, arXiv:2409.05923; decoding spec card 5.4). HumanEval-style benchmarks and code LLMs
cannot be fetched, so "programs" are hidden string transforms f over a small alphabet, and
a problem is program induction from input/output examples:

  standard prompt:  ^ x_1 > f(x_1) ; x_2 > f(x_2) ; x_3 > f(x_3) ; x_q >
  lame prompt:      ^ x_q >
  answer:           f(x_q) ;

(`^` = BOS, `>` = ARROW, `;` = SEP, which also ends the generated answer). The lame prompt
is the paper's negative prompt: the standard prompt with its input/output examples removed.
The transforms are the card's: identity (the default), reverse, rotate left by r, substitute
by a fixed letter table (a derangement drawn from the task seed), duplicate (x x) and sort.

The training mixture makes the lame prompt's output a strong, wrong prior ("output noise"):
a fraction `default_fraction` (~70 %) of problems use the default transform, so a model
that cannot tell the transform from the examples falls back to copying the input. A
training sequence is `num_shots + 1` examples of one program, and the loss covers every
example's output (`loss_mask`), so the first example is exactly a lame prompt (0 shots)
and the last a standard one (`num_shots` shots): both prompts are in distribution.

Held-out strings: a fixed fraction of all strings (per length, drawn from the task seed)
is reserved for evaluation; training problems never contain one, and evaluation problems
(dev and test splits, non-default transforms only) are built from them alone. pass@1 is
checked by executing the hidden program on the query (`check`).

Everything is numpy on the host, seeded: `training_batches(task, seed, step, n, batch)`
depends only on its arguments, so a resumed training run sees the same data.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

TRANSFORMS = ("identity", "reverse", "rotate", "substitute", "duplicate", "sort")
SPLITS = ("train", "eval")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class StringTask:
  """The task's constants (hashable). Token ids: letters 0..A-1, then ARROW, SEP, BOS, PAD.

  Attributes:
    alphabet_size: A, the number of letters (2..26).
    min_len, max_len: string lengths are uniform in min_len..max_len (>= 2).
    num_shots: input/output examples in a standard prompt.
    default_fraction: share of training problems that use `default_transform`.
    default_transform: the dominant program (the lame prompt's prior).
    transforms: the programs of the task (must include the default).
    rotations: the shifts r of `rotate` (each in 1..min_len - 1).
    heldout_fraction: share of strings reserved for evaluation problems.
    seed: fixes the substitution table and the held-out strings.
  """
  alphabet_size: int = 8
  min_len: int = 4
  max_len: int = 6
  num_shots: int = 3
  default_fraction: float = 0.7
  default_transform: str = "identity"
  transforms: tuple[str, ...] = TRANSFORMS
  rotations: tuple[int, ...] = (1, 2)
  heldout_fraction: float = 0.1
  seed: int = 0

  def __post_init__(self):
    if not 2 <= self.alphabet_size <= 26:
      raise ValueError(f"alphabet_size must be in 2..26; got {self.alphabet_size}")
    if not 2 <= self.min_len <= self.max_len:
      raise ValueError(f"need 2 <= min_len <= max_len; got {self.min_len}, {self.max_len}")
    if self.alphabet_size ** self.max_len > 1 << 26:
      raise ValueError(f"alphabet_size ** max_len must be <= 2^26 (held-out tables); got "
                       f"{self.alphabet_size} ** {self.max_len}")
    if self.num_shots < 1:
      raise ValueError(f"num_shots must be >= 1; got {self.num_shots}")
    if not 0 <= self.default_fraction < 1:
      raise ValueError(f"default_fraction must be in [0, 1); got {self.default_fraction}")
    unknown = [t for t in self.transforms if t not in TRANSFORMS]
    if unknown or len(set(self.transforms)) != len(self.transforms):
      raise ValueError(f"transforms must be distinct names from {TRANSFORMS}; got "
                       f"{self.transforms}")
    if self.default_transform not in self.transforms or len(self.transforms) < 2:
      raise ValueError(f"default_transform={self.default_transform!r} must be one of "
                       f"transforms={self.transforms}, which needs another transform")
    if not self.rotations or any(not 1 <= r < self.min_len for r in self.rotations):
      raise ValueError(f"rotations must be non-empty, each in 1..min_len - 1 = "
                       f"{self.min_len - 1}; got {self.rotations}")
    if not 0 < self.heldout_fraction < 1:
      raise ValueError(f"heldout_fraction must be in (0, 1); got {self.heldout_fraction}")

  # Special tokens follow the letters.
  @property
  def arrow(self) -> int:
    return self.alphabet_size

  @property
  def sep(self) -> int:
    return self.alphabet_size + 1

  @property
  def bos(self) -> int:
    return self.alphabet_size + 2

  @property
  def pad(self) -> int:
    return self.alphabet_size + 3

  @property
  def vocab_size(self) -> int:
    return self.alphabet_size + 4

  @property
  def non_default(self) -> tuple[str, ...]:
    """The evaluated programs: every transform but the default."""
    return tuple(t for t in self.transforms if t != self.default_transform)

  @property
  def max_output_len(self) -> int:
    return 2 * self.max_len if "duplicate" in self.transforms else self.max_len

  @property
  def max_new(self) -> int:
    """Tokens a decoder generates: the longest answer plus its SEP."""
    return self.max_output_len + 1

  @property
  def max_example_len(self) -> int:
    return self.max_len + self.max_output_len + 2

  @property
  def prompt_len(self) -> int:
    """Static length of a standard prompt buffer (BOS, the shots, the query and ARROW)."""
    return 1 + self.num_shots * self.max_example_len + self.max_len + 1

  @property
  def lame_prompt_len(self) -> int:
    """Static length of a lame prompt buffer (BOS, the query and ARROW)."""
    return self.max_len + 2

  @property
  def seq_len(self) -> int:
    """Length of a training sequence: BOS and num_shots + 1 examples (padded)."""
    return 1 + (self.num_shots + 1) * self.max_example_len

  @functools.cached_property
  def table(self) -> np.ndarray:
    """[A] int32, the substitution table: a derangement (no letter maps to itself)."""
    rng = np.random.default_rng([self.seed, 1])
    while True:
      perm = rng.permutation(self.alphabet_size)
      if np.all(perm != np.arange(self.alphabet_size)):
        return perm.astype(np.int32)

  @functools.cached_property
  def _heldout(self) -> dict[int, np.ndarray]:
    # One bool per string of each length (A^len entries), fixed by the seed.
    return {n: np.random.default_rng([self.seed, 2, n]).random(self.alphabet_size ** n)
            < self.heldout_fraction for n in range(self.min_len, self.max_len + 1)}

  def is_heldout(self, x: np.ndarray) -> bool:
    """Whether string x ([n] int letters) is reserved for evaluation."""
    code = int(np.dot(x, self.alphabet_size ** np.arange(len(x))))
    return bool(self._heldout[len(x)][code])


class Problem(NamedTuple):
  """One program-induction problem.

  Attributes:
    transform: the hidden program's name; param: its parameter (r for rotate, else 0).
    examples: num_shots (input, output) pairs of int32 letter arrays.
    query: [n] int32 letters; answer: f(query), int32 letters.
  """
  transform: str
  param: int
  examples: tuple[tuple[np.ndarray, np.ndarray], ...]
  query: np.ndarray
  answer: np.ndarray


def apply_program(task: StringTask, transform: str, param: int, x: np.ndarray) -> np.ndarray:
  """Executes the program (transform, param) on the letters x: [n] int -> [m] int32."""
  x = np.asarray(x, np.int32)
  if transform == "identity":
    return x.copy()
  if transform == "reverse":
    return x[::-1].copy()
  if transform == "rotate":
    return np.roll(x, -param)
  if transform == "substitute":
    return task.table[x]
  if transform == "duplicate":
    return np.concatenate([x, x])
  if transform == "sort":
    return np.sort(x)
  raise ValueError(f"transform must be one of {TRANSFORMS}; got {transform!r}")


def _sample_string(task: StringTask, rng: np.random.Generator, split: str) -> np.ndarray:
  # Rejection sampling: train strings avoid the held-out set, eval strings come from it.
  want = split == "eval"
  while True:
    x = rng.integers(0, task.alphabet_size, rng.integers(task.min_len, task.max_len + 1),
                     dtype=np.int32)
    if task.is_heldout(x) == want:
      return x


def sample_problems(task: StringTask, rng: np.random.Generator, n: int, *,
                    split: str = "train", transforms: Sequence[str] | None = None,
                    num_shots: int | None = None) -> list[Problem]:
  """Draws n problems.

  Args:
    task: the task.
    rng: a numpy Generator (the only source of randomness).
    n: number of problems.
    split: "train" (the mixture: the default transform with probability
      `default_fraction`, else a uniform non-default one; no held-out strings) or "eval"
      (uniform over `transforms`, held-out strings only).
    transforms: restricts the programs (default: the mixture for "train", the non-default
      transforms for "eval").
    num_shots: examples per problem (default task.num_shots).

  Returns:
    A list of n `Problem`s.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  shots = task.num_shots if num_shots is None else num_shots
  if shots < 0:
    raise ValueError(f"num_shots must be >= 0; got {shots}")
  if transforms is not None:
    bad = [t for t in transforms if t not in task.transforms]
    if bad or not transforms:
      raise ValueError(f"transforms must be a non-empty subset of {task.transforms}; got "
                       f"{list(transforms)}")
  elif split == "eval":
    transforms = task.non_default
  problems = []
  for _ in range(n):
    if transforms is not None:
      name = transforms[rng.integers(len(transforms))]
    elif rng.random() < task.default_fraction:
      name = task.default_transform
    else:
      name = task.non_default[rng.integers(len(task.non_default))]
    param = int(task.rotations[rng.integers(len(task.rotations))]) if name == "rotate" else 0
    strings = [_sample_string(task, rng, split) for _ in range(shots + 1)]
    pairs = tuple((x, apply_program(task, name, param, x)) for x in strings)
    problems.append(Problem(name, param, pairs[:-1], pairs[-1][0], pairs[-1][1]))
  return problems


# ---------------------------------------------------------------------------------- tokens


def example_tokens(task: StringTask, x: np.ndarray, y: np.ndarray) -> list[int]:
  """`x > y ;` as token ids."""
  return [*map(int, x), task.arrow, *map(int, y), task.sep]


def standard_prompt(task: StringTask, problem: Problem) -> list[int]:
  """`^ x_1 > y_1 ; ... x_q >`: the few-shot prompt."""
  tokens = [task.bos]
  for x, y in problem.examples:
    tokens += example_tokens(task, x, y)
  return tokens + [*map(int, problem.query), task.arrow]


def lame_prompt(task: StringTask, problem: Problem) -> list[int]:
  """`^ x_q >`: the standard prompt without its input/output examples."""
  return [task.bos, *map(int, problem.query), task.arrow]


def _padded(rows: Sequence[Sequence[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(rows), width), pad, np.int32)
  lengths = np.zeros((len(rows),), np.int32)
  for i, row in enumerate(rows):
    if len(row) > width:
      raise ValueError(f"a row of {len(row)} tokens does not fit width {width}")
    out[i, :len(row)] = row
    lengths[i] = len(row)
  return out, lengths


class TrainBatch(NamedTuple):
  """Next-token training data.

  Attributes:
    tokens: [..., seq_len] int32 (BOS, num_shots + 1 examples, PAD).
    loss_mask: [..., seq_len - 1] bool, True where target tokens[..., 1:] is an output
      letter or the SEP that ends it.
  """
  tokens: np.ndarray
  loss_mask: np.ndarray


def training_batch(task: StringTask, rng: np.random.Generator, batch_size: int) -> TrainBatch:
  """A batch of training sequences from the mixture (no held-out strings)."""
  problems = sample_problems(task, rng, batch_size, split="train",
                             num_shots=task.num_shots)
  rows, masks = [], []
  for p in problems:
    tokens, mask = [task.bos], [False]
    for x, y in (*p.examples, (p.query, p.answer)):
      tokens += example_tokens(task, x, y)
      mask += [False] * (len(x) + 1) + [True] * (len(y) + 1)
    rows.append(tokens)
    masks.append(mask)
  tokens, _ = _padded(rows, task.seq_len, task.pad)
  mask, _ = _padded(masks, task.seq_len, 0)
  # mask[i] marks token i as a target; position i - 1 predicts it.
  return TrainBatch(tokens, mask[:, 1:].astype(bool))


def training_batches(task: StringTask, seed: int, start_step: int, n: int,
                     batch_size: int) -> TrainBatch:
  """Batches for steps start_step .. start_step + n - 1, stacked: [n, batch_size, ...].

  The batch of step s depends only on (task.seed, seed, s), so an interrupted run that
  resumes at step s sees exactly the data of an uninterrupted one.
  """
  batches = [training_batch(task, np.random.default_rng([task.seed, seed, 3, s]), batch_size)
             for s in range(start_step, start_step + n)]
  return TrainBatch(*(np.stack(x) for x in zip(*batches)))


class EvalBatch(NamedTuple):
  """Prompts and answers of a list of problems, padded to static shapes.

  Attributes:
    standard: [N, task.prompt_len] int32 standard prompts (PAD after standard_len).
    standard_len: [N] int32.
    lame: [N, task.lame_prompt_len] int32 lame prompts (PAD after lame_len).
    lame_len: [N] int32.
    answer: [N, task.max_new] int32, the answer then SEP, then PAD.
    answer_len: [N] int32, answer length including the SEP.
    transform: [N] int32 index into `TRANSFORMS`.
  """
  standard: np.ndarray
  standard_len: np.ndarray
  lame: np.ndarray
  lame_len: np.ndarray
  answer: np.ndarray
  answer_len: np.ndarray
  transform: np.ndarray


def eval_batch(task: StringTask, problems: Sequence[Problem]) -> EvalBatch:
  """Tokenises problems for the decoders."""
  standard, standard_len = _padded([standard_prompt(task, p) for p in problems],
                                   task.prompt_len, task.pad)
  lame, lame_len = _padded([lame_prompt(task, p) for p in problems], task.lame_prompt_len,
                           task.pad)
  answer, answer_len = _padded([[*map(int, p.answer), task.sep] for p in problems],
                               task.max_new, task.pad)
  transform = np.array([TRANSFORMS.index(p.transform) for p in problems], np.int32)
  return EvalBatch(standard, standard_len, lame, lame_len, answer, answer_len, transform)


def eval_split(task: StringTask, seed: int, n: int) -> list[Problem]:
  """n evaluation problems (non-default transforms, held-out strings), fixed by the seed.

  Use different seeds for the dev split (choosing hyper-parameters) and the test split.
  """
  return sample_problems(task, np.random.default_rng([task.seed, seed, 4]), n, split="eval")


# ------------------------------------------------------------------------------- checking


def generated_answer(task: StringTask, tokens: Sequence[int]) -> np.ndarray | None:
  """The letters before the first SEP, or None when there is no SEP or a non-letter."""
  tokens = np.asarray(tokens)
  ends = np.flatnonzero(tokens == task.sep)
  if not len(ends):
    return None
  answer = tokens[:ends[0]]
  return answer if np.all(answer < task.alphabet_size) else None


def check(task: StringTask, problem: Problem, tokens: Sequence[int]) -> bool:
  """pass@1 of one generation: executes the hidden program on the query and compares."""
  answer = generated_answer(task, tokens)
  expected = apply_program(task, problem.transform, problem.param, problem.query)
  return answer is not None and np.array_equal(answer, expected)


def check_all(task: StringTask, problems: Sequence[Problem], tokens: np.ndarray) -> np.ndarray:
  """[N] bool: `check` of each problem against its row of generated tokens [N, T]."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] != len(problems):
    raise ValueError(f"tokens must be [N={len(problems)}, T]; got {list(tokens.shape)}")
  return np.array([check(task, p, t) for p, t in zip(problems, tokens)], bool)


def to_text(task: StringTask, tokens: Sequence[int]) -> str:
  """Renders token ids: letters a.., `>` ARROW, `;` SEP, `^` BOS, `_` PAD."""
  special = {task.arrow: ">", task.sep: ";", task.bos: "^", task.pad: "_"}
  return "".join(special.get(int(t), _LETTERS[int(t)] if 0 <= t < task.alphabet_size
                             else "?") for t in tokens)
