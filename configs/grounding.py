"""Weakly-supervised visual grounding on RefCOCO+ (ALBEF, docs/method_spec.md §1.4, Appendix G):
finetune ITC (image-id positives) + ITM on expression-image pairs, then localise each
expression with Grad-CAM of the ITM "match" logit on the cross-attention of the 3rd fusion layer
(`eval.gradcam_layer`, 0-based 2 = BERT layer 8), averaged over heads and text tokens, and rank
the given box proposals by heat-map mass / area^0.5; accuracy = top proposal IoU >= 0.5, per
split (val / testA / testB). ALBEF 14M: 58.46 / 65.89 / 46.25.

Recipe: ViT-B/16 at 384 px, batch 256, AdamW lr 1e-5, 5 epochs, queue 65536, alpha 0.4.
Data: ALBEF's `refcoco+_train.json` (`image`, `text`) and an eval JSON whose entries carry
`ref_id`, `bbox` [x, y, w, h] and `proposals` [[x, y, w, h], ...] (MAttNet detections) and
`split` (input_pipeline/tasks.py documents the format):

  python -m vlpjax.main --config=configs/grounding.py --workdir=/tmp/grounding \
    --config.init_from.path=/ckpt/albef_4m \
    --config.input.annotations=/data/refcoco+_train.json --config.input.eval_annotations=/data/refcoco+_eval.json \
    --config.input.image_root=/data/coco --config.input.tokenizer.path=/data/vocab.txt

Demo (CPU minutes): the generated referring expressions over demo scenes ("the red square",
"the shape left of the green triangle"); proposals are every object's box plus distractors:

  python -m vlpjax.main --config=configs/grounding.py:demo --workdir=/tmp/grounding_demo \
    --config.init_from.path=/tmp/vlpjax_albef_demo/export/pretrain
"""
import ml_collections

from configs import common
from configs import finetune_retrieval


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config, args = common.finetune_config(
      arg, fmt="refcoco", kind="vlp", objectives=finetune_retrieval.retrieval_objectives(),
      eval_kind="grounding", resolution=384, max_len=30, lr=1e-5, epochs=5, batch=256,
      num_train_examples=120_624, heads=("itc", "itm"))
  config.eval.gradcam_layer = min(2, config.model.text.fusion_layers - 1)
  config.eval.gradcam_mode = "itm"
  # ITC mode (merged-fusion models: MAMO, MVP) reads ViT block 8 (ALBEF's), the last one of a
  # shallower ViT (the demo's 4 blocks).
  config.eval.block_num = min(8, config.model.vision.depth - 1)
  if not args.size:
    config.objectives.itc.queue_size = 65536
    config.optim.schedule.warmup_lr = 1e-5  # ALBEF: epoch 0 flat at the base lr
  config.objectives.itc.queue_size -= config.objectives.itc.queue_size % config.batch_size
  return config
