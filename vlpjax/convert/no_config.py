"""The default of `python -m vlpjax.convert --config`: no config file, only the model dims the
checkpoint holds; `--config.model.<field>=V` overrides add to them (e.g. the head counts the
weights' shapes cannot give: `--config.model.text.num_heads=12`)."""
import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(model=dict(vision={}, text={})))
