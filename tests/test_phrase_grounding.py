"""The demo phrase-grounding measurement: which objects a phrase describes, patch centres inside
boxes, hit / random-patch probability; and the whole evaluation on the tiny demo."""
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import mvp
from vlpjax.evaluators import phrase_grounding as pg
from vlpjax.models import vlp

OBJECTS = [dict(shape="circle", color="red", size="large"), dict(shape="circle", color="blue", size="small"),
           dict(shape="cross", color="red", size="small")]
COLORS = ("red", "blue", "green")


def test_described_objects():
  assert pg.described_objects(("disk",), OBJECTS, COLORS) == [0, 1]
  assert pg.described_objects(("circle", "blue"), OBJECTS, COLORS) == [1]
  assert pg.described_objects(("circle", "big"), OBJECTS, COLORS) == [0]
  assert pg.described_objects(("sign", "plus"), OBJECTS, COLORS) == [2]
  assert pg.described_objects(("square",), OBJECTS, COLORS) == []  # names no object of the scene
  assert pg.described_objects(("shape", "two"), OBJECTS, COLORS) is None
  assert pg.described_objects(("circle", "other"), OBJECTS, COLORS) is None
  assert pg.described_objects(("circle", "left of", "cross"), OBJECTS, COLORS) is None


def test_patch_centres_and_inside_any_match_a_loop():
  np.testing.assert_allclose(pg.patch_centres(2), [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])
  rng = np.random.default_rng(0)
  points = rng.random((50, 2))
  corners = np.sort(rng.random((3, 2, 2)), axis=1)  # per box: [[ymin, xmin], [ymax, xmax]]
  boxes = corners.reshape(3, 4)
  expected = [any(b[0] <= y <= b[2] and b[1] <= x <= b[3] for b in boxes) for y, x in points]
  np.testing.assert_array_equal(pg.inside_any(points, boxes), expected)


def _hit_and_chance(sims, boxes, grid):
  scores = pg.phrase_scores(sims, boxes, boxes, grid)
  return scores.hit, scores.random_patch


def test_hit_and_random_patch():
  grid = 4
  box = np.array([[0.0, 0.0, 0.5, 0.5]])  # the top-left 2 x 2 patches
  sims = np.zeros(16)
  sims[5] = 1.0  # row 1, column 1: inside
  assert _hit_and_chance(sims, box, grid) == (True, 4 / 16)
  sims[5], sims[15] = 0.0, 1.0
  assert _hit_and_chance(sims, box, grid) == (False, 4 / 16)
  for row, col in itertools.product(range(4), range(4)):
    sims = np.zeros(16)
    sims[row * 4 + col] = 1.0
    assert _hit_and_chance(sims, box, grid)[0] == (row < 2 and col < 2)


def test_object_controls_match_a_loop():
  grid = 4
  rng = np.random.default_rng(1)
  centres = [((r + 0.5) / grid, (c + 0.5) / grid) for r in range(grid) for c in range(grid)]
  for _ in range(20):
    corners = np.sort(rng.random((3, 2, 2)), axis=1)
    scene = corners.reshape(3, 4)
    described = scene[:1]
    sims = rng.random(grid * grid)
    chosen = centres[int(np.argmax(sims))]
    inside = lambda p, boxes: any(b[0] <= p[0] <= b[2] and b[1] <= p[1] <= b[3] for b in boxes)
    on_scene = [p for p in centres if inside(p, scene)]
    want_chance = sum(inside(p, described) for p in on_scene) / max(len(on_scene), 1)
    scores = pg.phrase_scores(sims, described, scene, grid)
    on_object, chance, area = scores.on_object, scores.object_patch, scores.object_area
    assert on_object == inside(chosen, scene)
    assert chance == pytest.approx(want_chance)
    assert area == pytest.approx(len(on_scene) / grid**2)
  # Two objects, the top-left and bottom-right quarters: choosing the other object is on an object
  # but a miss; half of the object patches are the described one's.
  scene = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
  sims = np.zeros(16)
  sims[15] = 1.0
  scores = pg.phrase_scores(sims, scene[:1], scene, grid)
  assert (scores.on_object, scores.object_patch, scores.object_area) == (True, 0.5, 0.5)
  assert (scores.hit, scores.random_patch) == (False, 4 / 16)
  np.testing.assert_array_equal(scores.described, pg.inside_any(pg.patch_centres(grid), scene[:1]))


def test_evaluation_runs_on_the_tiny_demo():
  config = mvp.get_config("tiny")
  model = vlp.build_model(config.model)
  params = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))(
      jax.random.PRNGKey(0))["params"]
  results = pg.evaluate(config, model, params, num_images=8, batch_size=32)
  for name in ("patches", "tags"):
    assert 0 <= results[f"{name}/r_mean"] <= 100
  assert results["grounding/phrases"] > 5
  assert 0 < results["grounding/random_patch"] < 60
  assert 0 <= results["grounding/accuracy"] <= 100
  # A phrase's own patches are object patches, and the best fixed position does at least as well
  # as a random one.
  assert results["grounding/random_patch"] <= results["grounding/object_patch"] <= 100
  assert results["grounding/random_patch"] <= results["grounding/best_fixed_patch"] <= 100
  assert results["grounding/accuracy"] <= results["grounding/on_object"] <= 100
  assert results["grounding/random_patch"] <= results["grounding/object_area"] <= 100
  assert results["grounding/accuracy"] <= results["grounding/hit_given_on_object"] <= 100
  assert "phrase grounding" in pg.format_results(results) and "best fixed patch" in pg.format_results(results)
  grounding_only = pg.evaluate(config, model, params, num_images=8, batch_size=32, retrieval=False)
  assert "patches/r_mean" not in grounding_only
  assert grounding_only["grounding/accuracy"] == results["grounding/accuracy"]
  assert "retrieval" not in pg.format_results(grounding_only)
