"""The eval schedule (`evaluators.build_all`: config.eval + named config.evals, their config copies
and validation) and the shared placement helpers of `evaluators.common`."""
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from vlpjax import evaluators, sharding
from vlpjax.evaluators import common

FAKE_KIND = "fake"


@pytest.fixture
def fake_kind(monkeypatch):
  """A kind whose Evaluator records how it was built (no data, no compute)."""
  module = types.ModuleType("fake_evaluator_kind")
  module.EVAL_KEYS = ("depth",)
  built = []

  class Evaluator:
    def __init__(self, config, model, mesh=None):
      self.config, self.model, self.mesh = config, model, mesh
      built.append(self)

    def __call__(self, params):
      return {"depth": float(self.config.eval.get("depth", 0))}

  module.Evaluator = Evaluator
  module.format_results = lambda results: f"depth {results['depth']}"
  monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setitem(evaluators.KINDS, FAKE_KIND, module.__name__)
  return built


def _config(**evals):
  return ml_collections.ConfigDict(dict(
      input=dict(synthetic=False, format="caption", eval_annotations="base.json"),
      eval=dict(kind=FAKE_KIND, every_steps=5, split="test", batch_size=8, depth=1),
      evals=evals))


def test_build_all_schedules_the_primary_and_the_named_evals(fake_kind):
  config = _config(
      flickr=dict(kind=FAKE_KIND, every_steps=3, split="val", batch_size=4, depth=2,
                  input=dict(eval_annotations="flickr.json")),
      off=dict(kind=FAKE_KIND, every_steps=0, split="val", batch_size=4),
      coco=dict(kind=FAKE_KIND, every_steps=7, split="test", batch_size=16))
  model, mesh = object(), object()
  scheduled = evaluators.build_all(config, model, mesh)
  assert [(s.name, s.prefix, s.kind, s.every_steps) for s in scheduled] == [   # named evals in name order
      ("eval", "eval", FAKE_KIND, 5), ("coco", "eval_coco", FAKE_KIND, 7), ("flickr", "eval_flickr", FAKE_KIND, 3)]
  assert [s.evaluator for s in scheduled] == fake_kind   # each built once, in schedule order
  assert all(e.model is model and e.mesh is mesh for e in fake_kind)
  primary, coco, flickr = fake_kind
  assert primary.config is config
  assert flickr.config.eval.to_dict() == dict(kind=FAKE_KIND, every_steps=3, split="val", batch_size=4, depth=2)
  assert flickr.config.input.eval_annotations == "flickr.json" and flickr.config.input.format == "caption"
  assert coco.config.input.eval_annotations == "base.json" and "evals" not in coco.config
  assert config.input.eval_annotations == "base.json" and config.eval.depth == 1   # the run config is untouched
  assert [s.evaluator(None)["depth"] for s in scheduled] == [1.0, 0.0, 2.0]
  assert scheduled[2].format_results({"depth": 2.0}) == "depth 2.0"


@pytest.mark.parametrize("evals", [None, {}])
def test_build_all_without_named_evals(fake_kind, evals):
  config = _config()
  config.evals = evals
  assert [s.prefix for s in evaluators.build_all(config, None, None)] == ["eval"]
  del config["evals"]
  assert [s.prefix for s in evaluators.build_all(config, None, None)] == ["eval"]


def test_build_all_skips_evals_that_are_off(fake_kind):
  config = _config(other=dict(kind=FAKE_KIND, every_steps=2, split="val", batch_size=4))
  config.eval.every_steps = 0
  assert [s.name for s in evaluators.build_all(config, None, None)] == ["other"]
  config.input.synthetic = True
  assert evaluators.build_all(config, None, None) == [] and len(fake_kind) == 1


@pytest.mark.parametrize("block, message", [
    (dict(kind=FAKE_KIND, every_steps=1, split="val", batch_size=4, bogus=1), r"config\.evals\.named\.bogus"),
    (dict(kind=FAKE_KIND, split="val", batch_size=4), r"lacks config\.evals\.named\.every_steps"),
    (dict(kind="nope", every_steps=1, split="val", batch_size=4), r"unknown config\.evals\.named\.kind 'nope'"),
    (dict(kind=FAKE_KIND, every_steps=1, split="val", batch_size=4, input=dict(no_such_field=1)),
     r"config\.evals\.named\.input\.no_such_field"),
])
def test_validate_names_the_bad_key(fake_kind, block, message):
  with pytest.raises(ValueError, match=message):
    evaluators.build_all(_config(named=block), None, None)
  assert not fake_kind   # nothing is built before the whole schedule checks out


def test_validate_checks_the_primary_block_and_eval_names(fake_kind):
  config = _config()
  config.eval.k_test = 4   # a retrieval key, not one of the fake kind's
  with pytest.raises(ValueError, match=r"config\.eval\.k_test"):
    evaluators.validate(config)
  with pytest.raises(ValueError, match="letters, digits and '_'"):
    evaluators.validate(_config(**{"a/b": dict(kind=FAKE_KIND, every_steps=1, split="val", batch_size=4)}))


def test_every_kind_provides_the_contract():
  for kind in evaluators.KINDS:
    module = evaluators.get(kind)
    assert issubclass(module.Evaluator, common.Evaluator)
    assert callable(module.run) and callable(module.format_results) and isinstance(module.EVAL_KEYS, tuple)


# ----------------------------------------------------------------------------- common


def test_padded_chunks_have_one_shape_and_pad_with_zeros():
  count, chunks = common.padded_chunks([np.arange(10, 17), np.arange(7)[::-1]], 3)
  chunks = list(chunks)
  assert count == 3 == len(chunks)
  np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), [10, 11, 12, 13, 14, 15, 16, 0, 0])
  np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), [6, 5, 4, 3, 2, 1, 0, 0, 0])
  count, chunks = common.padded_chunks([np.zeros([0], np.int32)], 4)
  assert count == 0 and list(chunks) == []


def test_place_params_moves_only_what_is_off_the_mesh():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
  on_mesh = jax.device_put(np.arange(8.0).reshape(4, 2), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("fsdp")))
  elsewhere = jax.device_put(np.ones(3), jax.devices()[5])
  params = dict(a=on_mesh, b=np.zeros(2), c=dict(d=elsewhere))
  placed = common.place_params(params, mesh)
  assert placed["a"] is on_mesh
  for leaf in (placed["b"], placed["c"]["d"]):
    assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)
  np.testing.assert_array_equal(np.asarray(placed["c"]["d"]), np.ones(3))
  assert common.place_params(dict(a=on_mesh), None)["a"] is on_mesh   # no mesh: jax arrays stay put


def test_batches_must_divide_over_the_mesh_and_carry_their_keys():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
  good = dict(image=np.zeros((4, 2)), label=np.zeros(4), valid=np.ones(4, bool))
  (inputs, batch), = common.device_batches([good], ("image",), mesh, "test eval", host_keys=("label",))
  assert set(inputs) == {"image"} and batch is good
  assert inputs["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh, 2), 2)
  with pytest.raises(ValueError, match="eval batch size=6 is not divisible by the 4 batch shards"):
    list(common.device_batches([dict(image=np.zeros((6, 2)), valid=np.ones(6, bool))], ("image",), mesh, "x"))
  with pytest.raises(KeyError, match=r"test eval: eval batch lacks \['label'\]"):
    list(common.device_batches([dict(image=np.zeros((4, 2)), valid=np.ones(4, bool))], ("image",), mesh,
                               "test eval", host_keys=("label",)))
  with pytest.raises(ValueError, match=r"config\.eval\.batch_size=6 is not divisible"):
    common.check_divisible(6, mesh, "config.eval.batch_size")
