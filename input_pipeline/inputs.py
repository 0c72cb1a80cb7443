"""Input config blocks (`config.input`) for the configs. No TensorFlow import here: configs load
these before any compute.

Op strings and knobs. A config writes its preprocessing as op strings, big_vision style:

  pp                 per example, on the host:
                     "decode_random_resized_crop({image_size}, scale=(0.2, 1.0))|flip
                      |randaug(2, 7)|normalize('clip')|choose_caption|clean_caption(30)"
  batch_pp           per batch, on the host, after batching: "tokenize({max_len})
                      |mask_tokens({mlm_prob})"
  device_augment_pp  with device_augment, per example on the host instead of `pp`:
                     "decode_crop_canvas({image_size}, scale=(0.2, 1.0))|choose_caption|..."
  device_pp          with device_augment, on the accelerator after transfer:
                     "resize_canvas({image_size}, canvas={canvas})|flip|randaug(2, 7)|..."

The rules:
1. A `{name}` (or `{name!r}`, for the repr of a string) in an op string is a knob: it is
   replaced, when the pipeline is built, by `config.input.name`, so `--config.input.max_len=40`
   makes `tokenize({max_len})` read `tokenize(40)`, and `--config.input.image_size=384` resizes
   everywhere. Knobs are the scalar fields of `config_fields.FIELDS` (image_size, max_len,
   mlm_prob, patch_mask_ratio, patch_size, patch_mask_strategy, patch_mask_min_block,
   caption_max_words, max_answers, ...) and the derived `{patch_grid}` (image_size //
   patch_size), `{canvas}` (the crop canvas side) and `{eval_len}` (eval_max_len or max_len).
   An unknown `{name}` is an error naming the field.
2. Nothing else is changed: a string without placeholders, e.g. one given on the command line
   (`--config.input.pp='decode|resize(64)|...|tokenize(16)'`), is used verbatim. The builder
   appends no op; a knob only changes what a string names it in (mlm_prob > 0 adds no
   mask_tokens), so write the op into the string.
3. `pp` = '' takes the format's default ops (`input_pipeline.formats`; for captions ALBEF's
   pretraining ops), and with it the format's default for each of batch_pp, device_augment_pp
   and device_pp left ''. A config that writes `pp` owns all its ops: '' there means none.
4. `--config.input.device_augment=True` switches to the device pair (device_augment_pp,
   device_pp); batch_pp runs either way. A config meant to offer it writes both strings.
5. The tokenizer (`config.input.tokenizer`) is filled into every tokenizer op that names none.
"""
import ml_collections

# Size of the SentencePiece vocabulary shipped in input_pipeline/assets/demo_sp.model.
DEMO_VOCAB_SIZE = 128

# The demo scenes' captions state left/right relations and object sizes, so their images get
# no flip and only mild crops: ALBEF's pretraining augmentation would make many captions false.
DEMO_IMAGE_PP = "decode|random_resized_crop({image_size}, scale=(0.85, 1.0))|normalize('clip')"


def pretrain_input(image_size: int = 256, max_len: int = 25) -> ml_collections.ConfigDict:
  """Real data by path: ALBEF JSON + image root, TFRecord glob, or a TFDS name.

  The op strings are '' (the format's defaults: ALBEF's pretraining ops); method configs
  write their own.
  """
  return ml_collections.ConfigDict(dict(
      source="json", annotations="", eval_annotations="", image_root="", tfrecord_pattern="",
      eval_tfrecord_pattern="", tfds_name="", data_dir="",
      split="train", num_train_examples=5_100_000, image_size=image_size, max_len=max_len,
      tokenizer=dict(kind="wordpiece", path=""), mlm_prob=0.15, patch_mask_ratio=0.0, patch_size=16,
      patch_mask_strategy="random", pp="", batch_pp="", shuffle_buffer=10_000, synthetic=False,
      device_augment=False, device_augment_pp="", device_pp=""))


def demo_input(image_size: int, max_len: int, config: str = "default") -> ml_collections.ConfigDict:
  """The embedded demo data (`config`: default | tiny) with the SentencePiece demo tokenizer.

  `pp` = the demo image ops, one cleaned caption, tokenized per example; no masking (methods
  add theirs).
  """
  cfg = pretrain_input(image_size, max_len)
  cfg.source = "demo"
  cfg.demo_config = config
  cfg.num_train_examples = 256 if config == "tiny" else 10_000
  cfg.tokenizer = dict(kind="sentencepiece", path="")
  cfg.pp = DEMO_IMAGE_PP + "|choose_caption|clean_caption({caption_max_words})|tokenize({max_len})"
  return cfg
