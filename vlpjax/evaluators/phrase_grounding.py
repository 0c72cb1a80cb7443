"""MVP on the demo data: zero-shot retrieval with and without the images' tags, and phrase grounding
measured on the demo boxes.

  python -m vlpjax.evaluators.phrase_grounding --config=configs/mvp.py:demo \
    --checkpoint=/tmp/mvp_demo/export/pretrain [--num_images=1000] [--output=results.json]

Retrieval (`retrieval.recall_at_k`, TR/IR@1/5/10, r_mean) from the VSC embeddings of the
held-out images: `patches` encodes the images alone (what the trainer's `retrieval` evaluator
does, as its image batches carry no tags), `tags` with each image's object tags appended to the
ViT input, as in pre-training (MVPTR evaluates with detector tags). Captions are `[CLS] words
phrases [SEP]` (the config's `eval_text_pp`).

Phrase grounding. For each held-out caption, the pair (caption with its phrases, its image with
its tags) goes through the cross-modal encoder; each object phrase (a phrase `(shape,)` or
`(shape, attribute)` whose shape word names a demo shape and whose attribute, if any, is a colour
or a size) is grounded to the patch whose fused state has the highest cosine with the phrase's
fused state (what WPG trains). A hit: that patch's centre lies inside the box of an object of the
scene that the phrase describes (its shape, and its colour / size when the phrase names one).
Accuracy = hits / object phrases; the random-patch baseline is the expected accuracy of a
uniformly drawn patch on the same phrases: the mean fraction of patch centres inside the
described objects' boxes (exact, not sampled).

Controls, for telling grounding from finding objects or a favourite position:
- `on_object`: how often the chosen patch lies in any object of the scene (the described one or
  another), against `object_area`, how often a random patch does;
- `object_patch`: the expected accuracy of a patch drawn uniformly from those inside any object,
  i.e. of a model that finds the objects but not which one the phrase names;
- `best_fixed_patch`: the accuracy of always choosing the one patch position that is best on
  these phrases (a model that ignores both phrase and image can reach it at best).
A model that finds objects has `on_object` above `object_area`; it grounds the phrase where,
among its choices on an object, the described one is more frequent than `object_patch` (and the
accuracy beats `best_fixed_patch`), not just where it beats the random patch.
"""
import json
import re
from typing import NamedTuple, Sequence

import numpy as np

# Words of the demo's phrases -> the shape they name ("plus sign" parses as (sign, plus)).
SHAPE_WORDS = {"circle": "circle", "disk": "circle", "square": "square", "triangle": "triangle", "star": "star",
               "cross": "cross", "sign": "cross", "diamond": "diamond", "rhombus": "diamond"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}


def described_objects(phrase: Sequence[str], objects: Sequence[dict], colors: Sequence[str]) -> list[int] | None:
  """Indices of the scene objects an object phrase describes, or None when it is no object phrase.

  Args:
    phrase: ("disk",), ("square", "red"), ("star", "big"), ... (phrases.Phrase).
    objects: the scene's objects: dicts with shape, color, size.
    colors: the colour names.
  """
  if not 1 <= len(phrase) <= 2 or phrase[0] not in SHAPE_WORDS:
    return None
  shape = SHAPE_WORDS[phrase[0]]
  keep = [i for i, o in enumerate(objects) if o["shape"] == shape]
  if len(phrase) == 2:
    attribute = phrase[1]
    if attribute in colors:
      keep = [i for i in keep if objects[i]["color"] == attribute]
    elif attribute in SIZE_WORDS:
      keep = [i for i in keep if objects[i]["size"] == SIZE_WORDS[attribute]]
    elif not (phrase[0] == "sign" and attribute == "plus"):
      return None
  return keep


def patch_centres(grid: int) -> np.ndarray:
  """[grid * grid, 2] (y, x) centres of the row-major patches in [0, 1] image coordinates."""
  centre = (np.arange(grid) + 0.5) / grid
  y, x = np.meshgrid(centre, centre, indexing="ij")
  return np.stack([y.ravel(), x.ravel()], axis=-1)


def inside_any(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """bool [n]: whether each (y, x) point lies in one of the (ymin, xmin, ymax, xmax) boxes."""
  points, boxes = np.asarray(points, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
  y, x = points[:, :1], points[:, 1:]
  return np.any((y >= boxes[None, :, 0]) & (y <= boxes[None, :, 2]) & (x >= boxes[None, :, 1])
                & (x <= boxes[None, :, 3]), axis=1)


class PhraseScores(NamedTuple):
  """The scores of one object phrase (`phrase_scores`)."""
  hit: bool              # the chosen patch lies in a box of an object the phrase describes
  random_patch: float    # the probability of a hit for a uniformly drawn patch
  on_object: bool        # the chosen patch lies in the box of some object of the scene
  object_patch: float    # the hit probability of a patch drawn uniformly from those on an object
                         # (0 when no patch centre is on one)
  object_area: float     # the fraction of patches on some object
  described: np.ndarray  # bool [grid * grid]: the patches a hit may choose


def phrase_scores(similarities: np.ndarray, boxes: np.ndarray, scene_boxes: np.ndarray, grid: int) -> PhraseScores:
  """Scores one object phrase grounded to its most similar patch.

  Args:
    similarities: [grid * grid] cosine of the phrase with each patch.
    boxes: [k, 4] the boxes of the objects the phrase describes (k >= 1).
    scene_boxes: [n, 4] the boxes of every object of the scene.
  """
  centres = patch_centres(grid)
  described = inside_any(centres, boxes)
  on_object = inside_any(centres, scene_boxes) | described
  choice = int(np.argmax(similarities))
  return PhraseScores(hit=bool(described[choice]), random_patch=float(np.mean(described)),
                      on_object=bool(on_object[choice]),
                      object_patch=float(described.sum() / max(int(on_object.sum()), 1)),
                      object_area=float(np.mean(on_object)), described=described)


# ----------------------------------------------------------------------------- the evaluation


def _cosines(model, params, images, concept_ids, concept_mask, text_ids, text_mask):
  """[B, L, P] cosine of every fused text state with every fused patch state of its pair."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vlpjax.models import layers  # pylint: disable=import-outside-toplevel

  image = model.apply({"params": params}, images, concept_ids=concept_ids, concept_mask=concept_mask,
                      method=model.encode_image)
  text = model.apply({"params": params}, text_ids, text_mask, method=model.encode_text)
  fused = model.apply({"params": params}, text["states"], text_mask, image["states"], image["mask"],
                      method=model.fuse)
  patches = fused["image_states"][:, :model.config.vision.num_patches]
  return jnp.einsum("bld,bpd->blp", layers.l2_normalize(fused["text_states"]), layers.l2_normalize(patches))


def evaluate(config, model, params, *, num_images: int = 0, batch_size: int = 64, retrieval: bool = True) -> dict:
  """Retrieval (patches / tags; skipped without `retrieval`) and phrase grounding with its
  controls on the demo test split (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from input_pipeline import builder, object_labels, ops_mvp, ops_text  # pylint: disable=import-outside-toplevel
  from input_pipeline import demo_data  # pylint: disable=import-outside-toplevel
  from vlpjax.evaluators import retrieval as retrieval_lib  # pylint: disable=import-outside-toplevel

  cfg = config.input
  if cfg.source != "demo":
    raise ValueError(f"phrase grounding is measured on the demo data (config.input.source='demo'), got {cfg.source!r}")
  data = builder.make_eval_dataset(cfg, split="test", batch_size=batch_size, process_index=0, process_count=1)
  tokenizer = ops_text.load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path or None)
  found = re.search(r"mvp_concepts\([^|]*min_sentences=(\d+)", cfg.pp)
  if "mvp_concepts(" not in cfg.pp:
    raise ValueError("config.input.pp has no mvp_concepts op: not an MVP demo config")
  concepts = ops_mvp.demo_annotations(cfg.demo_config, cfg.get("data_dir") or None,
                                      word_vocab=int(config.model.text.vocab_size),
                                      min_sentences=int(found.group(1)) if found else ops_mvp.DEFAULT_MIN_SENTENCES)
  with open(f"{concepts}/demo_test.json") as f:
    tags_of = {int(e["image_id"]): " ".join(e["tags"]) for e in json.load(f)}
  with open(f"{concepts}/id2phrase.json") as f:
    id2phrase = {int(k): tuple(v) for k, v in json.load(f).items()}
  scenes = {image_id: scene for image_id, scene, _ in object_labels.demo_scenes("test", cfg.demo_config)}
  tag_len = 20 if cfg.demo_config != "tiny" else 12
  tag_ids, tag_mask = tokenizer.encode([tags_of.get(int(i), "") for i in data.image_ids], tag_len, append_sep=True)

  images = np.concatenate([b["image"] for b in data.image_batches()])[:data.num_images]
  limit = num_images or data.num_images
  embed_image = jax.jit(lambda p, x, c, m: model.apply(
      {"params": p}, model.apply({"params": p}, x, concept_ids=c, concept_mask=m, method=model.encode_image)
      ["states"][:, 0], method=model.project_image))
  embed_plain = jax.jit(lambda p, x: model.apply(
      {"params": p}, model.apply({"params": p}, x, method=model.encode_image)["states"][:, 0],
      method=model.project_image))
  embed_text = jax.jit(lambda p, i, m: model.apply(
      {"params": p}, model.apply({"params": p}, i, m, method=model.encode_text)["states"][:, 0],
      method=model.project_text))

  def batched(fn, *arrays):
    return np.concatenate([np.asarray(fn(params, *(a[s:s + batch_size] for a in arrays)))
                           for s in range(0, len(arrays[0]), batch_size)])

  results = {}
  if retrieval:
    text_feat = batched(embed_text, data.text_ids, data.text_mask)
    for name, image_feat in (("patches", batched(embed_plain, images)),
                             ("tags", batched(embed_image, images, tag_ids, tag_mask))):
      sims = image_feat @ text_feat.T
      for key, value in retrieval_lib.recall_at_k(sims, sims.T, data.txt2img, data.img2txt).items():
        results[f"{name}/{key}"] = value

  # Phrase grounding: every caption of the first `limit` images with its own image.
  grid = config.model.vision.image_size // config.model.vision.patch_size
  cosines = jax.jit(lambda p, *a: _cosines(model, p, *a))
  captions = [t for t in range(data.num_texts) if data.txt2img[t] < limit]
  hits, chances, per_kind = [], [], {}
  on_objects, object_chances, object_areas, inside_counts = [], [], [], np.zeros(grid * grid)
  for start in range(0, len(captions), batch_size):
    rows = np.asarray(captions[start:start + batch_size])
    owners = data.txt2img[rows]
    sims = np.asarray(cosines(params, images[owners], tag_ids[owners], tag_mask[owners], data.text_ids[rows],
                              data.text_mask[rows]))
    phrase_mask = np.asarray(data.text_ids[rows] >= int(config.model.text.vocab_size))
    for k, (row, owner) in enumerate(zip(rows, owners)):
      objects = scenes[int(data.image_ids[owner])]["objects"]
      scene_boxes = np.asarray([o["bbox"] for o in objects])
      for position in np.flatnonzero(phrase_mask[k]):
        phrase = id2phrase.get(int(data.text_ids[row, position]))
        chosen = described_objects(phrase or (), objects, tuple(demo_data.COLORS))
        if not chosen:
          continue
        scores = phrase_scores(sims[k, position], np.asarray([objects[i]["bbox"] for i in chosen]), scene_boxes,
                               grid)
        hits.append(scores.hit)
        chances.append(scores.random_patch)
        on_objects.append(scores.on_object)
        object_chances.append(scores.object_patch)
        object_areas.append(scores.object_area)
        inside_counts += scores.described
        kind = "object" if len(phrase) == 1 else "attribute"
        per_kind.setdefault(kind, []).append(scores.hit)
  results["grounding/accuracy"] = 100.0 * float(np.mean(hits)) if hits else 0.0
  results["grounding/random_patch"] = 100.0 * float(np.mean(chances)) if chances else 0.0
  results["grounding/phrases"] = float(len(hits))
  results["grounding/on_object"] = 100.0 * float(np.mean(on_objects)) if hits else 0.0
  results["grounding/object_patch"] = 100.0 * float(np.mean(object_chances)) if hits else 0.0
  results["grounding/object_area"] = 100.0 * float(np.mean(object_areas)) if hits else 0.0
  # Among the choices on an object, how often the described one (against object_patch).
  results["grounding/hit_given_on_object"] = 100.0 * float(np.sum(hits) / max(np.sum(on_objects), 1)) if hits else 0.0
  results["grounding/best_fixed_patch"] = 100.0 * float(inside_counts.max() / len(hits)) if hits else 0.0
  for kind, values in per_kind.items():
    results[f"grounding/{kind}_accuracy"] = 100.0 * float(np.mean(values))
  return results


def format_results(results: dict) -> str:
  lines = []
  for name in ("patches", "tags"):
    if f"{name}/r_mean" not in results:
      continue
    lines.append(f"retrieval ({name}): " + "  ".join(
        f"{k}={results[f'{name}/{k}']:.2f}" for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
                                                      "r_mean")))
  lines.append(f"phrase grounding: {results['grounding/accuracy']:.1f}% of {int(results['grounding/phrases'])} "
               f"object phrases inside their object's box; random patch {results['grounding/random_patch']:.1f}%")
  lines.append(f"controls: chosen patch on some object {results['grounding/on_object']:.1f}% (a random patch "
               f"{results['grounding/object_area']:.1f}%); of those on the described object "
               f"{results['grounding/hit_given_on_object']:.1f}% (a random object patch "
               f"{results['grounding/object_patch']:.1f}%); best fixed patch {results['grounding/best_fixed_patch']:.1f}%")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from vlpjax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  config = flags.FLAGS.config
  model, params, _ = evaluate_lib.restore_params(config, flags.FLAGS.checkpoint)
  results = evaluate(config, model, params, num_images=flags.FLAGS.num_images, retrieval=flags.FLAGS.retrieval)
  print(format_results(results))
  print(json.dumps({k: round(v, 3) for k, v in results.items()}))
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, "w") as f:
      json.dump(dict(results, checkpoint=flags.FLAGS.checkpoint), f, indent=1)


if __name__ == "__main__":
  from absl import app, flags
  from vlpjax import config_lib
  config_lib.define_config_flag("config", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Params export, train checkpoint or converted directory.")
  flags.DEFINE_integer("num_images", 0, "Ground the captions of the first N test images (0 = all).")
  flags.DEFINE_string("output", None, "Optional JSON results path.")
  flags.DEFINE_bool("retrieval", True, "Also measure zero-shot retrieval (patches / tags).")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
