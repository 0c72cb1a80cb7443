"""SNLI-VE visual entailment finetuning (ALBEF, docs/method_spec.md §1.4): a 3-way MLP head
(Dense 768 -> ReLU -> Dense 3) on the fusion [CLS], cross-entropy with momentum distillation
(alpha 0.4, no alpha warm-up), accuracy on val / test. ALBEF 4M: 80.80 val / 80.91 test.

Recipe: ViT-B/16 at 384 px, batch 32/GPU x 8 = 256, AdamW lr 2e-5 wd 0.02, 5 epochs, warm-up
1e-5 -> 2e-5 over 100 iterations, then cosine to 1e-6. Data: ALBEF's `ve_train.json` /
`ve_test.json` (`image` Flickr id, `sentence`, `label` entailment | neutral | contradiction).

  python -m vlpjax.main --config=configs/finetune_snli_ve.py --workdir=/tmp/ve \
    --config.init_from.path=/ckpt/albef_4m \
    --config.input.annotations=/data/ve_train.json --config.input.eval_annotations=/data/ve_test.json \
    --config.input.image_root=/data/flickr30k-images --config.input.tokenizer.path=/data/vocab.txt
  python -m vlpjax.evaluate --config=configs/finetune_snli_ve.py --config.init_from.path=/tmp/ve/export/pretrain ...

Demo (a few CPU minutes; chance = 33.3%): finetune the configs/albef.py:demo export on the
generated demo entailment set:

  python -m vlpjax.main --config=configs/finetune_snli_ve.py:demo --workdir=/tmp/ve_demo \
    --config.init_from.path=/tmp/vlpjax_albef_demo/export/pretrain
"""
import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config, _ = common.finetune_config(
      arg, fmt="snli_ve", kind="ve", objectives=dict(cls=dict(weight=1.0, distill=True)),
      eval_kind="classification", resolution=384, max_len=40, lr=2e-5, epochs=5, batch=256,
      num_train_examples=529_527)
  config.teacher.alpha_ramp_steps = 0  # ALBEF's VE uses alpha 0.4 from the first step
  return config
