"""Visual-concept ops (ViCHA): concept words of the embedded demo scenes.

Registered op (`factory(...) -> fn(example) -> example`, TF ops only):

    demo_concepts(error_rate=0.2, top_k=15, seed=0, out="concepts")

Real data carries CLIP's concept words (`kwords` of ViCHA's JSON files, read into `concepts`
by the sources). The demo set has no CLIP to run, so this op stands in for it inside tf.data,
with the rule of `input_pipeline.concepts.demo_kwords` (which the offline `concepts demo` command
uses): the scene's object words (colour then shape of each object, in object order, without
repeats, cut to `top_k`), each replaced by a distractor with probability `error_rate` (a stand-in
for a CLIP mistake), then distractors up to `top_k`; distractors are drawn without repetition from
the demo vocabulary (`concepts.demo_vocabulary()`) minus the scene's words. The draws are seeded by
(`seed`, `image_id`), not by the example's seed: an image's concept list is a fixed property of
the image (as CLIP's top words are), the same in every epoch, in training and in evaluation, and on
any process. The lists equal `demo_kwords`'s in distribution, not word for word (TensorFlow's
random streams are not NumPy's). The ViCHA feeding ops (`concepts_to_text`, `tokenize`) then
run on `example[out]` as on real `kwords`.
"""
import tensorflow as tf

from input_pipeline import concepts
from input_pipeline import registry

_SALT = 0x5C0CE


def _words(example: dict, key: str) -> tf.Tensor:
  if key not in example:
    raise KeyError(f"demo_concepts: example has no {key!r} (it reads the demo scenes' objects/color and "
                   f"objects/shape: use it on config.input.source='demo'); keys: {sorted(example)}")
  return example[key]


@registry.register("demo_concepts")
def get_demo_concepts(error_rate: float = 0.2, top_k: int = concepts.DEFAULT_TOP_K, seed: int = 0,
                      out: str = "concepts"):
  """Writes `example[out]`, string [<= top_k], the demo scene's stand-in concept words.

  Reads `objects/color`, `objects/shape` (string [objects]) and `image_id` (int). See the
  module docstring for the rule.
  """
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f"demo_concepts: error_rate={error_rate} is not in [0, 1]")
  if top_k < 1:
    raise ValueError(f"demo_concepts: top_k={top_k} must be >= 1")
  vocab = list(concepts.demo_vocabulary())

  def fn(example):
    colors, shapes = _words(example, "objects/color"), _words(example, "objects/shape")
    image_id = tf.cast(_words(example, "image_id"), tf.int64)
    vocab_words = tf.constant(vocab, tf.string)
    words = tf.reshape(tf.stack([colors, shapes], axis=1), [-1])  # c0, s0, c1, s1, ...
    scene = tf.unique(words).y[:top_k]                              # first occurrences, in order
    num_scene = tf.shape(scene)[0]
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, _SALT], tf.int64), image_id)
    order_seed, replace_seed = tf.unstack(tf.random.experimental.stateless_split(base, 2))
    in_scene = tf.reduce_any(tf.equal(vocab_words[:, None], scene[None, :]), axis=1)
    # Pool words first in a random order; the scene's words (never distractors) sort last.
    noise = tf.random.stateless_uniform([len(vocab)], order_seed)
    distractors = tf.gather(vocab_words, tf.argsort(tf.where(in_scene, 2.0, noise)))
    num_pool = len(vocab) - tf.reduce_sum(tf.cast(in_scene, tf.int32))
    replaced = tf.random.stateless_uniform([num_scene], replace_seed) < error_rate
    rank = tf.cumsum(tf.cast(replaced, tf.int32)) - 1   # the k-th replaced word takes distractor k
    take = replaced & (rank < num_pool)                  # kept as is once the pool runs out
    listed = tf.where(take, tf.gather(distractors, tf.clip_by_value(rank, 0, len(vocab) - 1)), scene)
    used = tf.reduce_sum(tf.cast(take, tf.int32))
    fill = tf.minimum(top_k - num_scene, num_pool - used)
    return {**example, out: tf.concat([listed, distractors[used:used + fill]], axis=0)}

  return fn
