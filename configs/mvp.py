"""MVP / MVPTR (Li, Fan, Tou, Chen, Wei, Huang, ACM MM 2022): multi-level semantic alignment on
ViT patches (docs/method_spec.md §5; docs/methods/mvp.md).

Two levels per modality: text = `[CLS] words phrases [SEP]` (up to 5 phrase concepts parsed
offline with spaCy, ids after the word vocabulary), vision = ViT patches + object tags `[CLS] tags
[SEP]` appended as ViT tokens. Uni-modal encoders (BERT text layers; the ViT) then a merged
cross-modal encoder over [text ; patches]. Losses, all from one forward pass of the corrupted
inputs, summed with weight 1 (MVPTR trains them jointly): vsc (CLIP-style InfoNCE of the global
embeddings, learnable logit scale), mcr (masked tags from the visual encoder), itm with the
hardest in-batch negatives mined from the VSC similarities, mlm (words, from the cross-modal
encoder) and wpg (weakly-supervised phrase grounding to patches). No EMA teacher, no queue.

Released recipe (code defaults): AdamW lr 5e-5, eps 1e-8, wd 0.01 (not on biases / LayerNorm),
gradient clipping 10, batch 1024, no warm-up, 2M iterations; ViT-B/16 at 256 px, BERT-base 6
text + 6 cross-modal layers, the MVPTR phrase vocabulary (73,599 rows after 30,522 words).
Annotate the captions first (phrases + tags; docs/methods/mvp.md), then:

  python -m input_pipeline.phrases annotate --input=/data/coco.json --output=/data/coco_mvp.json \
    --vocab=/data/id2phrase_new.json --coco_instances=/data/instances_train2014.json
  python -m vlpjax.main --config=configs/mvp.py --workdir=/tmp/mvp \
    --config.input.annotations=/data/coco_mvp.json --config.input.image_root=/data/images \
    --config.input.tokenizer.path=/data/vocab.txt

Demo on the embedded data (CPU, minutes; the demo captions are parsed with spaCy once and
cached beside the demo data):

  python -m vlpjax.main --config=configs/mvp.py:demo --workdir=/tmp/mvp_demo
  python -m vlpjax.evaluators.phrase_grounding --config=configs/mvp.py:demo \
    --checkpoint=/tmp/mvp_demo/export/pretrain

Measured demo numbers (400 steps, batch 64, 2 CPU cores, about 10 minutes; seeds 0 / 1;
docs/methods/mvp.md has the ablation): zero-shot retrieval on the 1,000 held-out images r_mean
26.3 / 23.7 with the images' tags, 24.1 / 21.6 from the patches alone (chance ~0.5); object
phrases grounded inside their object's box 59.3% / 55.9% (random patch 7.8%), and, among the
grounding choices that land on some object, the described one 64.9% / 64.3% of the time against
53.1% for a random object patch. Two demo choices differ from MVPTR ([D]): half of the training
images' tags are dropped (`config.input.tag_drop=0.5`; with every image tagged the visual CLS
reads the tags and the patches hardly learn: 1.6 from the patches), and WPG's negatives are
scored on a pass over the negative pair (`config.objectives.wpg.negatives='fused'`; with
MVPTR's reused pass the chosen patch lands on the described object no more often than on any
other object). Not shown on this data: that the tags beat no tags (`tags=0`: 27.2 mean of 3
seeds, against 20.8 with tags and mcr, 27.3 with tags and `mcr=0`).

Arguments (`configs/common.py`): `tiny`, `demo`, `steps=N`, `batch=N`, `res=N`, and
`phrases=N` (phrase rows of the table: the size of your phrase vocabulary), `curriculum=N` (the
`stages` option: vsc + mcr only for the first N steps, then every loss). The ablations of the
second visual level: `mcr=0` keeps the tags (unmasked) but drops mcr and its head; `tags=0` drops
the tags, their ops and mcr (the image is its patches alone).
"""
import ml_collections

from configs import common
from input_pipeline import inputs

MVPTR_PHRASES = 73_599  # datasets/mvp/id2phrase_new.json of the released code
WORD_VOCAB = 30_522
MAX_PHRASES = 5
MAX_TAGS = 20  # tokens of `[CLS] tags [SEP]`
# The demo phrase vocabulary keeps phrases seen in this many training captions (the tiny set has
# 1,280 captions, the default 50,000).
DEMO_MIN_SENTENCES = {"tiny": 5, "default": 50}


def caption_ops(*, concepts: str, word_vocab: int, phrases: int, tag_len: int, masked: bool, tags: bool = True,
                tag_mask: bool = True) -> str:
  """The caption and tag ops after `choose_caption`, for training (masked) or fine-tuning; without
  `tags` no tag ops (the model has no tag tokens), without `tag_mask` the tags stay unmasked."""
  ops = [f"mvp_concepts({concepts}, word_vocab={word_vocab}, phrase_vocab={phrases}, max_phrases={MAX_PHRASES})",
         "clean_caption({caption_max_words})", "tokenize({max_len})"]
  if masked:
    ops.append("mask_tokens({mlm_prob})")
  ops.append(f"mvp_text({MAX_PHRASES}, word_vocab={word_vocab}, phrase_vocab={phrases}, prob={{mlm_prob}})")
  if not tags:
    return "|".join(ops)
  if masked:
    ops.append("drop_tags({tag_drop})")
  ops.append(f"tokenize({tag_len}, key='tags', out='concept', append_sep=True)")
  if masked and tag_mask:
    ops.append("mask_tokens({mlm_prob}, key='concept')")
  return "|".join(ops)


def eval_text_ops(concepts: str, word_vocab: int, phrases: int) -> str:
  """Eval captions: `[CLS] words phrases [SEP]` (phrases looked up by the caption's text)."""
  return (f"mvp_concepts({concepts}, word_vocab={word_vocab}, phrase_vocab={phrases}, max_phrases={MAX_PHRASES})"
          "|clean_caption({caption_max_words})|tokenize({eval_len})"
          f"|mvp_text({MAX_PHRASES}, word_vocab={word_vocab}, phrase_vocab={phrases})")


def mvp_objectives() -> dict:
  """MVPTR's five losses, weight 1, all reading the one pass over the corrupted inputs."""
  return dict(
      vsc=dict(weight=1.0, id_positives=False),
      mcr=dict(weight=1.0, phrase_loss=False),
      itm=dict(weight=1.0, negatives="hardest", sims="vsc_sims", scope="local", text_encoding="corrupted_text",
               image_encoding="corrupted_image", positives="corrupted_fusion"),
      mlm=dict(weight=1.0, distill=False, fusion="corrupted_fusion"),
      wpg=dict(weight=1.0, margin=0.2, top_k=3, negatives="pass"))  # "fused": [D], docs/methods/mvp.md


def demo_concepts(size: str) -> str:
  """The `mvp_concepts` source of the demo data: spaCy annotation of the demo set, cached."""
  demo = "tiny" if size == "tiny" else "default"
  return f"demo='{demo}', data_dir={{data_dir!r}}, min_sentences={DEMO_MIN_SENTENCES[demo]}"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config, args = common.base_config(arg, phrases=0, curriculum=0, tags=1, mcr=1)
  args.mcr = int(args.mcr and args.tags)  # mcr recovers masked tags: no tags, no mcr
  size = args.size
  word_vocab = int(config.model.text.vocab_size)
  phrases = args.phrases or {"tiny": 256, "demo": 512}.get(size, MVPTR_PHRASES)
  tag_len = 12 if size == "tiny" else MAX_TAGS

  config.model.kind = "mvp"
  config.model.fusion = "merged"
  config.model.heads = ("vsc", "itm", "mlm", "mcr") if args.mcr else ("vsc", "itm", "mlm")
  config.model.embed_dim = int(config.model.text.width)  # MVPTR: txt_proj / vis_proj are D x D
  config.model.phrase_vocab_size = phrases
  config.model.fusion_tags = False
  # The released recipe embeds the tags as MVPTR does (the shared text embeddings); the demo
  # sizes, trained from scratch, use the shared word rows under the tags' own LayerNorm, without
  # which VSC does not learn (vlpjax/models/mvp.py TagTokens).
  config.model.image_tokens = (dict(kind="mvp_tags", token_type=1, embed="words" if size else "shared")
                               if args.tags else {})
  config.teacher = dict(momentum=0.0, alpha=0.0, alpha_ramp_steps=0)  # no EMA teacher: no ema_params
  config.objectives = mvp_objectives()
  if not args.mcr:
    del config.objectives["mcr"]
  config.input.mlm_prob = 0.15
  # [D] The demo drops half of the images' tags (`drop_tags`): with every image tagged, the
  # visual CLS reads the tags and the patches hardly learn (docs/methods/mvp.md, Demo). MVPTR
  # (the released recipe, and tiny) keeps every image's tags.
  config.input.tag_drop = 0.5 if size == "demo" else 0.0
  # [D] The demo scores WPG's negatives on a pass over the negative pair (`wpg.negatives='fused'`):
  # with MVPTR's reused pass the hinge is met by pair-marking states and no phrase grounds to its
  # own object (docs/methods/mvp.md, Demo). The released recipe (and tiny) keeps MVPTR's.
  if size == "demo":
    config.objectives.wpg.negatives = "fused"

  if not size:
    config.batch_size = 1024
    config.total_steps = 2_000_000
    config.input.max_len = 30  # [CLS] + 29 word tokens; the text is 30 + 5 phrases + [SEP] = 36
    config.optim = dict(name="adamw", lr=5e-5, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=10.0,
                        schedule=dict(name="warmup_cosine", warmup_init=0.0, warmup_steps=0, min_lr=0.0),
                        freeze=(), lr_mult=())
    concepts = "path={annotations!r}, eval_path={eval_annotations!r}"
    # ALBEF's pretraining image ops without the flip: phrases name left / right relations.
    image_ops = "decode_random_resized_crop({image_size}, scale=(0.2, 1.0))|randaug(2, 7)|normalize('clip')"
  else:
    concepts = demo_concepts(size)
    image_ops = inputs.DEMO_IMAGE_PP
  config.input.pp = image_ops + "|choose_caption|" + caption_ops(
      concepts=concepts, word_vocab=word_vocab, phrases=phrases, tag_len=tag_len, masked=True,
      tags=bool(args.tags), tag_mask=bool(args.mcr))
  config.input.batch_pp = ""
  config.input.eval_text_pp = eval_text_ops(concepts, word_vocab, phrases)
  if args.curriculum:
    total = int(config.total_steps)
    if not 0 < args.curriculum < total:
      raise ValueError(f"configs/mvp.py: curriculum={args.curriculum} must be in (0, total steps {total})")
    config.stages = [
        dict(name="unimodal", steps=args.curriculum,
             objectives={k: config.objectives[k].to_dict() for k in ("vsc", "mcr") if k in config.objectives}),
        dict(name="joint", steps=total - args.curriculum)]
  return config


def task_config(task: str, arg: str) -> str | None:
  """`vlpjax.compare`: MVP's downstream cells run `configs/finetune_mvp.py` (retrieval with VSC and
  hardest-negative ITM, VQA as a classifier, SNLI-VE); zero-shot is its retrieval config evaluated
  without training. NLVR2 and grounding have no MVP config (`downstream` says why)."""
  if task in ("nlvr2", "grounding"):
    return None
  name = "retrieval" if task in ("zeroshot", "retrieval") else task
  return f"configs/finetune_mvp.py:{name}" + (f",{arg}" if arg else "")


def downstream(task: str, config) -> str | None:
  """`vlpjax.compare`: the tasks MVP has no configuration for, and why."""
  if task == "nlvr2":
    return "NLVR2's two-image model needs cross-attention fusion layers; MVP's cross-modal encoder is merged"
  if task == "grounding":
    return "no MVP grounding finetune (MVP's phrase grounding is python -m vlpjax.evaluators.phrase_grounding)"
  return None
