"""Tests of the few-shot string-program task (USCD's stand-in for code generation).

Oracles: a plain-Python implementation of every transform (lists and strings, no numpy)
checks each reference answer and example; the generator is deterministic per seed; the
held-out strings never reach training data; prompts, loss masks and the checker follow
the documented layout.
"""

import numpy as np
import pytest

from jaxrepro.launch.data import string_programs as sp

TASK = sp.StringTask()


def _reference(task, name, param, letters):
  """The transform on a list of ints, written independently of `apply_program`."""
  s = [int(c) for c in letters]
  if name == "identity":
    return s
  if name == "reverse":
    return list(reversed(s))
  if name == "rotate":
    return s[param:] + s[:param]
  if name == "substitute":
    table = {a: int(b) for a, b in enumerate(task.table)}
    return [table[c] for c in s]
  if name == "duplicate":
    return s + s
  if name == "sort":
    return sorted(s)
  raise AssertionError(name)


def test_transforms_match_plain_python_on_fixed_strings():
  x = np.array([3, 0, 2, 2, 7], np.int32)
  assert sp.apply_program(TASK, "reverse", 0, x).tolist() == [7, 2, 2, 0, 3]
  assert sp.apply_program(TASK, "rotate", 2, x).tolist() == [2, 2, 7, 3, 0]
  assert sp.apply_program(TASK, "duplicate", 0, x).tolist() == [3, 0, 2, 2, 7] * 2
  assert sp.apply_program(TASK, "sort", 0, x).tolist() == [0, 2, 2, 3, 7]
  assert sp.apply_program(TASK, "identity", 0, x).tolist() == x.tolist()
  for name in sp.TRANSFORMS:
    assert sp.apply_program(TASK, name, 1, x).tolist() == _reference(TASK, name, 1, x)


def test_substitution_table_is_a_derangement():
  table = TASK.table.tolist()
  assert sorted(table) == list(range(TASK.alphabet_size))
  assert all(a != b for a, b in enumerate(table))


@pytest.mark.parametrize("split", sp.SPLITS)
def test_reference_answers_are_correct(split):
  problems = sp.sample_problems(TASK, np.random.default_rng(5), 300, split=split)
  seen = {p.transform for p in problems}
  expected = set(TASK.transforms) if split == "train" else set(TASK.non_default)
  assert seen == expected
  for p in problems:
    for x, y in (*p.examples, (p.query, p.answer)):
      assert y.tolist() == _reference(TASK, p.transform, p.param, x)
      assert TASK.min_len <= len(x) <= TASK.max_len
      # Eval problems use held-out strings only; training problems never do.
      assert TASK.is_heldout(x) == (split == "eval")
    assert len(p.examples) == TASK.num_shots
    if p.transform == "rotate":
      assert p.param in TASK.rotations


def test_training_mixture_is_dominated_by_the_default():
  problems = sp.sample_problems(TASK, np.random.default_rng(0), 2000)
  share = np.mean([p.transform == TASK.default_transform for p in problems])
  # Binomial(2000, 0.7): standard deviation ~0.01.
  assert abs(share - TASK.default_fraction) < 0.04


def test_generator_is_deterministic_per_seed():
  a = sp.training_batches(TASK, 3, 10, 2, 8)
  b = sp.training_batches(TASK, 3, 10, 2, 8)
  c = sp.training_batches(TASK, 4, 10, 2, 8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  assert not np.array_equal(a.tokens, c.tokens)
  # A resumed run (start at step 11) sees step 11's batch of the uninterrupted run.
  np.testing.assert_array_equal(sp.training_batches(TASK, 3, 11, 1, 8).tokens[0], a.tokens[1])
  e1, e2 = sp.eval_split(TASK, 1, 20), sp.eval_split(TASK, 1, 20)
  assert all(np.array_equal(p.query, q.query) and p.transform == q.transform
             for p, q in zip(e1, e2))
  other = sp.eval_split(TASK, 2, 20)
  assert any(not np.array_equal(p.query, q.query) for p, q in zip(e1, other))


def test_prompts_and_loss_mask_layout():
  t = TASK
  p = sp.Problem("reverse", 0, ((np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])),),
                 np.array([4, 5, 6, 7]), np.array([7, 6, 5, 4]))
  assert sp.standard_prompt(t, p) == [t.bos, 0, 1, 2, 3, t.arrow, 3, 2, 1, 0, t.sep,
                                      4, 5, 6, 7, t.arrow]
  assert sp.lame_prompt(t, p) == [t.bos, 4, 5, 6, 7, t.arrow]
  assert sp.to_text(t, sp.standard_prompt(t, p)) == "^abcd>dcba;efgh>"

  batch = sp.training_batches(TASK, 0, 0, 1, 16)
  tokens, mask = batch.tokens[0], batch.loss_mask[0]
  assert tokens.shape == (16, t.seq_len) and mask.shape == (16, t.seq_len - 1)
  for row, m in zip(tokens, mask):
    targets = row[1:][m]
    # Targets are output letters or the SEP that ends an output, never ARROW/BOS/PAD.
    assert np.all((targets < t.alphabet_size) | (targets == t.sep))
    assert np.sum(targets == t.sep) == t.num_shots + 1 == np.sum(row == t.sep)
    # The token before every masked target is the ARROW or an output letter.
    prev = row[:-1][m]
    assert np.all((prev < t.alphabet_size) | (prev == t.arrow))


def test_eval_batch_shapes_and_checker():
  problems = sp.eval_split(TASK, 1, 8)
  batch = sp.eval_batch(TASK, problems)
  assert batch.standard.shape == (8, TASK.prompt_len)
  assert batch.lame.shape == (8, TASK.lame_prompt_len)
  for i, p in enumerate(problems):
    std = batch.standard[i, :batch.standard_len[i]].tolist()
    lame = batch.lame[i, :batch.lame_len[i]].tolist()
    assert std == sp.standard_prompt(TASK, p)
    # The lame prompt is the standard one with its examples removed.
    assert std[-len(lame) + 1:] == lame[1:] and lame[0] == std[0] == TASK.bos
  tokens = batch.answer.copy()
  assert sp.check_all(TASK, problems, tokens).all()
  wrong = tokens.copy()
  wrong[:, 0] = (wrong[:, 0] + 1) % TASK.alphabet_size
  assert not sp.check_all(TASK, problems, wrong).any()
  no_sep = np.where(tokens == TASK.sep, 0, tokens)
  assert not sp.check_all(TASK, problems, no_sep).any()
  # Trailing tokens after the first SEP are ignored.
  p = problems[0]
  assert sp.check(TASK, p, [*p.answer.tolist(), TASK.sep, 3, TASK.arrow])
  assert not sp.check(TASK, p, [*p.answer.tolist(), TASK.arrow, TASK.sep])


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="alphabet_size"):
    sp.StringTask(alphabet_size=1)
  with pytest.raises(ValueError, match="rotations"):
    sp.StringTask(rotations=(4,))
  with pytest.raises(ValueError, match="default_transform"):
    sp.StringTask(default_transform="reverse", transforms=("identity", "sort"))
  with pytest.raises(ValueError, match="split"):
    sp.sample_problems(TASK, np.random.default_rng(0), 1, split="test")
  with pytest.raises(ValueError, match="transforms"):
    sp.sample_problems(TASK, np.random.default_rng(0), 1, transforms=("shuffle",))
  with pytest.raises(ValueError, match="transform"):
    sp.apply_program(TASK, "shuffle", 0, np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="tokens"):
    sp.check_all(TASK, sp.eval_split(TASK, 1, 2), np.zeros((3, 4), np.int32))
