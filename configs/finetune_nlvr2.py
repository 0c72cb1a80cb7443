"""NLVR2 finetuning with ALBEF's text-assignment (TA) pre-step (docs/method_spec.md §1.4), as two stages
of one run:

  stage `ta`       the NLVR model (fusion widened to two layers per pretrained fusion layer, the
                   first attending image 0, the second image 1, with shared cross-attention
                   key/value projections) learns the 3-way task "which slot holds the caption's
                   image (0, 1 or neither)" on image-caption pretraining data (objective `nlvr_ta`;
                   partner images sampled by image-image ITC similarity);
  stage `finetune` the 2-way NLVR2 head (MLP 768 -> ReLU -> 2) on (image0, image1, sentence),
                   cross-entropy with momentum distillation (objective `cls`); accuracy on dev/test.

ALBEF 4M: 80.24 dev / 80.50 test-P. ALBEF runs TA as its own job (1 epoch of the 4M data at
256 px, batch 512) and finetunes at 384 px, batch 128, lr 2e-5, 10 epochs. Here both stages share
the run's batch size and resolution (128, 384 px), so the TA stage costs more per image than
ALBEF's; its length is `ta_steps` (default one 4M epoch at batch 128). Data: ALBEF's
`nlvr_train.json` / `nlvr_dev.json` / `nlvr_test.json` (`images` two paths, `sentence`, `label`)
and any caption JSON for TA:

  python -m vlpjax.main --config=configs/finetune_nlvr2.py --workdir=/tmp/nlvr \
    --config.init_from.path=/ckpt/albef_4m \
    --config.input.annotations=/data/nlvr_train.json --config.input.eval_annotations=/data/nlvr_test.json \
    --config.input.image_root=/data/nlvr2/images --config.input.tokenizer.path=/data/vocab.txt \
    '--config.stages[0].input.annotations=/data/coco.json,/data/vg.json,/data/cc3m.json,/data/sbu.json' \
    '--config.stages[0].input.image_root=/data/pretrain_images'

Demo (CPU minutes; chance = 50%): TA on the demo captions, then NLVR2 on generated image pairs,
from the configs/albef.py:demo export:

  python -m vlpjax.main --config=configs/finetune_nlvr2.py:demo --workdir=/tmp/nlvr_demo \
    --config.init_from.path=/tmp/vlpjax_albef_demo/export/pretrain
"""
import ml_collections

from configs import common

TA_STEPS_4M = 5_100_000 // 128


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config, args = common.finetune_config(
      arg, fmt="nlvr2", kind="nlvr", objectives=dict(cls=dict(weight=1.0, distill=True)),
      eval_kind="classification", resolution=384, max_len=40, lr=2e-5, epochs=10, batch=128,
      num_train_examples=86_373, heads=("itc",))  # the TA stage pairs images by their ITC features
  size = config.input.image_size
  ta_objectives = dict(nlvr_ta=dict(weight=1.0))
  if not args.size:
    from input_pipeline import inputs
    caption_input = inputs.pretrain_input(image_size=size, max_len=30)
    ta_input = dict(format="caption", annotations="", image_root="", num_train_examples=5_100_000,
                    pp=(f"decode_random_resized_crop({size}, scale=(0.5, 1.0))|flip|randaug(2, 7)"
                        f"|normalize('clip')|choose_caption|clean_caption(30)|tokenize({caption_input.max_len})"))
    finetune_steps = config.num_epochs * (config.input.num_train_examples // config.batch_size)
    config.stages = [dict(name="ta", steps=TA_STEPS_4M, objectives=ta_objectives, input=ta_input),
                     dict(name="finetune", steps=finetune_steps)]
    config.eval.every_steps = config.input.num_train_examples // config.batch_size
    return ml_collections.ConfigDict(config)
  demo = args.size == "demo"
  ta_steps = 100 if demo else 2
  ta_input = dict(format="caption",
                  pp=(f"decode|random_resized_crop({size}, scale=(0.85, 1.0))|normalize('clip')"
                      f"|choose_caption|clean_caption(30)|tokenize({config.input.max_len})"))
  config.stages = [dict(name="ta", steps=ta_steps, objectives=ta_objectives, input=ta_input),
                   dict(name="finetune", steps=config.total_steps)]
  config.total_steps += ta_steps
  config.eval.every_steps = config.total_steps
  return config
