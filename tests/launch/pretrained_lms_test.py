"""Tests of the shipped SynthLang target/draft pair: they load, match their recorded quality
on fresh source samples, and the pair's acceptance rate is in the recorded range."""

import os

import jax
import pytest

from jaxrepro.launch import pretrained_lms as plm


@pytest.fixture(scope="module")
def models():
  return {name: plm.load(name) for name in plm.NAMES}


@pytest.fixture(scope="module")
def lang():
  return plm.language()


def test_shipped_models_load_with_their_recorded_configs(models):
  total = 0
  for name, model in models.items():
    meta = plm.metadata(name)
    assert model.config == plm.CONFIGS[name]
    assert meta["num_params"] == sum(x.size for x in jax.tree.leaves(model.params))
    assert "python -m jaxrepro.launch.pretrained_lms" in meta["command"]
    for folder, _, files in os.walk(os.path.join(plm.ASSETS, name)):
      total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
  assert total < 4 * 2 ** 20, total
  with pytest.raises(ValueError, match="unknown"):
    plm.load("synthlang_huge")


def test_nll_on_fresh_samples_matches_the_record_and_the_source(models, lang):
  for name, model in models.items():
    recorded = plm.metadata(name)["eval"]
    fresh = plm.evaluate_nll(lang, model, num=64, seed=2024)
    # The KL (model NLL minus the exact NLL of the same tokens) varies little between
    # sample sets (standard error ~0.005); the NLL itself varies with the text drawn.
    assert abs(fresh["kl"] - recorded["kl"]) < max(0.02, 5 * fresh["kl_stderr"]), (name, fresh)
    assert abs(fresh["nll"] - recorded["nll"]) < 0.08, (name, fresh, recorded)
    assert fresh["kl"] > 0
  target = plm.evaluate_nll(lang, models["synthlang_target"], num=64, seed=2024)
  draft = plm.evaluate_nll(lang, models["synthlang_draft"], num=64, seed=2024)
  # The target is close to the source's entropy rate; the draft is clearly weaker.
  assert target["kl"] < 0.1 and draft["kl"] > target["kl"] + 0.1, (target, draft)


def test_acceptance_rate_is_in_the_recorded_range(models, lang):
  recorded = plm.metadata("synthlang_target")["alpha_vs_target_t1"]["alpha"]
  assert 0.6 <= recorded <= 0.85
  fresh = plm.acceptance_rate(lang, models["synthlang_target"], models["synthlang_draft"],
                              num=16, new_tokens=64, seed=99)
  assert abs(fresh["alpha"] - recorded) < max(0.04, 4 * fresh["alpha_stderr"]), fresh
