"""ViCHA (Shukor, Couairon, Cord, BMVC 2022): ALBEF + visual concepts, hierarchical alignment, MAE.

On top of ALBEF's ITC (momentum distillation, queue), ITM (hard negatives) and MLM:
  visual concepts  each image's CLIP concept words (ViCHA's `kwords`, 15 per image) are encoded by
                   a 2-layer BERT + linear map and appended to the ViT input (vlpjax/models/concepts.py);
                   training draws 4 of the 15 with replacement, evaluation uses all 15;
  hitc             InfoNCE between intermediate CLS states: ViT blocks 7-11 with text layers 1-5
                   (1-based), per-level projections, global batch, weight 0.1 (objectives/hitc.py);
  mae              the online ViT on 25% of the patches (no concepts), a 2-block decoder, MSE on the
                   masked patches' normalised pixels (objectives/mae.py).
Loss = mlm + itc + 0.1 * hitc + itm + mae (docs/method_spec.md §2, App. A.2, B).

Full 4M recipe (ViT-B/16 at 256 px, BERT-base 6 + 6, batch 32/GPU x 8 = 256, 30 epochs, AdamW 1e-4
wd 0.02, ALBEF's warm-up and cosine to 1e-5, queue 65536, EMA 0.995, alpha 0.4 ramped over epoch 0,
MLM 0.15, captions 25 tokens, concept strings <= 55 tokens), on ViCHA's JSON files with `kwords`:

  python -m vlpjax.main --config=configs/vicha.py --workdir=/tmp/vicha \
    --config.input.annotations=/data/coco_karp_kw.json,/data/vg_kw.json,/data/sbu_kw.json,/data/cc3m_kw.json \
    --config.input.image_root=/data/images --config.input.tokenizer.path=/data/vocab.txt \
    --config.init_from.path=/ckpt/vicha_init   # DeiT + BERT (docs/methods/vicha.md)

Demo on the embedded data (CPU, minutes; concepts = each scene's object words with 20% replaced by
distractors, `demo_concepts`), and the same without concepts (the ablation):

  python -m vlpjax.main --config=configs/vicha.py:demo --workdir=/tmp/vicha_demo
  python -m vlpjax.main --config=configs/vicha.py:demo,concepts=0 --workdir=/tmp/vicha_demo_novc

At 400 steps (batch 64, seed 0; `configs/albef.py:demo` has the same steps, batch and seed) the demo
reaches zero-shot r_mean 24.3 on the 1,000 held-out images (ALBEF 12.9, ViCHA without concepts 23.7;
measured 2026-12-04, table in docs/methods/vicha.md).

`:tiny` is a seconds-long run used by the tests. `arg` takes `concepts=0` (no concept tokens, no
concept ops: the ablation) besides common.py's `steps=`, `batch=`, `res=`.
"""
from configs import common
from input_pipeline import inputs
from vlpjax.models import hitc

# Per example: draw `concept_draws` of the image's concept words (with replacement), join them with
# spaces, tokenize like a caption into concept_ids / concept_mask. Evaluation keeps all of them.
TRAIN_CONCEPTS = ("concepts_to_text({concept_draws})"
                  "|tokenize({concept_max_len}, key='concept', out='concept')")
EVAL_CONCEPTS = "concepts_to_text|tokenize({eval_concept_max_len}, key='concept', out='concept')"
# The demo's stand-in for CLIP's concept words (input_pipeline/ops_concepts.py).
DEMO_CONCEPTS = "demo_concepts({demo_concept_error_rate})"
# MAE's visible patches and their restore order (mae_keep_idx, mae_restore_idx).
MAE_KEEP = "shuffle_keep_patches({mae_mask_ratio}, grid=({patch_grid}, {patch_grid}), prefix='mae')"


def get_config(arg: str = ""):
  config, args = common.base_config(arg, concepts=1)
  use_concepts = bool(args.concepts)
  model = config.model
  model.heads = ("itc", "itm", "mlm", "hitc", "mae")
  model.image_tokens = dict(kind="concepts", layers=2, mask_padding=False) if use_concepts else {}
  model.head_config = dict(
      hitc=dict(hitc.default_levels(model.vision.depth, model.text.text_layers), embed_dim=0),
      mae=dict(width=model.vision.width, depth=2, num_heads=16, mlp_ratio=4.0, norm_eps=1e-5,
               cls_position=False))
  num_levels = len(model.head_config.hitc.vision_layers)
  config.objectives = dict(
      common.albef_objectives(config.objectives.itc.queue_size),
      hitc=dict(weight=0.1, level_weights=(1.0,) * num_levels, rank_bug_parity=False, key_gradient=False),
      mae=dict(weight=1.0, norm_pix=True))
  config.input.mae_mask_ratio = 0.75
  config.input.concept_draws = 4
  concepts = "|" + TRAIN_CONCEPTS if use_concepts else ""
  eval_concepts = "|" + EVAL_CONCEPTS if use_concepts else ""

  if not args.size:
    config.batch_size = args.batch or 256  # ViCHA: 32 per GPU (GPU count not stated; ALBEF's 8)
    config.objectives.itc.queue_size -= config.objectives.itc.queue_size % config.batch_size
    config.input.concept_max_len = 16  # 4 words; ViCHA pads to the batch's longest (module doc)
    config.input.eval_concept_max_len = 55
    # ALBEF's pretraining transform (docs/method_spec.md §1.3) + the concept string and MAE's visible
    # patches per example; the caption is tokenized and MLM-masked per batch.
    config.input.pp = ("decode_random_resized_crop({image_size}, scale=(0.2, 1.0))|flip|randaug(2, 7)"
                       "|normalize('clip')|choose_caption|clean_caption({caption_max_words})"
                       + concepts + "|" + MAE_KEEP)
    config.input.batch_pp = "tokenize({max_len})|mask_tokens({mlm_prob})"
    config.input.device_augment_pp = ("decode_crop_canvas({image_size}, scale=(0.2, 1.0))|choose_caption"
                                      "|clean_caption({caption_max_words})" + concepts + "|" + MAE_KEEP)
    config.input.device_pp = "resize_canvas({image_size}, canvas={canvas})|flip|randaug(2, 7)|normalize('clip')"
    config.input.eval_pp = "decode|resize({image_size})|normalize('clip')" + eval_concepts
    return config

  tiny = args.size == "tiny"
  model.head_config.mae.update(depth=1 if tiny else 2, num_heads=model.vision.num_heads)
  config.input.concept_max_len = 8 if tiny else 12
  config.input.eval_concept_max_len = 24 if tiny else 32
  demo_concepts = "|" + DEMO_CONCEPTS if use_concepts else ""
  # The demo data: mild crops, no flip (inputs.DEMO_IMAGE_PP); captions masked per example.
  config.input.pp = (inputs.DEMO_IMAGE_PP + "|choose_caption|clean_caption({caption_max_words})"
                     "|tokenize({max_len})|mask_tokens({mlm_prob})" + demo_concepts + concepts + "|" + MAE_KEEP)
  config.input.batch_pp = ""
  config.input.eval_pp = "decode|resize({image_size})|normalize('clip')" + demo_concepts + eval_concepts
  return config


def task_config(task: str, arg: str) -> str:
  """`vlpjax.compare`: ViCHA's downstream cells run `configs/vicha_finetune.py` (concepts fed to
  every task; zero-shot is its retrieval config evaluated without training)."""
  name = "retrieval" if task in ("zeroshot", "retrieval") else task
  return f"configs/vicha_finetune.py:{name}" + (f",{arg}" if arg else "")
