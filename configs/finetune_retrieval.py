"""Image-text retrieval fine-tuning and evaluation (ALBEF, docs/method_spec.md §1.4): ITC with image-id
aware positives (batch and idx queue) + ITM with hard negatives, no MLM; evaluation = ITC
similarities of all pairs, then the ITM "match" logit on the top-k of each image and of each
caption (-100 elsewhere), TR/IR@1/5/10 and r_mean.

`arg` picks the benchmark: `coco` (Karpathy 5k test, k_test 256, 5 epochs) or `flickr`
(Flickr30K 1k test, k_test 128, 10 epochs); `demo` (embedded demo data, CPU minutes) and `tiny`
(tests) shrink the model and data; `key=value` pairs as in configs/common.py (`flickr,batch=128`,
`demo,steps=100`).

Recipe (both benchmarks): ViT-B/16 at 384 px, batch 32/GPU x 8 = 256, AdamW lr 1e-5 wd 0.02,
epoch 0 flat then cosine to 1e-6 per epoch, alpha 0.4 ramped over the first epoch, queue 65536,
captions 30 tokens. Start from a pretrained checkpoint (required): a vlpjax export or train
checkpoint, or `python -m vlpjax.convert` output (then its EMA params and queues are loaded too).
ALBEF_4M reaches TR@1 94.3 / IR@1 82.8 on Flickr30K and 73.1 / 56.8 on COCO 5k.

  python -m vlpjax.main --config=configs/finetune_retrieval.py:flickr --workdir=/tmp/ft_flickr \
    --config.init_from.path=/ckpt/albef_4m \
    --config.input.annotations=/data/flickr30k_train.json \
    --config.input.eval_annotations=/data/flickr30k_test.json \
    --config.input.image_root=/data/flickr30k --config.input.tokenizer.path=/data/vocab.txt

Zero-shot (or fine-tuned) evaluation of any checkpoint, same data flags:

  python -m vlpjax.evaluate --config=configs/finetune_retrieval.py:flickr \
    --config.init_from.path=/ckpt/albef_4m [--workdir=/tmp/eval_flickr] ...

Demo: pretrain with configs/albef.py:demo, then fine-tune from its export (a few CPU minutes):

  python -m vlpjax.main --config=configs/albef.py:demo --workdir=/tmp/albef_demo
  python -m vlpjax.evaluate --config=configs/finetune_retrieval.py:demo \
    --config.init_from.path=/tmp/albef_demo/export/pretrain
  python -m vlpjax.main --config=configs/finetune_retrieval.py:demo --workdir=/tmp/ft_demo \
    --config.init_from.path=/tmp/albef_demo/export/pretrain

The first `evaluate` prints the zero-shot numbers of the checkpoint on the 1,000 held-out demo
images; the finetuning run evaluates itself at its end (README, "Finetune and evaluate").
"""
import ml_collections

from configs import common
from input_pipeline import inputs

BENCHMARKS = {
    # train captions (one JSON entry each), eval rerank depth, epochs
    "coco": dict(num_train_examples=566_747, k_test=256, epochs=5),
    "flickr": dict(num_train_examples=145_000, k_test=128, epochs=10),
}
RESOLUTION = 384
MAX_LEN = 30


def _split_benchmark(arg: str) -> tuple[str, str]:
  """'flickr,tiny' -> ('flickr', 'tiny'): the benchmark name, the rest for common.parse_arg."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  names = [p for p in parts if p in BENCHMARKS]
  if len(names) > 1:
    raise ValueError(f"configs/finetune_retrieval.py: pick one benchmark of {sorted(BENCHMARKS)}, got {names}")
  rest = ",".join(p for p in parts if p not in BENCHMARKS)
  if not names and not common.parse_arg(rest, steps=0, batch=0, res=0).size:
    raise ValueError("configs/finetune_retrieval.py needs an argument: coco | flickr | demo | tiny "
                     "(e.g. --config=configs/finetune_retrieval.py:flickr)")
  return (names[0] if names else ""), rest


def retrieval_objectives(queue_size: int = 0) -> dict:
  """ITC with positives = every pair of the same image (batch and idx queue) + ITM; no MLM."""
  return dict(itc=dict(weight=1.0, distill=True, id_positives=True, queue_size=queue_size),
              itm=dict(weight=1.0, scope="local"))


# ALBEF's retrieval fine-tune augmentation: crops of 50-100% at `image_size`, flip, RandAugment;
# `{name}` is the knob config.input.name (input_pipeline/inputs.py).
FINETUNE_PP = ("decode_random_resized_crop({image_size}, scale=(0.5, 1.0))|flip|randaug(2, 7)|normalize('clip')"
               "|choose_caption|clean_caption(30)|tokenize({max_len})")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  benchmark, rest = _split_benchmark(arg)
  config, args = common.base_config(rest)
  config.objectives = retrieval_objectives(config.objectives.itc.queue_size)
  config.model.heads = ("itc", "itm")
  config.input.mlm_prob = 0.0

  if not args.size:
    recipe = BENCHMARKS[benchmark]
    config.batch_size = 256
    config.num_epochs = recipe["epochs"]
    config.model.vision.image_size = args.res or RESOLUTION
    config.optim = common.albef_optim(lr=1e-5, epochs=recipe["epochs"])
    config.optim.schedule.warmup_lr = 1e-5  # ALBEF: warm-up starts at the base lr, so epoch 0 is flat
    config.optim.schedule.min_lr = 1e-6
    config.input.num_train_examples = recipe["num_train_examples"]
    config.input.image_size = args.res or RESOLUTION
    config.input.max_len = MAX_LEN
    config.input.pp = FINETUNE_PP
    config.input.batch_pp = ""
    if args.batch:
      config.batch_size = args.batch
    config.objectives.itc.queue_size -= config.objectives.itc.queue_size % config.batch_size
    # ALBEF evaluates after every epoch.
    config.eval = dict(every_steps=recipe["num_train_examples"] // config.batch_size, split="test",
                       batch_size=256, k_test=recipe["k_test"])
  else:
    # Fine-tunes the configs/albef.py:demo (or :tiny) model: same shapes, a lower learning rate.
    common.shrink_finetune(config, args)
    # The demo data's ops: mild crops, no flip (inputs.DEMO_IMAGE_PP), tokenized per example.
    config.input.pp = inputs.DEMO_IMAGE_PP + "|choose_caption|clean_caption(30)|tokenize({max_len})"
    demo = args.size == "demo"
    config.eval = dict(every_steps=config.total_steps, split="test", batch_size=256 if demo else 32,
                       k_test=16 if demo else 8)
  return config
