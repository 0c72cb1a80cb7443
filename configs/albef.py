"""ALBEF pretraining (Li et al., NeurIPS 2021): ITC + ITM with hard negatives + MLM, momentum
distillation and feature queues. The shared base of every vlpjax method.

Full 4M recipe (ViT-B/16 at 256 px, BERT-base 6 text + 6 fusion layers, batch 512, 30 epochs,
AdamW 1e-4, queue 65536), on your data:

  python -m vlpjax.main --config=configs/albef.py --workdir=/tmp/albef \
    --config.input.annotations=/data/coco.json,/data/vg.json --config.input.image_root=/data/images

Demo on the embedded data (CPU, a few minutes; prints zero-shot retrieval on the held-out split):

  python -m vlpjax.main --config=configs/albef.py:demo --workdir=/tmp/albef_demo

`:tiny` is a seconds-long run used by the tests.
"""
from configs import common


def get_config(arg: str = ""):
  config, _ = common.base_config(arg)
  return config
