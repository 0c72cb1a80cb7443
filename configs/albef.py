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
from input_pipeline import inputs


def get_config(arg: str = ""):
  config, args = common.base_config(arg)
  # Preprocessing as op strings; `{name}` is the knob config.input.name (input_pipeline/inputs.py).
  if args.size:
    # The demo data: mild crops, no flip (inputs.DEMO_IMAGE_PP); captions masked per example.
    config.input.pp = (inputs.DEMO_IMAGE_PP + "|choose_caption|clean_caption({caption_max_words})"
                       "|tokenize({max_len})|mask_tokens({mlm_prob})")
    config.input.batch_pp = ""
  else:
    # ALBEF's pretraining transform (docs/method_spec.md §1.3); the caption is tokenized and MLM-masked
    # per batch (one tokenizer call per batch; masks drawn from the batch seed).
    config.input.pp = ("decode_random_resized_crop({image_size}, scale=(0.2, 1.0))|flip|randaug(2, 7)"
                       "|normalize('clip')|choose_caption|clean_caption({caption_max_words})")
    config.input.batch_pp = "tokenize({max_len})|mask_tokens({mlm_prob})"
    # --config.input.device_augment=True: the host decodes the crop window only, the accelerator
    # resizes, flips, augments and normalises.
    config.input.device_augment_pp = ("decode_crop_canvas({image_size}, scale=(0.2, 1.0))"
                                      "|choose_caption|clean_caption({caption_max_words})")
    config.input.device_pp = "resize_canvas({image_size}, canvas={canvas})|flip|randaug(2, 7)|normalize('clip')"
  return config
