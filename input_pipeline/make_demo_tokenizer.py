"""Trains the demo SentencePiece model shipped as `input_pipeline/assets/demo_sp.model`.

    python -m input_pipeline.make_demo_tokenizer [--output PATH]

A unigram model trained on 20,000 cleaned demo captions in which every word the caption
generator can produce is one piece, and every other lower-case word or number falls back to
single characters (no [UNK] for cleaned English text). Ids: pad=0, unk=1, [CLS]=2, [SEP]=3,
[MASK]=4; no bos/eos (ALBEF frames text as `[CLS] tokens`). The normaliser only maps A-Z to
a-z (the tokenize op lower-cases all scripts), which keeps the file at ~2 KB; the default NFKC
tables alone would add ~240 KB. Training is single-threaded, so the file is reproducible byte
for byte.

The seed pieces are given explicitly (every caption word, weighted by its count): SentencePiece's
own seed search only proposes substrings followed by varying characters, which misses words
that are always followed by a space inside a caption (`▁and`, `▁left`), and they would be split.
"""
import argparse
import collections
import io
import os
import re
import string
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from input_pipeline import demo_data

MAX_VOCAB_SIZE = 128  # an upper bound: the model keeps words + characters (99 pieces today)
NUM_CAPTIONS = 20_000
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]")
# Single pieces for every lower-case letter and digit, so that cleaned English text of any
# kind tokenizes without [UNK], not just the words of the demo captions.
REQUIRED_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
DEFAULT_OUTPUT = os.path.join(os.path.dirname(__file__), "assets", "demo_sp.model")


def _clean(caption: str) -> str:
  """Drops the punctuation (`,` and `:`) that `clean_caption` removes before tokenizing."""
  return re.sub(r"[^a-z0-9 ]", "", caption.lower())


def train_demo_tokenizer(num_captions: int = NUM_CAPTIONS) -> bytes:
  """Returns the serialised SentencePiece model trained on `num_captions` demo captions."""
  captions = [_clean(c) for c in demo_data.demo_captions(num_captions)]
  word_counts = collections.Counter(w for c in captions for w in c.split())
  model = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    seeds_path = os.path.join(tmp, "seeds.tsv")
    with open(seeds_path, "w", encoding="utf-8") as f:
      for word, count in sorted(word_counts.items()):
        f.write(f"\u2581{word}\t{count}\n")
    lowercase_rules_path = os.path.join(tmp, "lowercase.tsv")
    with open(lowercase_rules_path, "w", encoding="utf-8") as f:
      for upper in string.ascii_uppercase:
        f.write(f"{ord(upper):X}\t{ord(upper.lower()):X}\n")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        model_type="unigram",
        vocab_size=MAX_VOCAB_SIZE,
        hard_vocab_limit=False,
        seed_sentencepieces_file=seeds_path,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=list(SPECIAL_TOKENS),
        normalization_rule_tsv=lowercase_rules_path,
        character_coverage=1.0,
        required_chars=REQUIRED_CHARS,
        num_threads=1,
        minloglevel=2,
    )
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  # The specs record the temporary file paths; dropping them keeps the file reproducible.
  proto.trainer_spec.ClearField("seed_sentencepieces_file")
  proto.normalizer_spec.ClearField("normalization_rule_tsv")
  return proto.SerializeToString(deterministic=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write the model")
  args = parser.parse_args()
  model = train_demo_tokenizer()
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "wb") as f:
    f.write(model)
  print(f"wrote {args.output} ({len(model)} bytes)")


if __name__ == "__main__":
  main()
