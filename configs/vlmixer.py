"""VLMixer (Wang et al., ICML 2022): vision-language pretraining from UNPAIRED data, by cross-modal
CutMix (CMC). No reference code was ever released; this follows docs/method_spec.md §4.2 and A.4, with
every open choice a field below (docs/methods/vlmixer.md lists them).

Two input streams per step (`config.input.streams`; one batch of each, their ratio = the ratio of
their `batch_size`s, 1:1 by default):
  text   text-only sentences (`format='text_only'`: no image read); their visually grounded words
         (offline `grounded_words annotate`, `grounding`) become token spans, and per step each
         occurrence is replaced with probability `p_cmc` by the P = `entry_tokens` visual tokens of
         a gallery entry of its concept (type 1, the replaced word's position; `ops_mix.cmc`);
  image  image-only data with object labels and boxes (`format='image_only'`: no caption read);
         its objects are the patch gallery (P cells of the box, each the mean of the ViT patches
         whose centres fall in it, + a box-position embedding) and its labels the tags.
Objectives: `cmcl` (symmetric InfoNCE between each sentence and its CMC view over the global
batch, learnable temperature; sentences without a replaced word are left out), `mixed_mlm`
(MLM on the remaining words of the mixed sentence; optional concept recovery at the visual
tokens, `concept_weight`), `tag_mlm` and `tag_match` (tag-aided visual pretraining on
[CLS] tags [SEP] + the image), `gallery` (loss 0: owns the bank of stored entries).
One encoder (`config.model.kind='vlmixer'`, the BERT text layers + the merged single-stream
layers) reads every sequence. Zero-shot retrieval scores a pair by the cosine of the `cmcl`
projections of the sentence's and the image sentence's ([CLS] patch tokens [SEP]) CLS states.

Full recipe (BERT-base-initialised encoder, ViT-B/16 at 256 px, 512 sentences + 512 images per
step), with a text corpus and an image corpus with boxes by path:

  python -m input_pipeline.grounded_words vocab --coco_instances=instances_train2014.json \
    --vg_objects=objects.json --output=/data/concepts.json
  python -m input_pipeline.grounded_words annotate --input=/data/cc3m.json \
    --vocab=/data/concepts.json --output=/data/cc3m_grounded.json
  python -m vlpjax.main --config=configs/vlmixer.py --workdir=/tmp/vlmixer \
    --config.model.num_concepts=<concepts in concepts.json> \
    --config.input.tokenizer.path=/data/bert-base-uncased/vocab.txt \
    --config.input.streams.text.annotations=/data/cc3m_grounded.json \
    --config.input.streams.image.annotations=/data/coco_objects.json \
    --config.input.streams.image.image_root=/data/images \
    --config.input.streams.image.concept_vocab=/data/concepts.json \
    --config.init_from.path=/data/bert_base_vlmixer   # python -m vlpjax.convert --source=hf_bert ...

Demo on the embedded data (CPU; captions from one half of the training scenes, images from the
other half: no image ever meets its own caption), then zero-shot retrieval on the held-out paired
test split:

  python -m vlpjax.main --config=configs/vlmixer.py:demo --workdir=/tmp/vlmixer_demo
  python -m vlpjax.main --config=configs/vlmixer.py:demo,p_cmc=0 --workdir=/tmp/vlmixer_demo_nocmc

Measured at 400 steps (2026-12-04, 2 CPU cores; docs/methods/vlmixer.md has the table): test r_mean
23.4 with CMC, 10.1 with p_cmc=0 (chance 0.5; with --config.seed=1: 8.3 and 2.3); the paired
`configs/albef.py:demo` reaches 12.9 at the same steps.

`:tiny` is a seconds-long run used by the tests. Config arguments: p_cmc=<float>, steps=, batch=.
"""
from configs import common
from input_pipeline import inputs

# The demo concept vocabulary: 6 shapes + 6 x 8 colour-shape pairs (`grounding.demo_annotations`).
DEMO_NUM_CONCEPTS = 54
# The demo SentencePiece model's [CLS] / [SEP] ids; BERT's are 101 / 102.
DEMO_CLS_ID, DEMO_SEP_ID = 2, 3


def vlmixer_objectives(concept_weight: float = 0.0, queue_size: int = 0, with_gallery: bool = True) -> dict:
  objectives = dict(cmcl=dict(weight=1.0, queue_size=queue_size),
                    mixed_mlm=dict(weight=1.0, concept_weight=concept_weight),
                    tag_mlm=dict(weight=1.0),
                    tag_match=dict(weight=1.0),
                    tag_contrast=dict(weight=1.0))
  if with_gallery:
    objectives["gallery"] = dict(weight=1.0, slots=8, refresh_every=1)
  return objectives


def image_warmup_stages(config, warmup: int) -> tuple:
  """[D] The first `warmup` steps train the image-only objectives alone (and fill the gallery bank),
  then every objective trains. Measured on the demo: the image sentences of a freshly initialised
  model are nearly identical (projected CLS cosine 0.99997 between images), so the image-side
  gradients start tiny; trained alone, tag_contrast leaves that saddle after ~75 steps, but beside
  the text-side objectives (whose contrast a lexical shortcut makes easy) it stayed at chance for
  all 400 steps. () when `warmup` is 0."""
  if warmup <= 0:
    return ()
  image_side = {k: dict(v) for k, v in config.objectives.items() if k.startswith("tag_") or k == "gallery"}
  return (dict(name="image_warmup", steps=warmup, objectives=image_side),
          dict(name="vlmixer", steps=config.total_steps - warmup))


def streams(text_batch: int = 0, image_batch: int = 0, *, p_cmc: float, max_spans: int, entry_tokens: int,
            max_objects: int, max_tags: int, text_split: str = "train", image_split: str = "train") -> dict:
  """The two input streams ('' op strings: the formats' VLMixer ops, `input_pipeline.unpaired`).

  A batch size 0 is `config.batch_size`: each step reads `text_batch` sentences and `image_batch`
  images, so their ratio is the streams' mixing ratio (1:1 by default).
  """
  return dict(
      text=dict(format="text_only", split=text_split, pp="", batch_pp="", batch_size=text_batch, p_cmc=p_cmc,
                max_spans=max_spans, entry_tokens=entry_tokens),
      image=dict(format="image_only", split=image_split, pp="", batch_pp="", batch_size=image_batch,
                 max_objects=max_objects, max_tags=max_tags))


def get_config(arg: str = ""):
  config, args = common.base_config(arg, p_cmc=0.5, warmup=-1)
  config.teacher.momentum = 0.0  # no EMA teacher (cmcl's MoCo variant needs one: queue_size > 0)
  entry_grid = (2, 2)
  config.model.kind = "vlmixer"
  config.model.fusion = "merged"
  config.model.heads = ("cmcl", "mlm", "itm")
  config.model.entry_grid = entry_grid
  config.model.box_embedding = True
  config.model.image_pool = (0, 0)
  # Entries from the image batch, else from the bank of earlier batches (the `gallery` objective
  # keeps it); without CMC (p_cmc=0, the ablation) nothing is drawn and there is no bank.
  config.model.gallery_source = "batch_then_bank" if args.p_cmc > 0 else "batch"
  config.model.num_concepts = 1600  # set to the size of your concepts.json
  config.model.cls_id, config.model.sep_id = 101, 102
  # The learnable contrast temperature (`cmcl` head, shared by tag_contrast) stays >= 0.05: a
  # sentence and its CMC view share their other words, so the text-side contrast is easy, and with
  # ALBEF's floor (0.001) the temperature fell to 0.005 within 150 demo steps; its gradient then
  # dominated the clipped global norm (grad_norm 7-37 against a clip of 1) and starved the image
  # objectives (tag_match stayed at chance).
  config.model.temp_min = 0.05
  config.objectives = vlmixer_objectives(with_gallery=args.p_cmc > 0)
  p = entry_grid[0] * entry_grid[1]
  if not args.size:
    # Full recipe: the eval block reads config.input (a paired caption set, e.g. COCO test);
    # training reads only the two streams.
    config.input.eval_annotations = ""
    config.input.streams = streams(p_cmc=args.p_cmc, max_spans=8,
                                   entry_tokens=p, max_objects=16, max_tags=25)
    config.input.streams.text.update(source="json", annotations="", grounding="")
    config.input.streams.image.update(source="json", annotations="", image_root="", concept_vocab="",
                                      object_label_field="objects/label")
    return config
  config.model.num_concepts = DEMO_NUM_CONCEPTS
  config.model.cls_id, config.model.sep_id = DEMO_CLS_ID, DEMO_SEP_ID
  # Captions of the first half of the demo's training scenes, images of the other half.
  config.input.streams = streams(p_cmc=args.p_cmc, max_spans=4,
                                 entry_tokens=p, max_objects=4, max_tags=16,
                                 text_split="train[:50%]", image_split="train[50%:]")
  # The demo's colour words matter for retrieval: objects are named by colour + shape ("red circle").
  config.input.streams.image.object_label_field = "concepts"
  config.input.num_train_examples = 5000 if args.size == "demo" else 128
  warmup = args.warmup if args.warmup >= 0 else (0 if args.size == "tiny" else config.total_steps // 4)
  config.stages = image_warmup_stages(config, warmup)
  if args.size == "tiny":
    config.eval.every_steps = 0
  else:
    # A validation split for choices (the test split is only reported): paired scenes of the
    # training split whose images no run sees (their captions are in the text stream).
    config.evals = dict(val=dict(kind="retrieval", every_steps=200, split="train[:10%]", batch_size=250, k_test=0))
    config.eval.every_steps = config.total_steps
  return config


def downstream(task: str, config) -> str | None:
  """`vlpjax.compare`: VLMixer's model (one single-stream encoder, no ITM head) is scored zero-shot
  by ITC similarity alone; vlpjax has no VLMixer task heads yet, so the finetunes do not apply."""
  if task == "zeroshot":
    with config.unlocked():
      config.eval.k_test = 0
    return None
  return (f"no VLMixer {task} finetune in vlpjax yet (the 'vlmixer' model kind has no task heads; "
          "its paper finetunes on paired data, which an unpaired method is compared without)")

