"""Tests for vlpjax.optim: schedules against ALBEF's traces, regex rules, and AdamW vs NumPy."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlpjax import optim


def _cfg(**fields):
  base = {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "schedule": {"name": "constant"}}
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _albef_cfg(lr, min_lr, warmup_lr, warmup_steps, warmup_step_every=100):
  return _cfg(lr=lr, schedule={"name": "albef", "min_lr": min_lr, "warmup_lr": warmup_lr,
                               "warmup_steps": warmup_steps,
                               "warmup_step_every": warmup_step_every})


def _timm_cosine_lr(t, *, lr, min_lr, warmup_lr, warmup_t, t_initial):
  """timm CosineLRScheduler._get_lr, warmup_prefix=True and cycle_limit=1 as ALBEF configures it."""
  if t < warmup_t:
    return warmup_lr + t * (lr - warmup_lr) / warmup_t
  t -= warmup_t
  if t >= t_initial:
    return min_lr
  return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def _albef_loop_trace(*, epochs, steps_per_epoch, step_size, warmup_epochs, **lr_kw):
  """The lr at every iteration, replaying how ALBEF's Pretrain.py steps its scheduler."""
  trace = []
  current = None
  for epoch in range(epochs):
    if epoch > 0:
      current = _timm_cosine_lr(epoch + warmup_epochs, warmup_t=warmup_epochs,
                                t_initial=epochs, **lr_kw)
    for i in range(steps_per_epoch):
      if epoch == 0 and i % step_size == 0 and i <= warmup_epochs * step_size:
        current = _timm_cosine_lr(i // step_size, warmup_t=warmup_epochs, t_initial=epochs,
                                  **lr_kw)
      trace.append(current)
  return np.array(trace)


def test_albef_pretrain_trace_matches_appendix_e3():
  steps_per_epoch = 3000
  _, schedule = optim.make_optimizer(
      _albef_cfg(1e-4, 1e-5, 1e-5, 2000), params={"w": jnp.zeros(2)},
      total_steps=30 * steps_per_epoch, steps_per_epoch=steps_per_epoch)
  lr = lambda epoch, it: float(schedule(epoch * steps_per_epoch + it))
  for it, expected in [(0, 1.0e-5), (99, 1.0e-5), (100, 1.45e-5), (1000, 5.5e-5),
                       (2000, 1.0e-4), (2500, 1.0e-4), (2999, 1.0e-4)]:
    assert lr(0, it) == pytest.approx(expected, rel=1e-6), it
  assert lr(1, 0) == pytest.approx(9.9753e-5, rel=1e-4)
  assert lr(1, 2999) == lr(1, 0)
  assert lr(15, 7) == pytest.approx(5.5e-5, rel=1e-6)
  assert lr(29, 0) == pytest.approx(1.0247e-5, rel=1e-4)


@pytest.mark.parametrize("lr,min_lr,warmup_lr,warmup_epochs,epochs", [
    (1e-4, 1e-5, 1e-5, 20, 30),  # pretrain
    (1e-5, 1e-6, 1e-5, 1, 10),  # retrieval fine-tune (Flickr)
    (2e-5, 1e-6, 1e-5, 4, 8),  # VQA
])
def test_albef_schedule_replays_the_albef_loop(lr, min_lr, warmup_lr, warmup_epochs, epochs):
  steps_per_epoch, step_size = 530, 25
  _, schedule = optim.make_optimizer(
      _albef_cfg(lr, min_lr, warmup_lr, warmup_epochs * step_size, step_size),
      params={"w": jnp.zeros(2)}, total_steps=epochs * steps_per_epoch,
      steps_per_epoch=steps_per_epoch)
  expected = _albef_loop_trace(epochs=epochs, steps_per_epoch=steps_per_epoch,
                               step_size=step_size, warmup_epochs=warmup_epochs, lr=lr,
                               min_lr=min_lr, warmup_lr=warmup_lr)
  got = np.asarray(jax.jit(schedule)(jnp.arange(epochs * steps_per_epoch)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_finetune_trace_from_appendix_e3():
  steps_per_epoch = 1000
  _, schedule = optim.make_optimizer(
      _albef_cfg(1e-5, 1e-6, 1e-5, 100), params={"w": jnp.zeros(2)},
      total_steps=10 * steps_per_epoch, steps_per_epoch=steps_per_epoch)
  for it in (0, 100, 500, 999):
    assert float(schedule(it)) == pytest.approx(1e-5, rel=1e-6)
  for epoch in range(1, 10):
    expected = 1e-6 + 4.5e-6 * (1 + math.cos(math.pi * epoch / 10))
    assert float(schedule(epoch * steps_per_epoch + 3)) == pytest.approx(expected, rel=1e-5)


def test_warmup_cosine_values():
  cfg = _cfg(lr=1.0, schedule={"name": "warmup_cosine", "warmup_steps": 10,
                               "warmup_init": 0.1, "min_lr": 0.01})
  _, schedule = optim.make_optimizer(cfg, params={"w": jnp.zeros(2)}, total_steps=110,
                                     steps_per_epoch=0)
  expected = {0: 0.1, 5: 0.55, 10: 1.0, 60: 0.01 + 0.5 * 0.99, 85: None, 110: 0.01}
  expected[85] = 0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 75 / 100))
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-5), step


def _albef_like_params():
  """Flax-named leaves standing in for the ALBEF towers (tiny widths)."""
  rng = np.random.default_rng(0)
  shapes = {
      "img/cls": (1, 1, 8),
      "img/pos_embedding": (1, 5, 8),
      "img/patch_embed/kernel": (2, 2, 3, 8),
      "img/patch_embed/bias": (8,),
      "img/block_0/ln_1/scale": (8,),
      "img/block_0/ln_1/bias": (8,),
      "img/block_0/attn/query/kernel": (8, 2, 4),
      "img/block_0/attn/query/bias": (2, 4),
      "txt/embeddings/word/embedding": (11, 8),
      "txt/layer_0/ffn/kernel": (8, 16),
      "txt/layer_0/ffn/bias": (16,),
      "itm_head/kernel": (8, 2),
      "itm_head/bias": (2,),
      "temp": (),
  }
  params = {}
  for path, shape in shapes.items():
    node = params
    *parents, name = path.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return params


def _flat(tree, is_leaf=None):
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {optim.path_str(k): v for k, v in leaves}


def test_weight_decay_mask_reproduces_albef_appendix_e10():
  labels = optim.param_labels(_albef_like_params(), _cfg())
  decay = {p: l.decay for p, l in _flat(labels, lambda x: isinstance(x, optim.ParamLabel)).items()}
  assert decay == {
      "img/cls": True, "img/pos_embedding": True, "img/patch_embed/kernel": True,
      "img/patch_embed/bias": False, "img/block_0/ln_1/scale": False,
      "img/block_0/ln_1/bias": False, "img/block_0/attn/query/kernel": True,
      "img/block_0/attn/query/bias": False, "txt/embeddings/word/embedding": True,
      "txt/layer_0/ffn/kernel": True, "txt/layer_0/ffn/bias": False, "itm_head/kernel": True,
      "itm_head/bias": False, "temp": True,
  }


def test_no_decay_regexes_can_exempt_albef_quirk_params():
  cfg = _cfg(no_decay=[r"(.*/)?bias", r"(.*/)?scale", "temp", "img/(cls|pos_embedding)"])
  labels = _flat(optim.param_labels(_albef_like_params(), cfg),
                 lambda x: isinstance(x, optim.ParamLabel))
  assert not labels["temp"].decay and not labels["img/cls"].decay
  assert labels["img/patch_embed/kernel"].decay


def _adamw_reference(params, grads_seq, *, lrs, b1, b2, eps, wd, clip, frozen, no_decay, mult):
  """PyTorch AdamW, written out per leaf in NumPy; `frozen`/`no_decay`/`mult` keyed by path."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    grads = {k: np.asarray(g, np.float64) for k, g in grads.items() if k not in frozen}
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    scale = clip / max(norm, clip) if clip else 1.0
    for k, g in grads.items():
      g = g * scale
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      step = m_hat / (np.sqrt(v_hat) + eps)
      if k not in no_decay:
        step = step + wd * params[k]
      params[k] = params[k] - lr * mult.get(k, 1.0) * step
  return params


def test_adamw_steps_match_numpy_reference():
  params = _albef_like_params()
  cfg = _cfg(lr=0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3, grad_clip_norm=2.0,
             freeze=["img/patch_embed/.*"], lr_mult=[("txt/.*", 0.1), (".*/ffn/.*", 5.0)],
             schedule={"name": "warmup_cosine", "warmup_steps": 2, "warmup_init": 0.0,
                       "min_lr": 0.0})
  tx, _ = optim.make_optimizer(cfg, params=params, total_steps=6, steps_per_epoch=0)
  rng = np.random.default_rng(1)
  # Large first gradients (clipped) and small later ones (not clipped).
  grads_seq = [jax.tree.map(lambda p, s=s: jnp.asarray(s * rng.normal(size=p.shape), jnp.float32),
                            params) for s in (10.0, 0.01, 0.02, 5.0)]
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  new = params
  for grads in grads_seq:
    updates, opt_state = update(grads, opt_state, new)
    new = optax.apply_updates(new, updates)

  lrs = [0.0, 0.025, 0.05, 0.05 * 0.5 * (1 + math.cos(math.pi / 4))]
  flat_params = _flat(params)
  expected = _adamw_reference(
      flat_params, [_flat(g) for g in grads_seq], lrs=lrs, b1=0.8, b2=0.95, eps=1e-6,
      wd=0.3, clip=2.0, frozen={"img/patch_embed/kernel", "img/patch_embed/bias"},
      no_decay={k for k, v in flat_params.items() if v.ndim == 1 or k.endswith("bias")},
      mult={k: 0.1 for k in flat_params if k.startswith("txt/")})
  got = _flat(new)
  for path, value in expected.items():
    np.testing.assert_allclose(got[path], value, rtol=2e-5, atol=1e-6, err_msg=path)


def test_frozen_params_never_change_and_hold_no_moments():
  params = _albef_like_params()
  tx, _ = optim.make_optimizer(_cfg(lr=0.1, weight_decay=0.1, freeze=["img/.*"]), params=params,
                               total_steps=3, steps_per_epoch=0)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  current = params
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    updates, opt_state = update(grads, opt_state, current)
    current = optax.apply_updates(current, updates)
  for path, value in _flat(current).items():
    if path.startswith("img/"):
      np.testing.assert_array_equal(value, _flat(params)[path], err_msg=path)
    else:
      assert not np.allclose(value, _flat(params)[path]), path
  mu = optax.tree.get(opt_state, "mu")
  assert set(_flat(mu)) == {p for p in _flat(params) if not p.startswith("img/")}


def test_lr_mult_scales_the_update():
  params = _albef_like_params()
  grads = jax.tree.map(jnp.ones_like, params)
  base_tx, _ = optim.make_optimizer(_cfg(weight_decay=0.02), params=params, total_steps=1,
                                    steps_per_epoch=0)
  mult_tx, _ = optim.make_optimizer(_cfg(weight_decay=0.02, lr_mult=[("txt/.*", 0.25)]),
                                    params=params, total_steps=1, steps_per_epoch=0)
  base = _flat(jax.jit(base_tx.update)(grads, base_tx.init(params), params)[0])
  scaled = _flat(jax.jit(mult_tx.update)(grads, mult_tx.init(params), params)[0])
  for path in base:
    factor = 0.25 if path.startswith("txt/") else 1.0
    np.testing.assert_allclose(scaled[path], factor * base[path], rtol=1e-6, err_msg=path)


def test_grad_clipping_caps_the_global_norm_of_trainable_grads():
  params = _albef_like_params()
  cfg = _cfg(grad_clip_norm=0.5, b1=0.0, freeze=["itm_head/.*"])
  tx, _ = optim.make_optimizer(cfg, params=params, total_steps=1, steps_per_epoch=0)
  update = jax.jit(tx.update)
  grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  _, opt_state = update(grads, tx.init(params), params)
  # With b1 = 0 the first moment is the clipped gradient itself.
  clipped = optax.tree.get(opt_state, "mu")
  assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-5)
  direction = np.asarray(_flat(clipped)["img/pos_embedding"] / _flat(grads)["img/pos_embedding"])
  np.testing.assert_allclose(direction, direction.flat[0], rtol=1e-6)

  small = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  _, opt_state = update(small, tx.init(params), params)
  np.testing.assert_allclose(_flat(optax.tree.get(opt_state, "mu"))["temp"], 1e-3)


def test_param_table_marks_frozen_and_decayed_params():
  params = _albef_like_params()
  labels = optim.param_labels(params, _cfg(freeze=["img/.*"], lr_mult=[("temp", 2.0)]))
  table = optim.format_param_labels(params, labels)
  rows = {line.split()[0]: line.split() for line in table.splitlines()[1:-1]}
  assert rows["img/cls"][1:] == ["(1,1,8)", "8", "FROZEN", "-", "1"]
  assert rows["txt/layer_0/ffn/kernel"][3:] == ["train", "decay", "1"]
  assert rows["txt/layer_0/ffn/bias"][3:] == ["train", "-", "1"]
  assert rows["temp"][1:] == ["()", "1", "train", "decay", "2"]
  assert "frozen 240 params" in table


@pytest.mark.parametrize("fields,message", [
    ({"name": "sgd"}, "optim.name"),
    ({"schedule": {"name": "linear"}}, "optim.schedule.name"),
    ({"schedule": {"name": "albef", "min_lr": 0.0, "warmup_steps": 150}}, "warmup_step_every"),
    ({"schedule": {"name": "albef"}}, "optim.schedule.min_lr"),
    ({"schedule": {"name": "constant", "warmup_steps": 3}}, "warmup_steps"),
    ({"wd": 0.1}, "'wd'"),
    ({"freeze": ["image/.*"]}, "optim.freeze"),
    ({"lr_mult": [("txt/.*", 0.1), ("text/.*", 0.5)]}, "text/.*"),
    ({"no_decay": ["(bias"]}, "optim.no_decay: bad regex"),
    ({"freeze": "img/.*"}, "optim.freeze must be a list"),
])
def test_bad_config_raises_clear_errors(fields, message):
  with pytest.raises(ValueError) as error:
    optim.make_optimizer(_cfg(**fields), params=_albef_like_params(), total_steps=10,
                         steps_per_epoch=5)
  assert message in str(error.value)
