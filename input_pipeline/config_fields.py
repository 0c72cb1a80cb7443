"""The `config.input` schema and the readers of its fields, shared by the builder and the formats.

Pure Python (no TensorFlow): configs and config validation may use it before any compute.

Op strings (`pp`, `batch_pp`, `device_augment_pp`, `device_pp`, `eval_pp`, `eval_text_pp`) may
name knobs as placeholders, `{name}` or `{name!r}`: `fill` replaces them by the value of
`config.input.name` (any scalar field of `FIELDS`, cast to its default's type) or of a derived
value (`DERIVED`). Nothing else in a string is changed, so a string without placeholders is used
verbatim. `input_pipeline/inputs.py` states the rule for config writers.
"""
import re
from typing import Any

from input_pipeline import albef_augment

# name -> (default, meaning). The first block is the schema of `input_pipeline.inputs`.
FIELDS: dict[str, tuple[Any, str]] = {
    "source": ("demo", "demo | json | tfrecord | tfds | mixture"),
    "annotations": ("", "json: annotation file(s) of the training split, comma-separated"),
    "image_root": ("", "json: folder the JSON image paths are relative to"),
    "tfrecord_pattern": ("", "tfrecord: glob of the training split's shards"),
    "tfds_name": ("", "tfds: dataset name (e.g. coco_captions)"),
    "data_dir": ("", "tfds / demo: TFDS data dir, or the task demos' root ('' = default)"),
    "split": ("train", "training split (TFDS split string for tfds / demo)"),
    "num_train_examples": (0, "epoch length for the trainer's schedules"),
    "image_size": (256, "knob {image_size}: training and eval image side in pixels"),
    "max_len": (25, "knob {max_len}: text tokens per caption, [CLS] included"),
    "tokenizer": ({"kind": "wordpiece", "path": ""},
                  "kind: wordpiece | sentencepiece; path: vocab.txt or .model ('' = demo model); "
                  "filled into every tokenizer op that does not name its own"),
    "mlm_prob": (0.15, "knob {mlm_prob}: masked-word probability (also read by synthetic input)"),
    "patch_mask_ratio": (0.0, "knob {patch_mask_ratio}: masked-patch fraction (also read by "
                         "synthetic input: > 0 adds patch_mask)"),
    "synthetic": (False, "trainer-side: random batches, no input pipeline"),
    "demo_config": ("default", "demo: vlpjax_demo config, or the task demo's (default | tiny)"),
    "format": ("caption", "annotation format and batch fields: a name of `input_pipeline.formats` "
               "(caption | vqa | nlvr2 | snli_ve | refcoco)"),
    "pp": ("", "per-example op string (host); '' = the format's default ops (all of them: also "
           "batch_pp, device_augment_pp, device_pp where those are '')"),
    "batch_pp": ("", "per-batch op string (host, after batching; seed = (seed, step)); with a "
                 "config-written pp, '' = none"),
    "device_augment": (False, "the host runs device_augment_pp (decodes only the crop: uint8 "
                       "canvas + image_hw) and the accelerator runs device_pp (resize, flip, "
                       "RandAugment, normalisation); pp is not used"),
    "device_augment_pp": ("", "per-example host op string that replaces pp with device_augment"),
    "device_pp": ("", "JAX ops on the global batch after transfer (`input_pipeline.device_ops`), "
                  "run with device_augment only"),
    "eval_pp": ("", "eval op string; '' = the format's (caption: decode|resize({image_size})"
                "|normalize('clip'), the image ops; tasks: `tasks.eval_pp_spec`)"),
    "eval_text_pp": ("", "caption eval text ops; '' = clean_caption({caption_max_words})"
                     "|tokenize({eval_len})"),
    "extra_pp": ("", "per-example ops appended to a task format's default training ops (a method's "
                 "further inputs, e.g. ViCHA's concept strings)"),
    "eval_extra_pp": ("", "per-example ops appended to a task format's default eval ops"),
    "eval_max_len": (0, "eval tokens per caption (0 = max_len; knob {eval_len} is the result)"),
    "eval_annotations": ("", "json: annotation file(s) of the eval split"),
    "eval_tfrecord_pattern": ("", "tfrecord: glob of the eval split's shards"),
    "shuffle_buffer": (10_000, "records in the shuffle buffer (JSON sources permute all)"),
    "patch_size": (16, "knob {patch_size}: patch side of the model ({patch_grid} = "
                   "image_size // patch_size)"),
    "patch_mask_strategy": ("random", "knob {patch_mask_strategy}: random | block"),
    "patch_mask_min_block": (16, "knob {patch_mask_min_block}: smallest block (patches) for "
                             "block masking"),
    "caption_max_words": (30, "knob {caption_max_words}: captions are cut to this many words"),
    # Visual concepts (ViCHA) and MAE.
    "concept_draws": (4, "knob {concept_draws}: concept words drawn with replacement per training "
                      "example (ViCHA: int(0.3 * 15) = 4)"),
    "concept_max_len": (16, "knob {concept_max_len}: training concept-string tokens, [CLS] included"),
    "eval_concept_max_len": (55, "knob {eval_concept_max_len}: eval concept-string tokens (all 15 "
                             "words; ViCHA's max_length 55)"),
    "demo_concept_error_rate": (0.2, "knob {demo_concept_error_rate}: demo_concepts' probability "
                                "that a scene word is replaced by a distractor"),
    "mae_mask_ratio": (0.75, "knob {mae_mask_ratio}: MAE's masked-patch fraction (also read by "
                       "synthetic input when the mae objective is on)"),
    # MVP's object tags.
    "tag_drop": (0.0, "knob {tag_drop}: probability that a training image's tags are dropped "
                 "(MVP's drop_tags: it trains from its patches alone)"),
    "field_map": ({}, "tfds: common key -> feature path"),
    "path_strip": (0, "json: leading image-path components to drop"),
    "mixture": ((), "mixture: list of dicts {weight, source, ...source fields}"),
    "probe_examples": (256, "examples tried at start to find one usable example"),
    "prefetch": (2, "batches prefetched on the host"),
    "threads": (0, "tf.data threads of this pipeline (0 = TensorFlow's default, all cores)"),
    # Task formats (`input_pipeline.tasks`).
    "answer_list": ("", "vqa: JSON list of candidate answers for eval ('' = distinct train answers)"),
    "vg_image_root": ("", "vqa: folder of the `dataset: vg` entries' images ('' = image_root)"),
    "max_answers": (10, "knob {max_answers}, vqa: answers per question in a training batch (A)"),
    "answer_max_len": (10, "knob {answer_max_len}, vqa: answer tokens, [CLS] and [SEP] included"),
    "max_proposals": (100, "knob {max_proposals}, refcoco: box proposals per expression in an "
                      "eval batch (P)"),
    # Several input streams per step (`vlpjax.data`), and the unpaired formats
    # (`input_pipeline.unpaired`: text_only, image_only; VLMixer).
    "streams": ({}, "{name: {config.input overrides, batch_size}}: one batch of each stream per "
                "step (the step's batch is {name: batch}); {} = one stream, this config.input"),
    "concept_vocab": ("", "text_only / image_only: concept vocabulary JSON "
                      "(`python -m input_pipeline.grounded_words vocab`); '' with source demo = "
                      "the demo's, built beside its data"),
    "grounding": ("", "text_only: grounded words per caption (`grounded_words annotate` output); "
                  "'' = the json source's own annotations, or the demo's"),
    "p_cmc": (0.5, "knob {p_cmc}, text_only: probability that a grounded occurrence is replaced "
              "by visual tokens (cross-modal CutMix)"),
    "max_spans": (4, "knob {max_spans}, text_only: grounded occurrences kept per caption (K)"),
    "entry_tokens": (4, "knob {entry_tokens}, text_only: visual tokens per gallery entry (P)"),
    "max_objects": (8, "knob {max_objects}, image_only: objects kept per image (M)"),
    "max_tags": (16, "knob {max_tags}, image_only: tag tokens, [CLS] and [SEP] included"),
    "object_label_field": ("objects/label", "image_only: the source field naming each object "
                           "(demo: 'concepts' = colour + shape, 'objects/label' = shape)"),
}

# The op-string fields; `fill` runs over each before it is parsed.
OP_FIELDS = ("pp", "batch_pp", "device_augment_pp", "device_pp", "eval_pp", "eval_text_pp", "extra_pp",
             "eval_extra_pp")

# Placeholders computed from the knobs: name -> (meaning, fn(cfg)).
DERIVED = {
    "patch_grid": ("image_size // patch_size, the side of the patch grid",
                   lambda cfg: int(get(cfg, "image_size")) // int(get(cfg, "patch_size"))),
    "canvas": ("the crop canvas side of decode_crop_canvas(image_size)",
               lambda cfg: albef_augment.canvas_side(int(get(cfg, "image_size")))),
    "eval_len": ("eval_max_len, or max_len when it is 0",
                 lambda cfg: int(get(cfg, "eval_max_len")) or int(get(cfg, "max_len"))),
}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(!r)?\}")


def get(cfg, name: str):
  """`cfg.name`, or its `FIELDS` default."""
  return cfg.get(name, FIELDS[name][0])


def as_list(value) -> list[str]:
  """A comma-separated string or a sequence of strings as a list."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return list(value)


def for_split(cfg, name: str, split: str):
  """`name` for the training split, `eval_{name}` for any other split (JSON / TFRecord)."""
  if split == get(cfg, "split"):
    return get(cfg, name)
  value = get(cfg, f"eval_{name}")
  if not value:
    raise ValueError(f"config.input.{name} names files for the training split only; set "
                     f"config.input.eval_{name} to read split {split!r}")
  return value


def tokenizer(cfg) -> tuple[str, str | None]:
  """(kind, model path or None for the demo model) of `config.input.tokenizer`."""
  value = get(cfg, "tokenizer")
  return value["kind"], value.get("path", "") or None


def knob(cfg, name: str):
  """The value placeholder `{name}` stands for; KeyError when `name` is no knob."""
  if name in DERIVED:
    return DERIVED[name][1](cfg)
  default = FIELDS[name][0] if name in FIELDS else None
  if not isinstance(default, (bool, int, float, str)):
    raise KeyError(name)
  return type(default)(get(cfg, name))


def knob_names() -> list[str]:
  return sorted([n for n, (d, _) in FIELDS.items() if isinstance(d, (bool, int, float, str))]
                + list(DERIVED))


def fill(spec: str, cfg, field: str = "pp") -> str:
  """`spec` with each `{name}` / `{name!r}` replaced by `knob(cfg, name)` (str / repr).

  Raises ValueError naming `config.input.<field>` for a placeholder that is no knob.
  """

  def replace(match):
    name, as_repr = match.group(1), match.group(2)
    try:
      value = knob(cfg, name)
    except KeyError:
      raise ValueError(f"config.input.{field} = {spec!r}: {{{name}}} names no knob; knobs: "
                       f"{', '.join(knob_names())}") from None
    return repr(value) if as_repr else str(value)

  return _PLACEHOLDER.sub(replace, spec)
