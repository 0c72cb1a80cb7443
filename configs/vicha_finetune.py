"""ViCHA downstream: the ALBEF task configs with ViCHA's visual concepts fed to the image encoder.

`arg` = TASK[,options]: TASK is `retrieval` (with `coco` | `flickr`, as configs/finetune_retrieval.py),
`vqa`, `nlvr2`, `snli_ve` or `grounding`; the options are that config's (`demo`, `tiny`, `steps=`,
`batch=`, `res=`). The task config is taken as it is, then:
  model.image_tokens = concepts (2 layers, padding unmasked, as ViCHA; the checkpoint's concept
      encoder is loaded by `init_from` like every other part);
  every image gets all its concept words (ViCHA's downstream configs draw none), joined and
      tokenized to `eval_concept_max_len` (55) tokens -> concept_ids / concept_mask (NLVR2:
      concept0_* for image 0 from `kwords1`, concept1_* from `kwords2`), in training and eval;
      the NLVR2 text-assignment stage reads captions with their concepts too;
  the demo sizes take the concepts of `demo_concepts` (retrieval, the NLVR2 TA stage: demo
      captions) or the `kwords` the task demos carry (input_pipeline/demo_tasks.py).
ViCHA's fine-tuning resolutions are 380 px for retrieval, SNLI-VE and grounding (23x23 patches,
border pixels dropped) and 384 px for VQA and NLVR2 (docs/method_spec.md §2.4): pass `res=380` to follow it.

  python -m vlpjax.main --config=configs/vicha_finetune.py:retrieval,flickr,res=380 --workdir=/tmp/vicha_flickr \
    --config.init_from.path=/ckpt/vicha_4m \
    --config.input.annotations=/data/flickr30k_train_kw.json \
    --config.input.eval_annotations=/data/flickr30k_test_kw.json \
    --config.input.image_root=/data/flickr30k --config.input.tokenizer.path=/data/vocab.txt

Zero-shot retrieval of a (converted) ViCHA checkpoint: `python -m vlpjax.evaluate` with the same config.
"""
import importlib

import ml_collections

TASKS = {"retrieval": "configs.finetune_retrieval", "vqa": "configs.finetune_vqa",
         "nlvr2": "configs.finetune_nlvr2", "snli_ve": "configs.finetune_snli_ve",
         "grounding": "configs.grounding"}
# All the image's concept words, one string, tokenized (ViCHA's downstream feeding).
ALL_CONCEPTS = "concepts_to_text|tokenize({eval_concept_max_len}, key='concept', out='concept')"
PAIR_CONCEPTS = ("concepts_to_text(key='concepts0', out='concept0')"
                 "|tokenize({eval_concept_max_len}, key='concept0', out='concept0')"
                 "|concepts_to_text(key='concepts1', out='concept1')"
                 "|tokenize({eval_concept_max_len}, key='concept1', out='concept1')")
DEMO_CONCEPTS = "demo_concepts({demo_concept_error_rate})"


def _split(arg: str) -> tuple[str, str]:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  if not parts or parts[0] not in TASKS:
    raise ValueError(f"configs/vicha_finetune.py needs the task first: one of {sorted(TASKS)} "
                     f"(e.g. --config=configs/vicha_finetune.py:snli_ve,demo); got {arg!r}")
  return parts[0], ",".join(parts[1:])


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  task, rest = _split(arg)
  config = importlib.import_module(TASKS[task]).get_config(rest)
  demo_data = config.input.source == "demo"
  config.model.image_tokens = dict(kind="concepts", layers=2, mask_padding=False)
  config.input.eval_concept_max_len = 32 if demo_data else 55
  if task == "retrieval":  # the caption format: its config writes the op strings
    concepts = ("|" + DEMO_CONCEPTS if demo_data else "") + "|" + ALL_CONCEPTS
    config.input.pp += concepts
    config.input.eval_pp = "decode|resize({image_size})|normalize('clip')" + concepts
  else:  # task formats: appended to their default ops (the task demos carry kwords)
    config.input.extra_pp = PAIR_CONCEPTS if task == "nlvr2" else ALL_CONCEPTS
    config.input.eval_extra_pp = config.input.extra_pp
  for stage in config.get("stages") or ():
    if stage.get("input") and stage["input"].get("pp"):  # NLVR2's text-assignment captions
      stage["input"]["pp"] += ("|" + DEMO_CONCEPTS if demo_data else "") + "|" + ALL_CONCEPTS
  return config
