"""MAMO (Zhao et al., SIGIR 2023): masked multimodal modeling with implicit and explicit targets.

No reference code was released; this follows the reconstruction in docs/method_spec.md §3.2. On top of
ALBEF's ITC and ITM on the clean pair, one *jointly masked* pass (image patches replaced by a
learned mask embedding, text tokens masked 80/10/10) of the single-stream (`merged`) fusion
encoder is trained with:
  mrm  implicit target: the EMA teacher's multimodal states of the *unmasked* pair (average of
       its top-K fusion layers, each LayerNorm'ed without affine) at masked text + image positions;
  mim  explicit visual target: the EMA image encoder's patch features of the clean image;
  mlm  explicit text target: the masked words (with momentum distillation).
Every choice the paper leaves open is a field below.

Full recipe (ViT-B/16 at 256 px, BERT-base 6+6, batch 512, 30 epochs, AdamW 1e-4):

  python -m vlpjax.main --config=configs/mamo.py --workdir=/tmp/mamo \
    --config.input.annotations=/data/coco.json,/data/vg.json --config.input.image_root=/data/images

Demo on the embedded data (CPU, a few minutes):

  python -m vlpjax.main --config=configs/mamo.py:demo --workdir=/tmp/mamo_demo

`:tiny` is a seconds-long run used by the tests.
"""
from configs import common
from input_pipeline import inputs

# Joint masking, made by the input pipeline: image patches (ratio, random | block) and words.
MASK_PATCHES = ("mask_patches({patch_mask_ratio}, grid=({patch_grid}, {patch_grid}), "
                "strategy={patch_mask_strategy!r}, min_block={patch_mask_min_block})")


def get_config(arg: str = ""):
  config, args = common.base_config(arg)
  config.model.fusion = "merged"
  config.model.heads = ("itc", "itm", "mlm", "mrm", "mim")
  config.input.patch_mask_ratio = 0.5
  config.input.patch_mask_strategy = "random"
  config.input.mlm_prob = 0.15
  # Preprocessing as op strings; `{name}` is the knob config.input.name (input_pipeline/inputs.py).
  if args.size:
    # The demo data: mild crops, no flip (inputs.DEMO_IMAGE_PP); captions masked per example.
    config.input.pp = (inputs.DEMO_IMAGE_PP + "|choose_caption|clean_caption({caption_max_words})"
                       "|tokenize({max_len})|mask_tokens({mlm_prob})|" + MASK_PATCHES)
    config.input.batch_pp = ""
  else:
    # ALBEF's pretraining transform (docs/method_spec.md §1.3) and the patch mask per example; the
    # caption is tokenized and MLM-masked per batch.
    config.input.pp = ("decode_random_resized_crop({image_size}, scale=(0.2, 1.0))|flip|randaug(2, 7)"
                       "|normalize('clip')|choose_caption|clean_caption({caption_max_words})|" + MASK_PATCHES)
    config.input.batch_pp = "tokenize({max_len})|mask_tokens({mlm_prob})"
    # --config.input.device_augment=True: the host decodes the crop window only, the accelerator
    # resizes, flips, augments and normalises.
    config.input.device_augment_pp = ("decode_crop_canvas({image_size}, scale=(0.2, 1.0))"
                                      "|choose_caption|clean_caption({caption_max_words})|" + MASK_PATCHES)
    config.input.device_pp = "resize_canvas({image_size}, canvas={canvas})|flip|randaug(2, 7)|normalize('clip')"
  config.objectives = dict(
      common.albef_objectives(config.objectives.itc.queue_size),
      mrm=dict(weight=1.0, top_k=3, target_norm="layernorm", loss="mse", beta=1.0),
      mim=dict(weight=1.0, loss="cosine", target_norm="none"),
  )
  if config.model.text.fusion_layers < 3:
    config.objectives.mrm.top_k = config.model.text.fusion_layers
  return config


def downstream(task: str, config) -> str | None:
  """How `vlpjax.compare` runs a downstream task from a MAMO export (None = as configured).

  The merged fusion has no cross-attention: NLVR2's two-image fusion (pairs of cross-attention
  layers) cannot be built from it, and grounding's default Grad-CAM reads a fusion
  cross-attention map, so grounding uses its ITC mode (the ViT's self-attention) instead.
  """
  if task == "nlvr2":
    return "NLVR2's two-image model needs cross-attention fusion layers; MAMO's fusion is merged"
  if task == "grounding":
    with config.unlocked():
      config.eval.gradcam_mode = "itc"
  return None
