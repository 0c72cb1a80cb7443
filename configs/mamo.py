"""MAMO (Zhao et al., SIGIR 2023): masked multimodal modeling with implicit and explicit targets.

No reference code was released; this follows the reconstruction in METHODS.md §3.2. On top of
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


def get_config(arg: str = ""):
  config, _ = common.base_config(arg)
  config.model.fusion = "merged"
  config.model.heads = ("itc", "itm", "mlm", "mrm", "mim")
  # Joint masking, made by the input pipeline: image patches (ratio, random | block) and words.
  config.input.patch_mask_ratio = 0.5
  config.input.patch_mask_strategy = "random"
  config.input.mlm_prob = 0.15
  config.objectives = dict(
      common.albef_objectives(config.objectives.itc.queue_size),
      mrm=dict(weight=1.0, top_k=3, target_norm="layernorm", loss="mse", beta=1.0),
      mim=dict(weight=1.0, loss="cosine", target_norm="none"),
  )
  if config.model.text.fusion_layers < 3:
    config.objectives.mrm.top_k = config.model.text.fusion_layers
  return config
