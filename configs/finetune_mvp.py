"""Fine-tuning from an MVP checkpoint (docs/method_spec.md §5.4): retrieval, VQA (classifier), SNLI-VE.

`arg` = `<task>[,benchmark][,size][,key=value...]`, task one of `retrieval` | `vqa` | `snli_ve`;
the rest as the task's own config (`configs/finetune_retrieval.py`, `finetune_vqa.py`,
`finetune_snli_ve.py`): `retrieval,flickr`, `retrieval,coco`, `vqa`, `snli_ve`, and `demo` /
`tiny` of each. The data, image resolution, schedule and evaluation are the task config's; the
model is MVP's (`configs/mvp.py` of the same size) with the task's head:

  retrieval  kind `mvp`: VSC (image-id positives) + ITM with the hardest in-batch negatives
             mined from the VSC similarities (MVPTR's retrieval fine-tuning); evaluation = the
             VSC similarities of all pairs (the model's project_image / project_text), then the
             ITM "match" logit on the top-k of each image and caption (MVPTR reranks 128 / 64).
             Captions are `[CLS] words phrases [SEP]`, phrases looked up in the annotated
             training / eval files (`input.annotations`, `input.eval_annotations`: the output of
             `python -m input_pipeline.phrases annotate`), and the training images get their tags.
  vqa        kind `mvp_vqa`, `vqa_mode='classify'` (MVPTR / VinVL: an MLP over the answer list on
             the cross-modal [CLS], BCE on the VQA soft scores).
  snli_ve    kind `mvp_ve`: the 3-way MLP on the cross-modal [CLS].
No EMA teacher (MVPTR fine-tunes without distillation). Start from a pre-trained MVP export, a
train checkpoint or a `python -m vlpjax.convert --source=mvp` directory:

  python -m vlpjax.main --config=configs/finetune_mvp.py:retrieval,flickr --workdir=/tmp/mvp_flickr \
    --config.init_from.path=/tmp/mvp/export/pretrain \
    --config.input.annotations=/data/flickr30k_train_mvp.json \
    --config.input.eval_annotations=/data/flickr30k_test_mvp.json \
    --config.input.image_root=/data/flickr30k --config.input.tokenizer.path=/data/vocab.txt
  python -m vlpjax.main --config=configs/finetune_mvp.py:vqa,demo --workdir=/tmp/mvp_vqa_demo \
    --config.init_from.path=/tmp/mvp_demo/export/pretrain

Tags are used where the data gives them (retrieval training); VQA / SNLI-VE inputs and the
retrieval evaluator's images carry none, and the model then encodes the patches alone.
"""
import ml_collections

from configs import common
from configs import finetune_retrieval
from configs import finetune_snli_ve
from configs import finetune_vqa
from configs import mvp
from input_pipeline import demo_tasks, inputs

TASKS = ("retrieval", "vqa", "snli_ve")
KINDS = {"retrieval": "mvp", "vqa": "mvp_vqa", "snli_ve": "mvp_ve"}


def _size(rest: str) -> str:
  parts = [p for p in rest.split(",") if p.strip() and p.strip() not in finetune_retrieval.BENCHMARKS]
  return common.parse_arg(",".join(parts), steps=0, batch=0, res=0).size


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  task, _, rest = (arg or "").partition(",")
  if task not in TASKS:
    raise ValueError(f"configs/finetune_mvp.py needs a task first: one of {TASKS} (e.g. "
                     f"--config=configs/finetune_mvp.py:retrieval,flickr), got {arg!r}")
  config = {"retrieval": finetune_retrieval.get_config, "vqa": finetune_vqa.get_config,
            "snli_ve": finetune_snli_ve.get_config}[task](rest)
  size = _size(rest)
  pretrain = mvp.get_config(size)
  model = ml_collections.ConfigDict(pretrain.model.to_dict())
  model.kind = KINDS[task]
  model.vision.image_size = config.model.vision.image_size
  model.dtype = config.model.dtype
  config.model = model
  config.teacher = dict(momentum=0.0, alpha=0.0, alpha_ramp_steps=0)
  if task == "vqa":
    config.model.heads = ()
    config.model.vqa_mode = "classify"
    config.model.answer_layers = 0
    # VQA v2's 3,129 answers; the demo's generated answers (demo_tasks.vqa_answers) at demo sizes.
    config.model.num_answers = len(demo_tasks.vqa_answers()) if size else 3129
    config.objectives = dict(vqa_cls=dict(weight=1.0))
    # The classifier's targets over the evaluator's answer list (`config.input.answer_list`, or the
    # demo's), after the format's ops.
    config.input.extra_pp = ("answer_scores(answer_list={answer_list!r}, source={source!r}, "
                             "demo_config={demo_config!r}, data_dir={data_dir!r})")
  elif task == "snli_ve":
    config.model.heads = ()
    config.model.num_classes = 3
    config.objectives = dict(cls=dict(weight=1.0, distill=False))
  else:
    config.model.heads = ("vsc", "itm")
    config.objectives = dict(
        vsc=dict(weight=1.0, id_positives=True),
        itm=dict(weight=1.0, negatives="hardest", sims="vsc_sims", scope="local", text_encoding="corrupted_text",
                 image_encoding="corrupted_image"))
    word_vocab = int(config.model.text.vocab_size)
    phrases = int(config.model.phrase_vocab_size)
    if size:
      concepts = mvp.demo_concepts(size)
      image_ops = inputs.DEMO_IMAGE_PP
    else:
      concepts = "path={annotations!r}, eval_path={eval_annotations!r}"
      image_ops = "decode_random_resized_crop({image_size}, scale=(0.5, 1.0))|randaug(2, 7)|normalize('clip')"
    config.input.pp = (image_ops + "|choose_caption|"
                       + mvp.caption_ops(concepts=concepts, word_vocab=word_vocab, phrases=phrases,
                                         tag_len=12 if size == "tiny" else mvp.MAX_TAGS, masked=False))
    config.input.batch_pp = ""
    config.input.eval_text_pp = mvp.eval_text_ops(concepts, word_vocab, phrases)
  return config
