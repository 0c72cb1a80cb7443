"""Remat policies (`config.model.remat`): every policy gives the loss and gradients of no remat.

One tiny ALBEF step (cross fusion) and one tiny MAMO step (merged fusion, masked passes), dropout
on: the rematerialised forward must replay the same dropout masks, so any difference would show.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpjax import config_lib, sharding, state as state_lib, step as step_lib, synthetic
from vlpjax.models import layers, vlp
from vlpjax.objectives import registry


def test_policy_names_and_old_booleans():
  assert layers.remat_policy(True) == "full" and layers.remat_policy(False) == "none"
  assert layers.remat_policy("True") == "full" and layers.remat_policy(" false ") == "none"
  assert layers.remat_policy("DOTS") == "dots"
  assert not layers.remat_policy("none") and layers.remat_policy("dots")   # truthy = some remat
  assert vlp.ModelConfig(remat=True).remat == "full"
  with pytest.raises(ValueError, match=r"config.model.remat='dot'; known policies"):
    vlp.ModelConfig(remat="dot")
  config = config_lib.load_config("configs/albef.py:tiny")
  config.model.remat = True   # an old config's boolean still overrides the policy field
  assert vlp.ModelConfig.from_config(config.model).remat == "full"
  config.model.remat = "dots"
  assert vlp.ModelConfig.from_config(config.model).remat == "dots"


def _checkpoint_policies(jaxpr) -> list:
  """The `policy` of every checkpoint (remat) equation in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      found.append(eqn.params.get("policy"))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _checkpoint_policies(inner)
  return found


def _loss_and_grads(config_path: str):
  """{policy: (loss, metrics, grads)} of one tiny step with every policy of `REMAT_POLICIES`."""
  config = config_lib.load_config(config_path)
  config.input.synthetic = True
  # One layer per tower: remat wraps each layer alike, and each policy is a compile of the step.
  config.model.vision.depth = config.model.text.text_layers = config.model.text.fusion_layers = 1
  if "mrm" in config.objectives:
    config.objectives.mrm.top_k = 1
  base = vlp.VLPModel(vlp.ModelConfig.from_config(config.model))
  assert base.config.remat == "none" and base.config.text.dropout > 0
  specs = registry.objective_specs(config.objectives)
  state = state_lib.make_init_fn(base, optax.identity(), specs)(jax.random.PRNGKey(0))
  ema = jax.tree.map(lambda x: x + 0.01, state.params)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  batch = synthetic.make_batch_fn(config, mesh, 4)(jax.random.PRNGKey(1), 0)
  fns = {policy: step_lib.make_loss_fn(vlp.VLPModel(dataclasses.replace(base.config, remat=policy)), specs,
                                      num_groups=1) for policy in layers.REMAT_POLICIES}

  @jax.jit
  def all_policies(params):   # one compile for every policy (fewer compiles than one per policy)
    return {policy: jax.value_and_grad(fn, has_aux=True)(params, ema, state.objective_state, batch,
                                                         jax.random.PRNGKey(2), jnp.int32(10), jnp.float32(0.4))
            for policy, fn in fns.items()}

  used = _checkpoint_policies(jax.make_jaxpr(all_policies)(state.params).jaxpr)
  for name, policy in layers.REMAT_POLICIES.items():   # each policy really is in its traced step
    assert name == "none" or any(policy is p or policy == p for p in used), (name, used)
  out = {policy: (loss, metrics, grads) for policy, ((loss, (metrics, _)), grads)
         in jax.device_get(all_policies(state.params)).items()}
  return out


@pytest.mark.parametrize("config_path", ["configs/albef.py:tiny", "configs/mamo.py:tiny"])
def test_every_policy_matches_no_remat(config_path):
  results = _loss_and_grads(config_path)
  want_loss, want_metrics, want_grads = results["none"]
  assert float(optax.global_norm(want_grads)) > 0
  for policy, (loss, metrics, grads) in results.items():
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6, err_msg=policy)
    for key in want_metrics:
      np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6, err_msg=f"{policy} {key}")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{policy} {jax.tree_util.keystr(path)}")
