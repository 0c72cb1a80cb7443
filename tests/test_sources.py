"""Sources: ALBEF JSON, TFRecord shards from the converter, TFDS, the demo set, mixtures."""
import collections
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from input_pipeline import convert
from input_pipeline import sources


def _image_bytes(seed: int, fmt: str = "JPEG", size=(24, 32), mode: str = "RGB") -> bytes:
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buffer, fmt)
  return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _as_python(example: dict) -> dict:
  return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in example.items()}


@pytest.fixture(scope="module")
def albef_dir(tmp_path_factory):
  """An image folder and an ALBEF pretrain JSON with good and bad entries."""
  root = str(tmp_path_factory.mktemp("albef"))
  good = {f"images/good_{i}.jpg": _image_bytes(i) for i in range(6)}
  good["images/gray.jpg"] = _image_bytes(10, mode="L")
  good["images/cmyk.jpg"] = _image_bytes(11, mode="CMYK")
  good["images/rgba.png"] = _image_bytes(12, "PNG", mode="RGBA")
  corrupt = _image_bytes(13)
  files = {**good, "images/truncated.jpg": corrupt[:len(corrupt) // 2],
           "images/one_pixel.png": _image_bytes(14, "PNG", size=(1, 1))}
  for name, data in files.items():
    _write(os.path.join(root, name), data)
  entries = [{"image": name, "caption": f"caption of {name}"} for name in sorted(files)]
  entries[0]["caption"] = [entries[0]["caption"], "  ", "a second caption"]  # one empty
  entries += [
      {"image": "images/missing.jpg", "caption": "the file is not there"},
      {"image": "images/good_0.jpg", "caption": "   "},
      {"image": "images/good_1.jpg", "caption": "BAD_UTF8"},
  ]
  text = json.dumps(entries).replace('"BAD_UTF8"', '"caf\\u00e9 BAD"')
  raw = text.encode("utf-8").replace("BAD".encode(), b"\xff\xfe")  # invalid UTF-8 bytes
  _write(os.path.join(root, "pretrain.json"), raw)
  return root, sorted(files), sorted(good)


def _examples(source: sources.Source) -> list[dict]:
  return [_as_python(e) for e in source.examples().as_numpy_iterator()]


def test_sanitize_captions_drops_empty_and_non_utf8():
  captions = ["a dog", "", "   ", b"caf\xe9", "caf\u00e9 \ufffd ok", b"\xff\xfe"]
  out = sources.sanitize_captions({"captions": tf.constant(captions, tf.string)})
  assert out["captions"].numpy().tolist() == [b"a dog", "caf\u00e9 \ufffd ok".encode()]
  assert bool(out["_valid"])
  out = sources.sanitize_captions({"captions": tf.constant(["", b"\xc3"], tf.string)})
  assert out["captions"].shape == [0] and not bool(out["_valid"])


def test_json_source_reads_entries_and_counts_skips(albef_dir):
  root, files, _ = albef_dir
  source = sources.json_source(os.path.join(root, "pretrain.json"), root)
  assert source.skipped == {"missing_image": 1, "empty_caption": 1, "bad_utf8_caption": 1,
                            "dropped_captions": 1}
  examples = _examples(source)
  assert len(examples) == len(files) == source.num_examples
  by_caption = {e["captions"][0].decode(): e for e in examples}
  for name in files:
    example = by_caption[f"caption of {name}"]
    with open(os.path.join(root, name), "rb") as f:
      assert example["image"] == f.read()
    assert example["_valid"]
  assert by_caption[f"caption of {files[0]}"]["captions"] == [
      f"caption of {files[0]}".encode(), b"a second caption"]


def test_json_image_ids_are_stable_and_distinct(albef_dir):
  root, files, _ = albef_dir
  entries = [{"image": name, "caption": "x"} for name in files]
  path_a, path_b = os.path.join(root, "a.json"), os.path.join(root, "b.json")
  for path, order in ((path_a, entries), (path_b, entries[::-1])):
    with open(path, "w") as f:
      json.dump(order, f)
  ids_a = sources.load_json_annotations(path_a, root)
  ids_b = sources.load_json_annotations(path_b, root)
  id_of_a = dict(zip(ids_a.paths, ids_a.image_ids))
  assert id_of_a == dict(zip(ids_b.paths, ids_b.image_ids))
  assert sorted(id_of_a.values()) == list(range(len(files)))
  with open(path_a, "w") as f:
    json.dump([{"image": n, "caption": "x", "image_id": 1000 + i} for i, n in enumerate(files)], f)
  assert sources.load_json_annotations(path_a, root).image_ids == [1000 + i for i in
                                                                   range(len(files))]


@pytest.mark.parametrize("content,message", [
    (b'[{"image": "a.jpg", "caption": "x"},', "not valid JSON"),
    (b'{"image": "a.jpg"}', "expected a JSON list"),
    (b'[{"image": "a.jpg", "caption": "x"}, 7]', "entry 1: expected an object"),
    (b'[{"caption": "x"}]', "entry 0: field 'image'"),
    (b'[{"image": "a.jpg"}]', "entry 0: needs a field 'caption'"),
    (b'[{"image": "a.jpg", "caption": 3}]', "entry 0: field 'caption'"),
    (b'[{"image": "a.jpg", "caption": []}]', "entry 0: field 'caption'"),
    (b'[{"image": "a.jpg", "caption": "x", "kwords": "dog"}]', "entry 0: field 'kwords'"),
    (b'[{"image": "a.jpg", "caption": "x", "image_id": 1.5}]', "entry 0: field 'image_id'"),
])
def test_malformed_json_names_file_and_entry(tmp_path, content, message):
  path = str(tmp_path / "broken.json")
  _write(path, content)
  with pytest.raises(ValueError, match=message) as error:
    sources.json_source(path, str(tmp_path))
  assert "broken.json" in str(error.value)


def test_source_without_usable_entries_fails_naming_it(tmp_path):
  path = str(tmp_path / "nothing.json")
  _write(path, json.dumps([{"image": "gone.jpg", "caption": "x"}]).encode())
  with pytest.raises(ValueError, match=r"nothing\.json.*missing_image"):
    sources.json_source(path, str(tmp_path))
  with pytest.raises(ValueError, match="no files match"):
    sources.tfrecord_source(str(tmp_path / "none-*.tfrecord"))


def test_json_process_parts_are_disjoint(albef_dir):
  root, files, _ = albef_dir
  parts = [_examples(sources.json_source(os.path.join(root, "pretrain.json"), root,
                                         process_index=i, process_count=3)) for i in range(3)]
  captions = [[e["captions"][0] for e in part] for part in parts]
  assert sum(map(len, captions)) == len(files)
  assert len(set().union(*map(set, captions))) == len(files)


def test_converted_tfrecords_give_the_json_examples(albef_dir, tmp_path):
  root, _, good = albef_dir
  annotations = os.path.join(root, "good.json")
  with open(annotations, "w") as f:
    json.dump([{"image": name, "caption": [f"first {name}", f"second {name}"],
                "kwords": ["dog", name[-7:]]} for name in good], f)
  manifest = convert.convert(annotations, root, str(tmp_path), num_shards=3)
  assert manifest["num_examples"] == len(good) and manifest["skipped"] == {}
  assert sorted(os.listdir(tmp_path)) == ["data-00000-of-00003.tfrecord",
                                          "data-00001-of-00003.tfrecord",
                                          "data-00002-of-00003.tfrecord", "manifest.json"]
  assert [s["num_examples"] for s in manifest["shards"]] == [3, 3, 3]
  from_json = _examples(sources.json_source(annotations, root))
  from_records = _examples(sources.tfrecord_source(str(tmp_path / "data-*.tfrecord")))
  assert from_records == from_json  # same fields, values and order
  assert set(from_json[0]) == {"image", "image_id", "captions", "concepts", "_valid"}
  with pytest.raises(ValueError, match="--overwrite"):
    convert.convert(annotations, root, str(tmp_path), num_shards=3)


def test_converter_verifies_images_and_records_reasons(albef_dir, tmp_path):
  root, files, good = albef_dir
  manifest = convert.convert(os.path.join(root, "pretrain.json"), root, str(tmp_path),
                             num_shards=2)
  assert manifest["num_examples"] == len(good)
  assert manifest["skipped"] == {"missing_image": 1, "empty_caption": 1, "bad_utf8_caption": 1,
                                 "dropped_captions": 1, "undecodable_image": 1,
                                 "image_too_small": 1}
  reasons = {(e["image"].split("/")[-1], e["reason"]) for e in manifest["skipped_entries"]}
  assert ("truncated.jpg", "undecodable_image") in reasons
  assert ("one_pixel.png", "image_too_small") in reasons
  assert all(e["file"].endswith("pretrain.json") for e in manifest["skipped_entries"])
  source = sources.tfrecord_source(str(tmp_path / "data-*.tfrecord"), process_index=1,
                                   process_count=2)
  assert source.num_examples == len(_examples(source)) == len(good) // 2


def test_converter_command_line(albef_dir, tmp_path):
  root, _, _ = albef_dir
  output = str(tmp_path / "out")
  result = subprocess.run(
      [sys.executable, "-m", "input_pipeline.convert",
       f"--annotations={os.path.join(root, 'pretrain.json')}", f"--image_root={root}",
       f"--output={output}", "--num_shards=2", "--workers=2"],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(output, "manifest.json")) as f:
    assert json.load(f)["num_shards"] == 2


def test_tfrecord_record_sharding_with_fewer_files_than_processes(albef_dir, tmp_path):
  root, _, good = albef_dir
  annotations = os.path.join(root, "pretrain.json")
  convert.convert(annotations, root, str(tmp_path), num_shards=1)
  parts = [_examples(sources.tfrecord_source(str(tmp_path / "*.tfrecord"), process_index=i,
                                             process_count=2)) for i in range(2)]
  ids = [[e["image_id"] for e in part] for part in parts]
  assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == len(good)


# ----------------------------------------------------------------------------- TFDS / demo


@pytest.fixture(scope="module")
def demo_builder(tmp_path_factory):
  from input_pipeline import demo_data
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return demo_data.build_demo(data_dir, "tiny"), data_dir


def test_tfds_source_maps_fields_and_splits_processes(demo_builder):
  builder, _ = demo_builder
  field_map = {"image": "image", "image_id": "image_id", "captions": "captions",
               "objects/label": "objects/shape", "objects/bbox": "objects/bbox"}
  parts = [sources.tfds_source(builder, "test", field_map=field_map, process_index=i,
                               process_count=2) for i in range(2)]
  examples = [_examples(p) for p in parts]
  assert [p.num_examples for p in parts] == [32, 32] == [len(e) for e in examples]
  ids = [{e["image_id"] for e in part} for part in examples]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 64
  first = examples[0][0]
  assert first["image"].startswith(b"\x89PNG") and len(first["captions"]) == 5
  assert np.asarray(first["objects/bbox"]).shape == (len(first["objects/label"]), 4)
  with pytest.raises(ValueError, match="not a feature"):
    sources.tfds_source(builder, "test", field_map={**field_map, "captions": "text"})
  with pytest.raises(ValueError, match="needs 'captions'"):
    sources.tfds_source(builder, "test", field_map={"image": "image"})


def test_demo_source_is_the_common_dict(demo_builder):
  _, data_dir = demo_builder
  source = sources.demo_source("train", data_dir=data_dir, config="tiny")
  example = next(source.examples().as_numpy_iterator())
  assert source.num_examples == 256
  assert {"image", "image_id", "captions", "concepts", "objects/label", "objects/bbox",
          "_valid"} <= set(example)


def test_mixture_follows_weights_and_fills_missing_fields(albef_dir, demo_builder):
  root, _, _ = albef_dir
  _, data_dir = demo_builder
  json_part = sources.json_source(os.path.join(root, "pretrain.json"), root)
  demo_part = sources.demo_source("test", data_dir=data_dir, config="tiny")
  mixed = sources.mixture([json_part, demo_part], [3, 1])
  stream = mixed.stream(seed=0, shuffle_buffer=16).map(mixed.read).take(800)
  # Demo examples have five captions, the JSON ones one or two.
  kinds = collections.Counter("demo" if len(e["captions"]) == 5 else "json"
                              for e in stream.as_numpy_iterator())
  assert abs(kinds["json"] / 800 - 0.75) < 0.08
  spec = mixed.examples().element_spec
  assert spec["concepts"].shape.as_list() == [None] and "relation/subject" in spec
