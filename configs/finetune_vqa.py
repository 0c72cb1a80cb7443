"""VQA v2 finetuning (ALBEF, docs/method_spec.md §1.4): the question is fused with the image by the
pretrained encoder; an answer decoder (6 BERT layers with causal self-attention and
cross-attention to the fused question, initialised from the pretrained fusion layers, text
embeddings and MLM head) is trained on the weighted answer likelihood (weight = fraction of
annotators; Visual Genome answers 0.5) with momentum distillation. Inference ranks the candidate
answer list: top `k_test` candidates by first-token probability, rescored by the full sequence
log-likelihood. Metric: the official VQA accuracy (EvalAI normalisation, leave-one-annotator-out
average). ALBEF 4M: 74.54 test-dev / 74.70 test-std (EvalAI server).

`vqa_mode=classify` (`--config.model.vqa_mode=classify --config.objectives='{"vqa_cls": {"weight": 1.0}}'`)
is the VinVL/MVP classifier head over `num_answers` answers instead.

Recipe: ViT-B/16 at 384 px, batch 32/GPU x 8 = 256, AdamW lr 2e-5 wd 0.02, 8 epochs, warm-up
1e-5 -> 2e-5 over the first 400 iterations, then cosine to 1e-6. Data: ALBEF's
`vqa_train.json`, `vqa_val.json`, `vg_qa.json` (`question_id`, `question`, `answer`, `image`,
`dataset`), `answer_list.json` (3,128 candidates), `vqa_test.json` for the submission file:

  python -m vlpjax.main --config=configs/finetune_vqa.py --workdir=/tmp/vqa \
    --config.init_from.path=/ckpt/albef_4m \
    --config.input.annotations=/data/vqa_train.json,/data/vqa_val.json,/data/vg_qa.json \
    --config.input.image_root=/data/coco --config.input.vg_image_root=/data/vg \
    --config.input.answer_list=/data/answer_list.json --config.input.tokenizer.path=/data/vocab.txt
  python -m vlpjax.evaluate --config=configs/finetune_vqa.py --config.init_from.path=/tmp/vqa/export/pretrain \
    --config.input.eval_annotations=/data/vqa_test.json --config.eval.predictions=/tmp/vqa/result.json ...

(EvalAI needs every test question in the file, also for test-dev.) Demo (CPU minutes): questions
about the demo scenes ("what color is the circle?", "how many shapes are there?"):

  python -m vlpjax.main --config=configs/finetune_vqa.py:demo --workdir=/tmp/vqa_demo \
    --config.init_from.path=/tmp/vlpjax_albef_demo/export/pretrain
"""
import ml_collections

from configs import common

# VQA v2 train + val (443,757 + 214,354 questions) + ALBEF's VG-QA file [U: ~1.44M]; set
# --config.input.num_train_examples to the total of your files (it sets the epoch length).
NUM_TRAIN_QUESTIONS = 2_098_000


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config, args = common.finetune_config(
      arg, fmt="vqa", kind="vqa", objectives=dict(vqa=dict(weight=1.0, distill=True)), eval_kind="vqa",
      resolution=384, max_len=35, lr=2e-5, epochs=8, batch=256, num_train_examples=NUM_TRAIN_QUESTIONS,
      warmup_steps=400)
  config.model.vqa_mode = "generate"
  config.model.answer_layers = 0  # = the fusion depth
  config.model.num_answers = 3129
  config.eval.k_test = 128
  config.eval.predictions = ""
  config.eval.rank_fix = False
  if not args.size:
    config.input.max_answers = 10
    config.input.answer_max_len = 10
    # The rescoring pass holds [batch, k_test, answer tokens, vocab] float32 logits.
    config.eval.batch_size = 32
  else:
    config.input.max_answers = 4
    config.input.answer_max_len = 6
  return config
