"""Task data: readers of the VQA / NLVR2 / SNLI-VE / RefCOCO+ formats, task ops, batch contracts,
padded eval data and the generated demo datasets."""
import collections
import hashlib
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from input_pipeline import builder
from input_pipeline import demo_data
from input_pipeline import demo_tasks
from input_pipeline import inputs
from input_pipeline import ops_text
from input_pipeline import registry
from input_pipeline import tasks

CLS, SEP = 2, 3  # ids of the demo SentencePiece model


def _png(seed: int, size=(16, 16)) -> bytes:
  array = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _write_json(path, value) -> str:
  with open(path, "w") as f:
    json.dump(value, f)
  return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """img0.png ... img3.png (16 x 16) and flickr7.jpg (a PNG named .jpg, as SNLI-VE ids)."""
  root = tmp_path_factory.mktemp("task_images")
  for i in range(4):
    (root / f"img{i}.png").write_bytes(_png(i))
  (root / "sub").mkdir()
  (root / "sub" / "img0.png").write_bytes(_png(9))
  (root / "flickr7.jpg").write_bytes(_png(7))
  return root


def _map(fn, example: dict) -> dict:
  """Runs an op inside `tf.data.Dataset.map` on one example."""
  ds = tf.data.Dataset.from_tensors(example).map(fn)
  return next(iter(ds.as_numpy_iterator()))


def _seeded(example: dict, seed: int = 0) -> dict:
  return {**example, "_seed": tf.constant([seed, 1], tf.int64)}


# ----------------------------------------------------------------------------- readers


def test_answer_weights_by_hand():
  answers, weights = tasks.answer_weights(["yes"] * 7 + ["no", "maybe", "no"])
  assert answers == ["yes", "no", "maybe"]
  np.testing.assert_allclose(weights, [0.7, 0.2, 0.1])
  assert tasks.answer_weights(["two"], "vg") == (["two"], [0.5])
  assert tasks.answer_weights(["a", "b", "a"], "vg") == (["a", "b"], [0.5, 0.5])


def test_vqa_reader_weights_skips_and_errors(image_dir, tmp_path):
  entries = [
      {"question_id": 11, "question": "What is it?", "image": "img0.png", "dataset": "vqa",
       "answer": ["cat", "cat", "dog", "cat", "", "cat"]},
      {"question_id": 12, "question": "Where?", "image": "img1.png", "dataset": "vg",
       "answer": "left"},
      {"question_id": 13, "question": "Lost?", "image": "gone.png", "answer": ["x"]},
      {"question_id": 14, "question": "  ", "image": "img2.png", "answer": ["x"]},
      {"question_id": 15, "question": "Blank?", "image": "img2.png", "answer": ["", " "]},
      {"question_id": 16, "question": "Same image?", "image": "img0.png", "answer": ["no"]},
  ]
  path = _write_json(tmp_path / "vqa.json", entries)
  records = tasks.load_task_annotations("vqa", path, str(image_dir))
  assert [r["question_id"] for r in records.rows] == [11, 12, 16]
  assert records.rows[0]["answers"] == ["cat", "dog"]
  np.testing.assert_allclose(records.rows[0]["answer_weights"], [0.8, 0.2])  # 4 and 1 of 5
  assert records.rows[1]["answers"] == ["left"] and records.rows[1]["answer_weights"] == [0.5]
  assert records.rows[0]["image_id"] == records.rows[2]["image_id"] != records.rows[1]["image_id"]
  assert records.skipped == {"missing_image": 1, "empty_text": 1, "empty_answer": 1,
                             "dropped_answers": 1}
  assert [(i, reason) for _, i, _, reason in records.skipped_entries] == [
      (2, "missing_image"), (3, "empty_text"), (4, "empty_answer")]
  # Eval entries need no answers but a question id.
  test = tasks.load_task_annotations("vqa", _write_json(tmp_path / "test.json", [
      {"question_id": 3, "question": "q?", "image": "img3.png"}]), str(image_dir), train=False)
  assert test.rows[0]["raw_answers"] == [] and test.rows[0]["question_id"] == 3
  bad = _write_json(tmp_path / "bad.json", entries[:2] + [{"question": "q", "image": "img0.png",
                                                          "answer": 5}])
  with pytest.raises(ValueError, match=r"bad\.json: entry 2: field 'answer'"):
    tasks.load_task_annotations("vqa", bad, str(image_dir))
  no_id = _write_json(tmp_path / "no_id.json", [{"question": "q", "image": "img0.png"}])
  with pytest.raises(ValueError, match=r"no_id\.json: entry 0: field 'question_id'"):
    tasks.load_task_annotations("vqa", no_id, str(image_dir), train=False)
  broken = tmp_path / "broken.json"
  broken.write_text('[{"question": "q",')
  with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
    tasks.load_task_annotations("vqa", str(broken), str(image_dir))


def test_nlvr2_reader(image_dir, tmp_path):
  entries = [
      {"images": ["img0.png", "img1.png"], "sentence": "One dog.", "label": "True"},
      {"images": ["img2.png", "gone.png"], "sentence": "Two dogs.", "label": "False"},
      {"images": ["img3.png", "img0.png"], "sentence": "No dog.", "label": "False"},
  ]
  records = tasks.load_task_annotations("nlvr2", _write_json(tmp_path / "n.json", entries),
                                        str(image_dir))
  assert [r["label"] for r in records.rows] == ["true", "false"]
  assert records.rows[1]["images"] == [str(image_dir / "img3.png"), str(image_dir / "img0.png")]
  assert records.skipped == {"missing_image": 1}
  for bad_entry, field in (({"images": ["img0.png"], "sentence": "s", "label": "True"}, "images"),
                           ({"images": ["img0.png", "img1.png"], "sentence": "s",
                             "label": "maybe"}, "label"),
                           ({"images": ["img0.png", "img1.png"], "label": "True"}, "sentence")):
    path = _write_json(tmp_path / "bad.json", entries + [bad_entry])
    with pytest.raises(ValueError, match=rf"bad\.json: entry 3: field '{field}'"):
      tasks.load_task_annotations("nlvr2", path, str(image_dir))


def test_snli_ve_reader_appends_jpg(image_dir, tmp_path):
  entries = [{"image": "flickr7", "sentence": "A thing.", "label": "entailment"},
             {"image": "img1.png", "sentence": "Another.", "label": "Contradiction"},
             {"image": "flickr8", "sentence": "Missing.", "label": "neutral"}]
  records = tasks.load_task_annotations("snli_ve", _write_json(tmp_path / "ve.json", entries),
                                        str(image_dir))
  assert [r["images"][0] for r in records.rows] == [str(image_dir / "flickr7.jpg"),
                                                    str(image_dir / "img1.png")]
  assert [r["label"] for r in records.rows] == ["entailment", "contradiction"]
  assert records.skipped == {"missing_image": 1}
  path = _write_json(tmp_path / "bad.json", [{"image": "x", "sentence": "s", "label": "yes"}])
  with pytest.raises(ValueError, match=r"bad\.json: entry 0: field 'label'"):
    tasks.load_task_annotations("snli_ve", path, str(image_dir))


def test_refcoco_reader_train_ids_and_eval_boxes(image_dir, tmp_path):
  train = [{"image": "img0.png", "text": "left man"}, {"image": "img1.png", "text": "dog"},
           {"image": "sub/img0.png", "text": "same file name"}, {"image": "img2.png", "text": ""}]
  records = tasks.load_task_annotations("refcoco", _write_json(tmp_path / "r.json", train),
                                        str(image_dir))
  ids = [r["image_id"] for r in records.rows]
  assert ids[0] == ids[2] != ids[1]  # ALBEF: the image id is the file name's
  assert records.skipped == {"empty_text": 1}
  test = [{"image": "img0.png", "text": "a", "ref_id": 5, "bbox": [1, 2, 3, 4],
           "proposals": [[1, 2, 3, 4, 0.9], [0, 0, 8, 8]], "split": "testB"},
          {"image": "img1.png", "text": "b", "ref_id": 6, "bbox": [0, 0, 2, 2], "proposals": []}]
  records = tasks.load_task_annotations("refcoco", _write_json(tmp_path / "t.json", test),
                                        str(image_dir), train=False, split="val")
  assert records.rows[0]["proposals"] == [[1, 2, 3, 4], [0, 0, 8, 8]]
  assert [r["split"] for r in records.rows] == ["testB", "val"]
  del test[1]["bbox"]
  with pytest.raises(ValueError, match=r"t2\.json: entry 1: field 'bbox'"):
    tasks.load_task_annotations("refcoco", _write_json(tmp_path / "t2.json", test),
                                str(image_dir), train=False)


# ----------------------------------------------------------------------------- ops


def test_tokenize_answers_alone_and_in_map():
  example = {"answers": tf.constant(["no", "yes", "maybe"]),
             "answer_weights": tf.constant([0.2, 0.7, 0.1])}
  tokenizer = ops_text.load_tokenizer("sentencepiece")
  op = registry.get_op("tokenize_answers(2, 6)")
  for out in (op(dict(example)), _map(op, example)):
    ids, mask = tokenizer.encode(["yes", "no"], 6, append_sep=True)
    np.testing.assert_array_equal(out["answer_ids"], ids)
    np.testing.assert_array_equal(out["answer_mask"], mask)
    np.testing.assert_allclose(out["answer_weight"], [0.7, 0.2])
  padded = _map(registry.get_op("tokenize_answers(5, 9)"), example)
  assert padded["answer_ids"].shape == (5, 9) and padded["answer_weight"].dtype == np.float32
  np.testing.assert_array_equal(padded["answer_ids"][3:], 0)
  np.testing.assert_array_equal(padded["answer_mask"][3:], 0)
  np.testing.assert_allclose(padded["answer_weight"], [0.7, 0.2, 0.1, 0, 0])
  assert padded["answer_ids"][0, 0] == CLS and padded["answer_ids"][0, 5] == SEP  # "yes": 4 pieces
  assert tokenizer.decode(padded["answer_ids"][2]) == "maybe"
  none = _map(op, {"answers": tf.zeros([0], tf.string), "answer_weights": tf.zeros([0])})
  assert not none["answer_ids"].any() and not none["answer_weight"].any()


def test_answer_scores_match_a_loop_over_the_answer_list(tmp_path):
  vocabulary = ["yes", "no", "2", "red", "blue"]
  path = _write_json(tmp_path / "answers.json", vocabulary)
  op = registry.get_op(f"answer_scores(answer_list={str(path)!r})")
  rng = np.random.default_rng(0)
  for _ in range(5):
    given = list(rng.choice(vocabulary + ["zebra", "maybe"], size=rng.integers(0, 5), replace=False))
    weights = rng.uniform(0.05, 0.6, len(given)).astype(np.float32)
    example = {"answers": tf.constant(given, tf.string), "answer_weights": tf.constant(weights)}
    want = np.zeros(len(vocabulary), np.float32)
    for answer, weight in zip(given, weights):   # VQA's soft score min(1, count / 3), count = 10 * weight
      if answer in vocabulary:
        want[vocabulary.index(answer)] = min(1.0, 10 * weight / 3)
    for out in (op(dict(example)), _map(op, example)):
      np.testing.assert_allclose(out["answer_scores"], want, rtol=1e-6)
  demo = registry.get_op("answer_scores(source='demo', demo_config='tiny')")(dict(
      answers=tf.constant(["red"]), answer_weights=tf.constant([1.0])))["answer_scores"]
  assert demo.shape == (len(demo_tasks.vqa_answers()),) and float(demo[demo_tasks.vqa_answers().index("red")]) == 1.0
  with pytest.raises(ValueError, match="config.input.answer_list"):
    registry.get_op("answer_scores(source='json')")


def test_each_image_decodes_both_with_independent_seeds():
  data = _png(3, size=(12, 20))
  example = _seeded({"image0": tf.constant(data), "image1": tf.constant(data)})
  plain = registry.get_op("each_image(\"decode|value_range(0, 1)\")")
  crops = registry.get_op("each_image(\"decode|random_resized_crop(8)\", keys=('image0', 'image1'))")
  expected = np.asarray(Image.open(io.BytesIO(data))) / 255.0
  for out in (plain(dict(example)), _map(plain, example)):
    np.testing.assert_allclose(np.asarray(out["image0"]), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["image1"]), expected, atol=1e-6)
    assert bool(out["_valid"])
  eager, mapped = crops(dict(example)), _map(crops, example)
  np.testing.assert_array_equal(eager["image0"], mapped["image0"])
  assert eager["image0"].shape == (8, 8, 3)
  assert not np.array_equal(mapped["image0"], mapped["image1"])  # same picture, own crop
  broken = _map(plain, _seeded({"image0": tf.constant(data), "image1": tf.constant(b"junk")}))
  assert not broken["_valid"]


def test_class_label_alone_and_in_map():
  op = registry.get_op("class_label(('contradiction', 'neutral', 'entailment'))")
  for name, label in (("contradiction", 0), ("neutral", 1), ("entailment", 2)):
    example = {"label_name": tf.constant(name)}
    for out in (op(dict(example)), _map(op, example)):
      assert int(out["label"]) == label and bool(out["_valid"])
      assert out["label"].dtype == np.int32
  assert not _map(op, {"label_name": tf.constant("maybe")})["_valid"]


def test_normalize_boxes_by_hand():
  image = tf.zeros([20, 40, 3], tf.uint8)  # height 20, width 40
  example = {"image": image, "bbox": tf.constant([4.0, 2.0, 10.0, 6.0]),
             "boxes": tf.constant([[30.0, 15.0, 20.0, 10.0, 0.9], [0.0, 0.0, 40.0, 20.0, 0.1]])}
  single = registry.get_op("normalize_boxes()")
  many = registry.get_op("normalize_boxes(key='boxes', out='proposals')")
  for out in (single(dict(example)), _map(single, example)):
    # (ymin, xmin, ymax, xmax) = (2 / 20, 4 / 40, (2 + 6) / 20, (4 + 10) / 40)
    np.testing.assert_allclose(out["gt_box"], [0.1, 0.1, 0.4, 0.35], rtol=1e-6)
  out = _map(many, example)
  np.testing.assert_allclose(out["proposals"], [[0.75, 0.75, 1.0, 1.0], [0, 0, 1, 1]])  # clipped
  empty = _map(many, {**example, "boxes": tf.zeros([0, 4])})
  assert empty["proposals"].shape == (0, 4)


def test_pad_boxes_alone_and_in_map():
  boxes = tf.constant([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]])
  op = registry.get_op("pad_boxes(5)")
  for out in (op({"proposals": boxes}), _map(op, {"proposals": boxes})):
    np.testing.assert_allclose(out["proposals"][:3], boxes.numpy())
    np.testing.assert_array_equal(out["proposals"][3:], 0)
    np.testing.assert_array_equal(out["proposal_mask"], [True, True, True, False, False])
  cut = _map(registry.get_op("pad_boxes(2)"), {"proposals": boxes})
  np.testing.assert_allclose(cut["proposals"], boxes.numpy()[:2])
  assert cut["proposal_mask"].all()
  none = _map(op, {"proposals": tf.zeros([0, 4])})
  assert none["proposals"].shape == (5, 4) and not none["proposal_mask"].any()


def test_specs_flip_only_where_no_side_words():
  cfg = inputs.demo_input(32, 16, "tiny")
  specs = {}
  for fmt in tasks.FORMATS:
    cfg.format = fmt
    cfg.source = "demo"
    demo = tasks.train_pp_spec(cfg)
    assert "scale=(0.85, 1.0)" in demo and "flip" not in demo and "randaug" not in demo
    cfg.source = "json"
    specs[fmt] = tasks.train_pp_spec(cfg)
    crop = "decode|resize(32)|" if fmt == "refcoco" else "scale=(0.5, 1.0)"  # ALBEF Grounding
    assert crop in specs[fmt] and "randaug(2, 7)" in specs[fmt]
    assert "resize(32)" in tasks.eval_pp_spec(cfg) and "flip" not in tasks.eval_pp_spec(cfg)
  assert "|flip|" in specs["vqa"] and "|flip|" in specs["snli_ve"]
  assert "flip" not in specs["nlvr2"] and "flip" not in specs["refcoco"]
  cfg.pp = "decode|resize(32)"
  assert builder.train_pp_spec(cfg).startswith("decode|resize(32)")  # `pp` replaces the default


# ----------------------------------------------------------------------------- demo data


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo_tasks"))
  for task in demo_tasks.TASKS:
    demo_tasks.build_demo_task(task, "tiny", root=root)
  return root


def _demo_entries(root: str, task: str, split: str) -> list[dict]:
  with open(os.path.join(root, f"{task}-tiny", f"{split}.json")) as f:
    return json.load(f)


def _demo_config(task: str, *, with_root: str, **overrides):
  cfg = inputs.demo_input(32, 24, "tiny")
  cfg.format = task
  cfg.data_dir = with_root
  cfg.mlm_prob = 0.0
  cfg.pp = ""
  cfg.probe_examples = 0
  cfg.max_answers = 4
  cfg.answer_max_len = 6
  cfg.max_proposals = 8
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _files(directory: str) -> dict[str, str]:
  out = {}
  for folder, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        out[os.path.relpath(os.path.join(folder, name), directory)] = (
            hashlib.sha256(f.read()).hexdigest())
  return out


def test_demo_builds_are_deterministic(tmp_path):
  small = demo_tasks.DemoTaskConfig("small", num_train=8, num_test=6)
  other_seed = demo_tasks.DemoTaskConfig("small", num_train=8, num_test=6, seed=1)
  for task in demo_tasks.TASKS:
    first = _files(demo_tasks.build_demo_task(task, small, root=str(tmp_path / "a")))
    second = _files(demo_tasks.build_demo_task(task, small, root=str(tmp_path / "b")))
    assert first == second and len(first) > 4
    reseeded = _files(demo_tasks.build_demo_task(task, other_seed, root=str(tmp_path / "c")))
    assert reseeded["train.json"] != first["train.json"]
  assert not [p for p in os.listdir(tmp_path / "a") if ".tmp-" in p]


def _majority(entry: dict) -> str:
  answers = [entry["answer"]] if isinstance(entry["answer"], str) else entry["answer"]
  return collections.Counter(answers).most_common(1)[0][0]


def test_demo_sizes_and_balanced_labels(demo_root):
  for task in demo_tasks.TASKS:
    manifest = demo_tasks.read_manifest(os.path.join(demo_root, f"{task}-tiny"))
    for split, limit in (("train", 128), ("test", 64)):
      assert 60 <= manifest["num_examples"][split] == len(_demo_entries(demo_root, task, split))
      assert manifest["num_examples"][split] <= limit
  for split in ("train", "test"):
    nlvr2 = collections.Counter(e["label"] for e in _demo_entries(demo_root, "nlvr2", split))
    assert nlvr2["True"] == nlvr2["False"]
    ve = collections.Counter(e["label"] for e in _demo_entries(demo_root, "snli_ve", split))
    assert ve["entailment"] == ve["neutral"] == ve["contradiction"]
    yes_no = collections.Counter(_majority(e) for e in _demo_entries(demo_root, "vqa", split)
                                 if e["question_type"] == "exists")
    assert abs(yes_no["yes"] - yes_no["no"]) <= 2
  refcoco = _demo_entries(demo_root, "refcoco", "test")
  assert set(e["split"] for e in refcoco) == {"val", "testA", "testB"}
  for entry in refcoco:
    hits = [demo_tasks.iou_xywh(p, entry["bbox"]) >= 0.5 for p in entry["proposals"]]
    assert sum(hits) == 1 and entry["bbox"] in entry["proposals"]
  manifest = demo_tasks.read_manifest(os.path.join(demo_root, "refcoco-tiny"))
  assert 0.1 < manifest["chance"]["val"] < 0.34


def _scenes(task: str, split: str, index: int) -> list[list[dict]]:
  """The scene(s) behind demo image (pair) `index`, regenerated from its seed."""
  rng = demo_tasks._rng(demo_tasks.CONFIGS["tiny"], task, split, index)
  if task == "refcoco":
    return [demo_tasks._scene_with_objects(rng, 64, 2)[1]["objects"]]
  count = 2 if task == "nlvr2" else 1
  return [demo_data.generate_scene(rng, 64)[1]["objects"] for _ in range(count)]


def _index(path: str) -> int:
  return int(re.search(r"_(\d{5})", path).group(1))


def _has(objects, **attributes) -> bool:
  return any(all(o[k] == v for k, v in attributes.items()) for o in objects)


def _nlvr2_truth(sentence: str, scenes) -> bool:
  sides = {"left": scenes[0], "right": scenes[1]}
  words = {"one": 1, "two": 2, "three": 3}
  if m := re.fullmatch(r"the (\w+) image contains (one|two|three) shapes?", sentence):
    return len(sides[m[1]]) == words[m[2]]
  if m := re.fullmatch(r"the (\w+) image contains an? (\w+) (\w+)", sentence):
    return _has(sides[m[1]], color=m[2], shape=m[3])
  if m := re.fullmatch(r"both images contain an? (\w+) shape", sentence):
    return all(_has(s, color=m[1]) for s in scenes)
  if m := re.fullmatch(r"both images contain an? (\w+)", sentence):
    return all(_has(s, shape=m[1]) for s in scenes)
  m = re.fullmatch(r"the (\w+) image has more shapes than the (\w+) image", sentence)
  return len(sides[m[1]]) > len(sides[m[2]])


def _vqa_truth(question: str, objects) -> str:
  if m := re.fullmatch(r"what color is the (\w+)\?", question):
    (obj,) = [o for o in objects if o["shape"] == m[1]]
    return obj["color"]
  if m := re.fullmatch(r"what shape is the (\w+) one\?", question):
    (obj,) = [o for o in objects if o["color"] == m[1]]
    return obj["shape"]
  if question == "how many shapes are there?":
    return str(len(objects))
  if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
    return "yes" if _has(objects, color=m[1], shape=m[2]) else "no"
  m = re.fullmatch(r"what size is the (\w+) (\w+)\?", question)
  (obj,) = [o for o in objects if o["color"] == m[1] and o["shape"] == m[2]]
  return obj["size"]


def _referent(text: str, objects) -> int:
  """Index of the one object the expression fits (asserts there is exactly one)."""
  if m := re.fullmatch(r"the shape (left of|right of|above|below) the (\w+) (\w+)", text):
    (anchor,) = [o for o in objects if o["color"] == m[2] and o["shape"] == m[3]]
    fits = [k for k, o in enumerate(objects) if o is not anchor and
            demo_data._relation_between(o["bbox"], anchor["bbox"]) == m[1]]
  else:
    words = text.split()[1:]
    wanted = {}
    for word in words:
      key = ("size" if word in demo_data.SIZES else "color" if word in demo_data.COLORS
             else "shape")
      if word != "shape" or len(words) == 1:
        wanted[key] = word
    fits = [k for k, o in enumerate(objects) if all(o[a] == v for a, v in wanted.items())]
  assert len(fits) == 1, (text, objects)
  return fits[0]


def test_demo_texts_are_true_to_the_scenes(demo_root):
  for entry in _demo_entries(demo_root, "nlvr2", "train"):
    truth = _nlvr2_truth(entry["sentence"], _scenes("nlvr2", "train", _index(entry["images"][0])))
    assert truth == (entry["label"] == "True"), entry
  for entry in _demo_entries(demo_root, "vqa", "train"):
    (objects,) = _scenes("vqa", "train", _index(entry["image"]))
    answers = [entry["answer"]] if isinstance(entry["answer"], str) else entry["answer"]
    majority, count = collections.Counter(answers).most_common(1)[0]
    assert majority == _vqa_truth(entry["question"], objects), entry
    assert count >= (1 if entry["dataset"] == "vg" else 7)
  for entry in _demo_entries(demo_root, "refcoco", "test"):
    (objects,) = _scenes("refcoco", "test", _index(entry["image"]))
    target = objects[_referent(entry["text"], objects)]
    assert entry["bbox"] == demo_tasks._xywh(target["bbox"], 64), entry
    relational = entry["text"].startswith("the shape ")
    assert {"testA": not relational, "testB": relational}.get(entry["split"], True)
  for entry in _demo_entries(demo_root, "snli_ve", "train"):
    (objects,) = _scenes("snli_ve", "train", _index(entry["image"]))
    sentence = entry["sentence"]
    if m := re.fullmatch(r"there is an? (?:(small|large) )?(\w+) (\w+)", sentence):
      attributes = dict(color=m[2], shape=m[3], **({"size": m[1]} if m[1] else {}))
      holds = _has(objects, **attributes)
    elif m := re.fullmatch(r"there (?:is|are) (one|two|three) shapes?", sentence):
      holds = len(objects) == ("zero", "one", "two", "three").index(m[1])
    elif m := re.fullmatch(r"the (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)",
                           sentence):
      subject = [o for o in objects if o["color"] == m[1] and o["shape"] == m[2]]
      anchor = [o for o in objects if o["color"] == m[4] and o["shape"] == m[5]]
      holds = bool(subject) and demo_data._relation_between(subject[0]["bbox"],
                                                            anchor[0]["bbox"]) == m[3]
    else:
      m = re.fullmatch(r"the (\w+) (\w+) (.+)", sentence)
      assert entry["label"] == "neutral" and m[3] in demo_tasks._UNDECIDABLE
      assert _has(objects, color=m[1], shape=m[2])  # about a shown object
      continue
    assert holds == (entry["label"] == "entailment") and entry["label"] != "neutral", entry


def test_demo_texts_tokenize_losslessly(demo_root):
  tokenizer = ops_text.load_tokenizer("sentencepiece")
  for task, key, limit in (("vqa", "question", 20), ("nlvr2", "sentence", 24),
                           ("snli_ve", "sentence", 24), ("refcoco", "text", 12)):
    texts = sorted({e[key].rstrip("?") for e in _demo_entries(demo_root, task, "train")})
    ids, mask = tokenizer.encode(texts, 40)
    assert mask.sum(1).max() <= limit, task
    assert tokenizer.decode(ids) == texts
  with open(os.path.join(demo_root, "vqa-tiny", "answer_list.json")) as f:
    answers = json.load(f)
  assert answers == demo_tasks.vqa_answers()   # configs size classifier heads by it
  ids, _ = tokenizer.encode(answers, 6, append_sep=True)
  assert tokenizer.decode(ids) == answers and (ids == SEP).sum(1).tolist() == [1] * len(answers)


# ----------------------------------------------------------------------------- batches

TRAIN_CONTRACT = {
    "vqa": {"image": ((4, 32, 32, 3), np.float32), "text_ids": ((4, 24), np.int32),
            "text_mask": ((4, 24), np.int32), "answer_ids": ((4, 4, 6), np.int32),
            "answer_mask": ((4, 4, 6), np.int32), "answer_weight": ((4, 4), np.float32),
            "image_id": ((4,), np.int32)},
    "nlvr2": {"image0": ((4, 32, 32, 3), np.float32), "image1": ((4, 32, 32, 3), np.float32),
              "text_ids": ((4, 24), np.int32), "text_mask": ((4, 24), np.int32),
              "label": ((4,), np.int32)},
    "snli_ve": {"image": ((4, 32, 32, 3), np.float32), "text_ids": ((4, 24), np.int32),
                "text_mask": ((4, 24), np.int32), "label": ((4,), np.int32)},
    "refcoco": {"image": ((4, 32, 32, 3), np.float32), "text_ids": ((4, 24), np.int32),
                "text_mask": ((4, 24), np.int32), "image_id": ((4,), np.int32)},
}


@pytest.mark.parametrize("task", tasks.FORMATS)
def test_train_batches_follow_the_contract(demo_root, task):
  cfg = _demo_config(task, with_root=demo_root)
  builder.validate_config(cfg)
  it = builder.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                   process_count=1)
  batches = [next(it) for _ in range(2)]
  it.close()
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == TRAIN_CONTRACT[task]
    assert (batch["text_ids"][:, 0] == CLS).all() and not (batch["text_ids"] == SEP).any()
    for key in ("image", "image0", "image1"):
      if key in batch:
        assert -2.5 < batch[key].mean() < 2.5 and batch[key].std() > 0.1  # CLIP-normalised
  if task == "vqa":
    for batch in batches:
      real = batch["answer_weight"] > 0
      assert (batch["answer_ids"][..., 0] == CLS).sum() == real.sum()
      assert ((batch["answer_ids"] == SEP).sum(-1) == real).all()
      assert not batch["answer_ids"][~real].any() and not batch["answer_mask"][~real].any()
      sums = batch["answer_weight"].sum(1)
      assert np.all((np.abs(sums - 1) < 1e-5) | (np.abs(sums - 0.5) < 1e-5))  # VQA | VG
  if "label" in TRAIN_CONTRACT[task]:
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.min() >= 0 and labels.max() < (2 if task == "nlvr2" else 3)


def test_json_source_skips_and_counts_missing_images(image_dir, tmp_path):
  entries = [{"images": [f"img{i % 4}.png", f"img{(i + 1) % 4}.png"], "sentence": f"pair {i}",
              "label": ("True", "False")[i % 2]} for i in range(6)]
  entries.append({"images": ["img0.png", "gone.png"], "sentence": "lost", "label": "True"})
  cfg = inputs.pretrain_input(image_size=16, max_len=8)
  cfg.update(source="json", format="nlvr2", annotations=_write_json(tmp_path / "n.json", entries),
             image_root=str(image_dir), tokenizer=dict(kind="sentencepiece", path=""),
             mlm_prob=0.0, probe_examples=4,
             pp="each_image(\"decode|resize(16)|value_range(0, 1)\")"
                "|clean_caption(30, key='sentence')|tokenize(8, key='sentence')"
                "|class_label(('false', 'true'))")
  it = builder.make_train_iterator(cfg, global_batch_size=3, seed=1, process_index=0,
                                   process_count=1)
  batches = [next(it) for _ in range(4)]
  stats = it.stats()
  it.close()
  assert stats["data_skipped_at_load"] == 1 and stats["data_skipped"] == 0
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.sum() == 6  # two epochs of 3 True and 3 False
  assert batches[0]["image0"].shape == (3, 16, 16, 3)


def test_albef_ops_run_on_a_json_source(image_dir, tmp_path):
  entries = [{"images": [f"img{i}.png", f"img{3 - i}.png"], "sentence": f"The left one, {i}.",
              "label": ("True", "False")[i % 2]} for i in range(4)]
  cfg = inputs.pretrain_input(image_size=16, max_len=8)
  cfg.update(source="json", format="nlvr2", annotations=_write_json(tmp_path / "n.json", entries),
             image_root=str(image_dir), tokenizer=dict(kind="sentencepiece", path=""),
             mlm_prob=0.0, probe_examples=0)
  assert "randaug(2, 7)" in builder.train_pp_spec(cfg)
  it = builder.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0,
                                   process_count=1)
  batch = next(it)
  it.close()
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "image0": ((2, 16, 16, 3), np.float32), "image1": ((2, 16, 16, 3), np.float32),
      "text_ids": ((2, 8), np.int32), "text_mask": ((2, 8), np.int32), "label": ((2,), np.int32)}


def test_config_checks_name_the_field(demo_root):
  cfg = _demo_config("vqa", with_root=demo_root, format="vqa2")
  with pytest.raises(ValueError, match="config.input.format = 'vqa2'"):
    builder.validate_config(cfg)
  with pytest.raises(ValueError, match="reads sources"):
    builder.validate_config(_demo_config("vqa", with_root=demo_root, source="tfds"))
  with pytest.raises(ValueError, match="splits.*'val'"):
    tasks.make_eval_data(_demo_config("nlvr2", with_root=demo_root), split="val", batch_size=4)


@pytest.mark.parametrize("task", tasks.FORMATS)
def test_eval_data_matches_the_annotations(demo_root, task):
  cfg = _demo_config(task, with_root=demo_root)
  data = tasks.make_eval_data(cfg, split="test", batch_size=24)
  entries = _demo_entries(demo_root, task, "test")
  assert data.num_examples == len(entries)
  batches = list(data.batches())
  assert len(batches) == -(-len(entries) // 24)
  expected = set(tasks.EVAL_FIELDS[task]) | {"index", "valid"}
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index[:len(entries)], np.arange(len(entries)))
  np.testing.assert_array_equal(valid, index >= 0)
  for batch in batches:
    assert set(batch) == expected and all(len(v) == 24 for v in batch.values())
    for key in tasks.EVAL_FIELDS[task]:
      assert not batch[key][~batch["valid"]].any(), key  # padding rows are zero
  fields = {k: np.concatenate([b[k] for b in batches])[:len(entries)]
            for k in tasks.EVAL_FIELDS[task]}
  assert fields["text_ids"].dtype == np.int32 and (fields["text_ids"][:, 0] == CLS).all()
  image_key = "image0" if task == "nlvr2" else "image"
  assert fields[image_key].shape[1:] == (32, 32, 3) and fields[image_key].dtype == np.float32
  assert data.num_invalid_examples == 0 and data.num_failed_examples == 0
  if task == "vqa":
    assert data.question_ids == [e["question_id"] for e in entries]
    assert data.answers == [e["answer"] for e in entries]
    assert data.answer_list == json.load(open(os.path.join(demo_root, "vqa-tiny",
                                                           "answer_list.json")))
    assert data.candidate_ids.shape == (len(data.answer_list), 6)
    np.testing.assert_array_equal(data.candidate_ids[:, 0], CLS)
    assert (data.candidate_ids == SEP).sum() == len(data.answer_list)
  elif task == "nlvr2":
    np.testing.assert_array_equal(fields["label"], [e["label"] == "True" for e in entries])
    np.testing.assert_array_equal(data.labels, fields["label"])
  elif task == "snli_ve":
    np.testing.assert_array_equal(
        fields["label"], [tasks.SNLI_VE_CLASSES.index(e["label"]) for e in entries])
  else:
    assert data.split_names == ["val", "testA", "testB"]
    np.testing.assert_array_equal(fields["split_id"],
                                  [data.split_names.index(e["split"]) for e in entries])
    for row, entry in enumerate(entries):
      x, y, w, h = entry["bbox"]
      np.testing.assert_allclose(fields["gt_box"][row], np.array([y, x, y + h, x + w]) / 64,
                                 atol=1e-6)
      count = len(entry["proposals"])
      np.testing.assert_array_equal(fields["proposal_mask"][row], np.arange(8) < count)
      x, y, w, h = np.asarray(entry["proposals"]).T
      np.testing.assert_allclose(fields["proposals"][row, :count],
                                 np.stack([y, x, y + h, x + w], 1) / 64, atol=1e-6)


def test_eval_data_splits_rows_over_processes(demo_root):
  cfg = _demo_config("snli_ve", with_root=demo_root)
  parts = [tasks.make_eval_data(cfg, split="test", batch_size=8, process_index=i,
                                process_count=2) for i in range(2)]
  num = parts[0].num_examples  # 63: 32 and 31 rows -> 4 batches each
  seen = []
  for index, part in enumerate(parts):
    batches = list(part.batches())
    assert len(batches) == 4
    rows = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(rows[rows >= 0], np.arange(index, num, 2))
    labels = np.concatenate([b["label"] for b in batches])[rows >= 0]
    np.testing.assert_array_equal(labels, part.labels[rows[rows >= 0]])
    seen += list(rows[rows >= 0])
  assert sorted(seen) == list(range(num))


def test_answer_list_defaults_to_train_answers(image_dir, tmp_path):
  train = [{"question_id": 1, "question": "q1", "image": "img0.png", "answer": ["b", "a", "b"]},
           {"question_id": 2, "question": "q2", "image": "img1.png", "answer": "c",
            "dataset": "vg"},
           {"question_id": 3, "question": "q3", "image": "gone.png", "answer": ["a", "a"]}]
  cfg = inputs.pretrain_input(image_size=16, max_len=8)
  cfg.update(source="json", format="vqa", annotations=_write_json(tmp_path / "t.json", train),
             image_root=str(image_dir))
  assert tasks.load_answer_list(cfg) == ["a", "b", "c"]  # a: 3, b: 2, c: 1
  cfg.answer_list = _write_json(tmp_path / "answers.json", ["yes", "no"])
  assert tasks.load_answer_list(cfg) == ["yes", "no"]
  cfg.answer_list = _write_json(tmp_path / "bad_answers.json", ["yes", 3])
  with pytest.raises(ValueError, match=r"bad_answers\.json: entry 1"):
    tasks.load_answer_list(cfg)
