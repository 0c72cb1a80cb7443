"""Batch builder (determinism, resume, process split, skip counting, eval data) and device feed."""
import io
import json
import os

from absl import flags
import jax
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import albef
from configs import mamo
from input_pipeline import builder
from input_pipeline import caption
from input_pipeline import device
from input_pipeline import formats
from input_pipeline import inputs
from input_pipeline import ops_image
from input_pipeline import ops_text
from input_pipeline import pipeline
from input_pipeline import registry
from input_pipeline import sources

LIGHT_PP = ("decode_random_resized_crop(16)|flip|value_range(0, 1)|choose_caption"
            "|clean_caption(30)|tokenize(8)|mask_tokens({mlm_prob})"
            "|mask_patches({patch_mask_ratio}, grid=({patch_grid}, {patch_grid}))")
# ALBEF's pretraining image ops at 16 px (the caption format's default).
ALBEF_IMAGE_16 = ("decode_random_resized_crop(16, scale=(0.2, 1.0))|flip|randaug(2, 7)"
                  "|normalize('clip')")
MASK_PATCHES_4 = "mask_patches(0.5, grid=(4, 4), strategy='random', min_block=16)"
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _text_only_source(cfg, *, split, process_index=0, process_count=1) -> sources.Source:
  """12 sentences and nothing else: the shape of VLMixer's text-only stream."""
  del cfg, split
  texts = tf.constant([f"sentence number {i} of the corpus" for i in range(12)])
  records = tf.data.Dataset.range(12).shard(process_count, process_index)
  return sources.Source("test_text_only", records, lambda i: {"captions": texts[i][None]},
                        num_examples=len(range(process_index, 12, process_count)),
                        full_shuffle=True)


formats.register(formats.Format(
    name="test_text_only", source_kinds=("demo",), make_source=_text_only_source,
    train_ops=lambda cfg: formats.TrainOps("choose_caption|clean_caption(30)",
                                           "tokenize({max_len})|mask_tokens({mlm_prob})"),
    eval_pp=lambda cfg: "", passed_fields=()))


@registry.register("test_reverse_rows")
def _get_test_reverse_rows():
  """A batch op for the tests: reverses the batch order when the batch seed says so."""

  def fn(batch):
    flip = tf.random.stateless_uniform([], batch["_seed"]) < 0.5
    return {k: tf.where(flip, tf.reverse(v, [0]), v) if not k.startswith("_") else v
            for k, v in batch.items()}

  return fn


def _image_bytes(seed: int, fmt: str = "PNG", size=(16, 16), mode: str = "RGB") -> bytes:
  array = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buffer, fmt)
  return buffer.getvalue()


NUM_GOOD = 20


@pytest.fixture(scope="module")
def json_data(tmp_path_factory):
  """20 usable entries (ids 0..19) and 6 bad ones of every kind (ids 100..105)."""
  root = str(tmp_path_factory.mktemp("json_data"))
  files, entries = {}, []
  for i in range(NUM_GOOD):
    mode = ("RGB", "L", "RGBA", "CMYK")[i % 4]
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    name = f"good_{i}.{fmt.lower()}"
    files[name] = _image_bytes(i, fmt, mode=mode)
    entries.append({"image": name, "caption": [f"picture number {i}", f"image {i}"],
                    "image_id": i})
  jpeg = _image_bytes(99, "JPEG")
  bad = {
      "truncated.jpg": jpeg[:len(jpeg) // 2],
      "header_corrupt.jpg": jpeg[:20] + b"\xff\x8f" + jpeg[22:],  # raises in the decoder
      "one_pixel.png": _image_bytes(1, size=(1, 1)),
      "not_an_image.jpg": b"<html>503</html>",
  }
  files.update(bad)
  entries += [{"image": name, "caption": "a bad image", "image_id": 100 + k}
              for k, name in enumerate(bad)]
  files["punctuation.png"] = _image_bytes(2)
  entries.append({"image": "punctuation.png", "caption": "?!...", "image_id": 104})
  entries.append({"image": "missing.png", "caption": "no file", "image_id": 105})
  for name, data in files.items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
  path = os.path.join(root, "train.json")
  with open(path, "w") as f:
    json.dump(entries, f)
  return path, root


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
  """A TFDS data dir the tiny demo set is built into once for this module."""
  return str(tmp_path_factory.mktemp("tfds"))


def _json_config(json_data, **overrides) -> ml_collections.ConfigDict:
  path, root = json_data
  cfg = inputs.pretrain_input(image_size=16, max_len=8)
  cfg.source = "json"
  cfg.annotations = path
  cfg.image_root = root
  cfg.tokenizer = dict(kind="sentencepiece", path="")
  cfg.pp = LIGHT_PP
  cfg.patch_mask_ratio = 0.5
  cfg.patch_size = 4
  cfg.probe_examples = 0
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------- config


def test_validate_config_names_the_field(json_data):
  builder.validate_config(_json_config(json_data))
  cfg = _json_config(json_data)
  cfg.suffle_buffer = 10
  with pytest.raises(ValueError, match="suffle_buffer"):
    builder.validate_config(cfg)
  without_paths = _json_config(json_data, annotations="")
  builder.validate_config(without_paths)  # paths may come later, e.g. on the command line
  with pytest.raises(ValueError, match="needs config.input.annotations"):
    builder.make_source(without_paths, split="train")
  with pytest.raises(ValueError, match=r"mixture\[0\] needs a weight"):
    builder.validate_config(_json_config(json_data, source="mixture",
                                         mixture=[dict(source="demo")]))


def test_op_strings_fill_knobs_and_nothing_is_appended(json_data):
  # A config-written string: knobs filled, nothing appended (patch_mask_ratio is 0.5 here).
  cfg = _json_config(json_data, batch_pp="mask_tokens({mlm_prob})",
                     pp="decode|resize({image_size})|tokenize({max_len}, key={patch_mask_strategy!r})")
  assert builder.train_pp_spec(cfg) == "decode|resize(16)|tokenize(8, key='random')"
  assert builder.batch_pp_spec(cfg) == "mask_tokens(0.15)"
  assert builder.train_pp_spec(_json_config(json_data, pp="decode|mask_tokens(0.3)")) == (
      "decode|mask_tokens(0.3)")  # verbatim
  assert builder.batch_pp_spec(_json_config(json_data, pp="decode")) == ""  # its own: none
  assert builder.train_ops(_json_config(json_data)).pp == (
      "decode_random_resized_crop(16)|flip|value_range(0, 1)|choose_caption|clean_caption(30)"
      "|tokenize(8)|mask_tokens(0.15)|mask_patches(0.5, grid=(4, 4))")
  # pp '' = the caption format's defaults, ALBEF's ops: tokenizer and MLM masking per batch.
  cfg = _json_config(json_data, pp="")
  assert builder.train_pp_spec(cfg) == f"{ALBEF_IMAGE_16}|choose_caption|clean_caption(30)"
  assert builder.batch_pp_spec(cfg) == "tokenize(8)|mask_tokens(0.15)"
  assert builder.batch_pp_spec(_json_config(json_data, pp="", mlm_prob=0.0)) == "tokenize(8)"
  assert builder.batch_pp_spec(_json_config(json_data, pp="", batch_pp="tokenize(5)")) == (
      "tokenize(5)")  # a field the config sets replaces its default
  with pytest.raises(ValueError, match=r"config.input.batch_pp = .*\{max_lne\} names no knob"):
    builder.validate_config(_json_config(json_data, batch_pp="tokenize({max_lne})"))
  with pytest.raises(ValueError, match=r"config.input.pp = .*unknown op 'tokenise'"):
    builder.validate_config(_json_config(json_data, pp="decode|tokenise(8)"))
  assert pipeline.with_tokenizer("decode|tokenize(8)|mask_tokens(0.15, kind='sentencepiece')",
                                 "wordpiece", "/v/vocab.txt") == (
      "decode|tokenize(8, kind='wordpiece', model='/v/vocab.txt')"
      "|mask_tokens(0.15, kind='sentencepiece', model='/v/vocab.txt')")


def _flag_config(*args: str) -> ml_collections.ConfigDict:
  """The config `--config=configs/<args[0]> args[1:]...` gives on the command line."""
  argv = ["prog", f"--config={os.path.join(CONFIGS, args[0])}", *args[1:]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_knobs_reach_the_ops_and_a_written_pp_is_verbatim(demo_dir):
  full = _flag_config("albef.py", "--config.input.max_len=40", "--config.input.image_size=384")
  assert builder.batch_pp_spec(full.input) == "tokenize(40)|mask_tokens(0.15)"
  assert builder.train_pp_spec(full.input).startswith("decode_random_resized_crop(384, ")
  tiny = _flag_config("albef.py:tiny", "--config.input.max_len=40",
                      f"--config.input.data_dir={demo_dir}")
  assert "|tokenize(40)|mask_tokens(0.15)" in builder.train_pp_spec(tiny.input)
  own = "decode|resize(24)|normalize('clip')|choose_caption|clean_caption(30)|tokenize(12)"
  written = _flag_config("albef.py:tiny", "--config.input.max_len=40", f"--config.input.pp={own}",
                         f"--config.input.data_dir={demo_dir}")
  assert builder.train_pp_spec(written.input) == own
  for cfg, shapes in ((tiny.input, {"image": (4, 32, 32, 3), "text_ids": (4, 40), "mlm_ids": (4, 40)}),
                      (written.input, {"image": (4, 24, 24, 3), "text_ids": (4, 12)})):
    it = builder.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert {k: batch[k].shape for k in shapes} == shapes
  assert "mlm_ids" not in batch


def test_method_configs_keep_their_ops():
  """The resolved op strings of the method configs (those of the builder before op strings
  moved into the configs: the same strings give the same batches)."""
  image = ("decode_random_resized_crop(256, scale=(0.2, 1.0))|flip|randaug(2, 7)"
           "|normalize('clip')|choose_caption|clean_caption(30)")
  canvas = "decode_crop_canvas(256, scale=(0.2, 1.0))|choose_caption|clean_caption(30)"
  device_ops = "resize_canvas(256, canvas=688)|flip|randaug(2, 7)|normalize('clip')"
  patches = "|mask_patches(0.5, grid=(16, 16), strategy='random', min_block=16)"
  want = {
      albef: formats.TrainOps(image, "tokenize(25)|mask_tokens(0.15)", canvas, device_ops),
      mamo: formats.TrainOps(image + patches, "tokenize(25)|mask_tokens(0.15)", canvas + patches,
                             device_ops)}
  for module, ops in want.items():
    config = module.get_config("")
    builder.validate_config(config.input)
    assert builder.train_ops(config.input) == ops, module.__name__
    config.input.device_augment = True
    assert (builder.train_pp_spec(config.input), builder.device_pp_spec(config.input)) == (
        ops.device_augment_pp, ops.device_pp)
  demo = ("decode|random_resized_crop({size}, scale=(0.85, 1.0))|normalize('clip')|choose_caption"
          "|clean_caption(30)|tokenize({length})|mask_tokens(0.15)")
  for arg, size, length, grid in (("tiny", 32, 16, 4), ("demo", 64, 24, 8)):
    spec = demo.format(size=size, length=length)
    assert builder.train_ops(albef.get_config(arg).input) == formats.TrainOps(spec)
    assert builder.train_ops(mamo.get_config(arg).input) == formats.TrainOps(
        f"{spec}|mask_patches(0.5, grid=({grid}, {grid}), strategy='random', min_block=16)")
  # The caption format's defaults are ALBEF's ops.
  albef_full = albef.get_config("").input
  assert caption.DEFAULT_OPS == formats.TrainOps(
      *(albef_full[field] for field in formats.TrainOps._fields))


def test_a_format_registered_outside_the_builder_trains_text_only():
  assert {"caption", "vqa", "nlvr2", "snli_ve", "refcoco"} <= set(formats.names())
  cfg = inputs.pretrain_input(max_len=8)
  cfg.update(source="demo", format="test_text_only", tokenizer=dict(kind="sentencepiece", path=""))
  builder.validate_config(cfg)
  it = builder.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                   process_count=1)
  batch = next(it)
  it.close()
  assert {k: v.shape for k, v in batch.items()} == {
      "text_ids": (4, 8), "text_mask": (4, 8), "mlm_ids": (4, 8), "mlm_labels": (4, 8)}
  with pytest.raises(ValueError, match="'test_text_only' has no eval data"):
    builder.make_eval_data(cfg, split="test", batch_size=4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"config.input.format = 'test_text_only' reads sources"):
    builder.validate_config(ml_collections.ConfigDict({**cfg.to_dict(), "source": "json"}))
  with pytest.raises(ValueError, match="config.input.format = 'nope'; known"):
    formats.get("nope")


def test_device_augment_moves_the_pixel_ops_to_the_accelerator(json_data):
  cfg = _json_config(json_data, pp="", device_augment=True)
  spec = builder.train_pp_spec(cfg)
  assert spec.startswith("decode_crop_canvas(16, scale=(0.2, 1.0))|choose_caption")
  assert "randaug" not in spec and "normalize" not in spec
  assert builder.device_pp_spec(cfg) == (
      "resize_canvas(16, canvas=48)|flip|randaug(2, 7)|normalize('clip')")
  assert builder.device_pp_spec(_json_config(json_data)) == ""
  assert builder.device_pp_spec(_json_config(json_data, pp="", device_pp="flip")) == ""  # off
  builder.validate_config(cfg)
  with pytest.raises(ValueError, match=r"device_pp.*'blur'"):
    builder.validate_config(_json_config(json_data, device_pp="resize_canvas(16)|blur"))
  with pytest.raises(ValueError, match="device_augment"):
    builder.validate_config(_json_config(json_data, device_augment=True, format="vqa"))
  # A config that writes its pp writes the device pair too.
  with pytest.raises(ValueError, match="config.input.device_augment needs config.input.device_augment_pp"):
    builder.validate_config(_json_config(json_data, device_augment=True))
  builder.validate_config(_json_config(json_data, device_augment=True,
                                       device_augment_pp="decode_crop_canvas(16)|choose_caption",
                                       device_pp="resize_canvas(16)"))


# ----------------------------------------------------------------------------- training


def test_demo_batches_with_the_mamo_ops(demo_dir):
  cfg = mamo.get_config("tiny").input
  cfg.data_dir = demo_dir
  cfg.patch_mask_ratio = 0.25
  assert cfg.patch_size == 8
  it = builder.make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0,
                                   process_count=1)
  batch = next(it)
  it.close()
  expected = {"image": ((8, 32, 32, 3), np.float32), "image_id": ((8,), np.int32),
              "text_ids": ((8, 16), np.int32), "text_mask": ((8, 16), np.int32),
              "mlm_ids": ((8, 16), np.int32), "mlm_labels": ((8, 16), np.int32),
              "patch_mask": ((8, 16), np.bool_)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  tokenizer = ops_text.load_tokenizer("sentencepiece")
  assert np.all(batch["text_ids"][:, 0] == tokenizer.cls_id)
  selected = batch["mlm_labels"] >= 0
  np.testing.assert_array_equal(batch["mlm_labels"][selected], batch["text_ids"][selected])
  np.testing.assert_array_equal(batch["patch_mask"].sum(1), 4)
  assert -2.0 < batch["image"].mean() < 2.5 and batch["image"].std() > 0.1  # CLIP-normalised
  assert len(set(batch["image_id"])) == 8 and batch["image_id"].max() < 256


def test_batch_level_text_ops_tokenize_like_per_example_ones(json_data):
  """The same captions, the same ids; only the MLM draws come from the batch seed."""
  batches = {}
  caption_ops = f"{ALBEF_IMAGE_16}|choose_caption|clean_caption(30)"
  text_ops = "tokenize({max_len})|mask_tokens({mlm_prob})"
  for per_batch in (False, True):
    pp = (f"{caption_ops}|{MASK_PATCHES_4}" if per_batch else
          f"{caption_ops}|{text_ops}|{MASK_PATCHES_4}")
    cfg = _json_config(json_data, pp=pp, batch_pp=text_ops if per_batch else "", mlm_prob=0.3)
    it = builder.make_train_iterator(cfg, global_batch_size=4, seed=5, process_index=0,
                                     process_count=1)
    batches[per_batch] = _take(it, 6)
  for a, b in zip(batches[False], batches[True]):
    assert a.keys() == b.keys() and "caption" not in b
    for key in ("image", "image_id", "text_ids", "text_mask", "patch_mask"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    selected = b["mlm_labels"] >= 0
    np.testing.assert_array_equal(b["mlm_labels"][selected], b["text_ids"][selected])
    np.testing.assert_array_equal(b["mlm_ids"][~selected], b["text_ids"][~selected])
  selected = np.concatenate([b["mlm_labels"] >= 0 for b in batches[True]])
  maskable = np.concatenate([(b["text_mask"] == 1) & (np.arange(b["text_ids"].shape[1]) > 0)
                             for b in batches[True]])
  assert not (selected & ~maskable).any()  # never [CLS] or padding
  assert 0.15 < selected.sum() / maskable.sum() < 0.45  # 0.3 of maskable tokens, loosely


def test_device_augment_batches_carry_canvases(demo_dir):
  cfg = inputs.demo_input(image_size=32, max_len=16, config="tiny")
  cfg.data_dir = demo_dir
  cfg.pp = ""
  cfg.device_augment = True
  it = builder.make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0,
                                   process_count=1)
  batch = next(it)
  it.close()
  side, pixels = ops_image.canvas_side(32), ops_image.canvas_pixels(32)
  assert batch["image"].shape == (8, 3 * pixels) and batch["image"].dtype == np.uint8
  assert batch["image_hw"].shape == (8, 2) and batch["image_hw"].dtype == np.int32
  for packed, (h, w) in zip(batch["image"], batch["image_hw"]):
    assert 1 <= h <= side and 1 <= w <= side and h * w <= pixels
    assert packed[:h * w * 3].std() > 1 and packed[h * w * 3:].max() == 0
  # The accelerator half turns them into ALBEF's normalised 32 x 32 images.
  from input_pipeline import device_ops
  out = device_ops.make_augment(builder.device_pp_spec(cfg), seed=0)(batch, 0)
  assert out["image"].shape == (8, 32, 32, 3) and "image_hw" not in out
  assert -2.0 < float(out["image"].mean()) < 2.5 and float(out["image"].std()) > 0.1


def test_bad_examples_are_skipped_and_counted(json_data):
  it = builder.make_train_iterator(_json_config(json_data), global_batch_size=4, seed=3,
                                   process_index=0, process_count=1)
  batches = _take(it, 12)
  stats = it.stats()
  it.close()
  ids = np.concatenate([b["image_id"] for b in batches])
  assert set(ids) == set(range(NUM_GOOD))  # every usable example, no bad one
  # 25 entries load (one file is missing); 5 of them fail in the ops each epoch.
  assert stats["data_skipped_at_load"] == 1
  positions = stats["data_position"]
  assert stats["data_skipped"] == positions - 48
  assert 5 * (positions // 25) <= stats["data_skipped"] <= 5 * (positions // 25 + 1)


def test_a_source_with_no_usable_example_fails_at_start(tmp_path):
  data = _image_bytes(0, "JPEG")
  entries = []
  for i in range(3):
    with open(tmp_path / f"bad_{i}.jpg", "wb") as f:
      f.write(data[:len(data) // 2])
    entries.append({"image": f"bad_{i}.jpg", "caption": "broken"})
  path = str(tmp_path / "broken_only.json")
  with open(path, "w") as f:
    json.dump(entries, f)
  cfg = _json_config((path, str(tmp_path)), probe_examples=16)
  with pytest.raises(ValueError, match=r"broken_only\.json.*none of its first 16"):
    builder.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0,
                                process_count=1)


def test_batches_are_deterministic_and_resume_exactly(json_data):
  cfg = _json_config(json_data, batch_pp="test_reverse_rows")
  kwargs = dict(global_batch_size=4, process_index=0, process_count=1)
  full = builder.make_train_iterator(cfg, seed=7, **kwargs)
  first = _take(full, 3)
  state = full.state()
  rest = _take(full, 3)
  full.close()
  assert state["step"] == 3 and state["data_position"] > 12  # bad examples were skipped
  again = builder.make_train_iterator(cfg, seed=7, **kwargs)
  _assert_same_batches(_take(again, 6), first + rest)
  again.close()
  resumed = builder.make_train_iterator(cfg, seed=7, start_step=3,
                                        start_position=state["data_position"], **kwargs)
  _assert_same_batches(_take(resumed, 3), rest)
  assert resumed.stats() == {**full.stats()}
  resumed.close()
  replayed = builder.make_train_iterator(cfg, seed=7, start_step=3, **kwargs)
  _assert_same_batches(_take(replayed, 3), rest)
  replayed.close()
  other = builder.make_train_iterator(cfg, seed=8, **kwargs)
  assert not np.array_equal(next(other)["image"], first[0]["image"])
  other.close()


def test_two_processes_read_disjoint_examples(json_data):
  cfg = _json_config(json_data)
  seen = []
  for index in range(2):
    it = builder.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=index,
                                     process_count=2)
    seen.append(set(np.concatenate([b["image_id"] for b in _take(it, 8)])))
    it.close()
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(NUM_GOOD))


# ----------------------------------------------------------------------------- eval


def test_eval_data_is_padded_and_indexed(demo_dir):
  cfg = inputs.demo_input(image_size=32, max_len=16, config="tiny")
  cfg.data_dir = demo_dir
  # The retrieval entry and the format's (caption) eval data are the same thing.
  parts = [builder.make_eval_dataset(cfg, split="test", batch_size=24, process_index=0,
                                     process_count=2),
           builder.make_eval_data(cfg, split="test", batch_size=24, process_index=1,
                                  process_count=2)]
  assert all(isinstance(part, caption.EvalData) for part in parts)
  data = parts[0]
  assert data.num_images == 64 and data.num_texts == 320
  assert all(data.img2txt[data.txt2img[t]].count(t) == 1 for t in range(320))
  assert [len(texts) for texts in data.img2txt] == [5] * 64
  tokenizer = ops_text.load_tokenizer("sentencepiece")
  cleaned = [ops_text.albef_pre_caption(tf.constant(c), 30).numpy().decode()
             for c in data.captions[:7]]
  ids, mask = tokenizer.encode(cleaned, 16)
  np.testing.assert_array_equal(data.text_ids[:7], ids)
  np.testing.assert_array_equal(data.text_mask[:7], mask)
  image_indices, text_indices = [], []
  for part in parts:
    images = list(part.image_batches())
    texts = list(part.text_batches())
    assert len(images) == 2 and len(texts) == 7  # ceil(32 / 24), ceil(160 / 24)
    for batch in images:
      assert batch["image"].shape == (24, 32, 32, 3) and batch["image"].dtype == np.float32
      np.testing.assert_array_equal(batch["valid"], batch["image_index"] >= 0)
      image_indices += list(batch["image_index"][batch["valid"]])
    for batch in texts:
      assert batch["text_ids"].shape == (24, 16)
      rows = batch["text_index"][batch["valid"]]
      np.testing.assert_array_equal(batch["text_ids"][batch["valid"]], data.text_ids[rows])
      text_indices += list(rows)
    assert part.num_invalid_images == 0
  assert sorted(image_indices) == list(range(64))
  assert sorted(text_indices) == list(range(320))


def test_eval_images_follow_the_eval_ops(json_data):
  cfg = _json_config(json_data, eval_annotations=json_data[0])
  data = builder.make_eval_dataset(cfg, split="test", batch_size=32, process_index=0,
                                   process_count=1)
  (batch,) = list(data.image_batches())
  assert data.num_images == 25  # entries that load; undecodable ones stay, all zeros
  assert data.num_invalid_images == 4
  assert batch["valid"].sum() == 25 and not batch["image"][20:24].any()
  assert batch["image"][:20].std(axis=(1, 2, 3)).min() > 0.1
  first = np.asarray(Image.open(os.path.join(json_data[1], "good_0.png")).convert("RGB"))
  expected = (first / 255.0 - np.asarray((0.48145466, 0.4578275, 0.40821073))) / np.asarray(
      (0.26862954, 0.26130258, 0.27577711))
  np.testing.assert_allclose(batch["image"][0], expected, atol=1e-5)  # 16 px: no resize
  with pytest.raises(ValueError, match="training split only"):
    builder.make_eval_dataset(_json_config(json_data), split="test", batch_size=8,
                              process_index=0, process_count=1)


# ----------------------------------------------------------------------------- device


def _mesh():
  return jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))


def test_to_global_shards_the_batch_axis():
  batch = {"image": np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3),
           "image_id": np.arange(8, dtype=np.int32)}
  out = device.to_global(batch, _mesh())
  for key, value in batch.items():
    assert isinstance(out[key], jax.Array) and out[key].shape == value.shape
    np.testing.assert_array_equal(np.asarray(out[key]), value)
  assert out["image"].sharding.spec == P(("data", "fsdp"), None, None)
  assert out["image"].addressable_shards[0].data.shape == (1, 2, 3)
  with pytest.raises(ValueError, match="lacks"):
    device.to_global(batch, jax.make_mesh((8,), ("data",)))


class _HostBatches:
  """A host iterator with stats, like builder.TrainIterator."""

  def __init__(self, n):
    self._batches = [{"x": np.full([8, 2], i, np.float32)} for i in range(n)]
    self._next = 0
    self.closed = False

  def __next__(self):
    if self._next == len(self._batches):
      raise StopIteration
    self._next += 1
    return self._batches[self._next - 1]

  def stats(self):
    return {"data_position": float(self._next)}

  def state(self):
    return {"step": self._next}

  def close(self):
    self.closed = True


def test_prefetch_to_device_keeps_order_and_reports_the_yielded_batch():
  host = _HostBatches(5)
  it = device.prefetch_to_device(host, 2, _mesh())
  for i in range(5):
    batch = next(it)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.full([8, 2], i))
    assert it.stats() == {"data_position": i + 1.0} and it.state() == {"step": i + 1}
  with pytest.raises(StopIteration):
    next(it)
  it.close()
  assert host.closed
