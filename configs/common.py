"""Shared config presets: model sizes, optimizer recipes, sharding, eval and checkpoint blocks.

Each method config (`albef.py`, `mamo.py`, ...) starts from `base_config(arg)` and changes what
makes the method. `arg` is `""` (the full recipe), `"tiny"` (seconds-long CPU run for tests) or
`"demo"` (minutes on a CPU, on the embedded demo data), optionally followed by `,key=value`
pairs such as `demo,steps=300` or `res=384,batch=64`.
"""
import ml_collections

CLIP_MEAN_STD = "clip"


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """"tiny,steps=10" -> ConfigDict(size='tiny', steps=10, ...defaults)."""
  out = ml_collections.ConfigDict(dict(size="", **defaults))
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in out:
        raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
      out[key] = type(out[key])(value) if out[key] is not None else value
    elif part in ("tiny", "demo"):
      out.size = part
    else:
      raise ValueError(f"unknown config argument {part!r}; use tiny, demo or key=value")
  return out


def vit_b16(image_size: int = 256) -> dict:
  return dict(image_size=image_size, patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0,
              layer_norm_eps=1e-6, attention_impl="")


def bert_base(text_layers: int = 6, fusion_layers: int = 6) -> dict:
  return dict(vocab_size=30522, width=768, num_heads=12, mlp_dim=3072, text_layers=text_layers,
              fusion_layers=fusion_layers, max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12,
              dropout=0.1, attention_dropout=0.1)


def tiny_vision(image_size: int = 32) -> dict:
  return dict(image_size=image_size, patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0,
              attention_impl="")


def tiny_text(vocab_size: int) -> dict:
  return dict(vocab_size=vocab_size, width=32, num_heads=2, mlp_dim=64, text_layers=2, fusion_layers=2,
              max_positions=64, dropout=0.1, attention_dropout=0.1)


def demo_vision() -> dict:
  return dict(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_ratio=2.0)


def demo_text(vocab_size: int) -> dict:
  return dict(vocab_size=vocab_size, width=128, num_heads=4, mlp_dim=256, text_layers=2, fusion_layers=2,
              max_positions=64, dropout=0.1, attention_dropout=0.0)


def albef_objectives(queue_size: int = 65536) -> dict:
  return dict(itc=dict(weight=1.0, distill=True, id_positives=False, queue_size=queue_size),
              itm=dict(weight=1.0, scope="local"),
              mlm=dict(weight=1.0, distill=True))


def albef_optim(lr: float = 1e-4, epochs: int = 30) -> dict:
  """ALBEF pretraining: AdamW 1e-4, wd 0.02, the code's step-warm-up + per-epoch cosine."""
  return dict(name="adamw", lr=lr, weight_decay=0.02, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0,
              schedule=dict(name="albef", warmup_lr=1e-5, warmup_steps=2000, warmup_step_every=100,
                            min_lr=1e-5, epochs=epochs),
              freeze=(), lr_mult=())


def demo_optim(lr: float = 1e-3) -> dict:
  return dict(name="adamw", lr=lr, weight_decay=0.02, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
              schedule=dict(name="warmup_cosine", warmup_init=0.0, warmup_steps=20, min_lr=1e-5),
              freeze=(), lr_mult=())


def remat_field(policy: str = "none") -> ml_collections.FieldReference:
  """`config.model.remat`: a policy name of `vlpjax.models.layers.REMAT_POLICIES` ('none', 'full',
  'dots', 'dots_all'), typed `object` so that old configs and flags giving True / False (= 'full' /
  'none') still override it (a str field would refuse a bool)."""
  return ml_collections.FieldReference(policy, field_type=object)


def base_config(arg: str, **arg_defaults) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The ALBEF 4M recipe (docs/method_spec.md §1.3), shrunk by `tiny` / `demo`. Returns (config, args)."""
  from input_pipeline import inputs  # input blocks live beside the pipeline they configure
  args = parse_arg(arg, steps=0, batch=0, res=0, **arg_defaults)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 512
  c.num_epochs = 30
  c.total_steps = 0
  c.steps_per_epoch = 0
  # The EMA teacher (ALBEF's momentum model): momentum 0 would mean no teacher at all.
  c.teacher = dict(momentum=0.995, alpha=0.4, alpha_ramp_steps=-1)
  c.model = dict(vision=vit_b16(256), text=bert_base(), fusion="cross", embed_dim=256,
                 heads=("itc", "itm", "mlm"), dtype="bfloat16", remat=remat_field(),
                 scan_layers=False)   # True: each tower's layers as one nn.scan (docs/benchmarks.md)
  c.objectives = albef_objectives()
  c.optim = albef_optim()
  c.sharding = dict(mesh=dict(data=-1, fsdp=1, tensor=1), rules="dp")
  c.input = inputs.pretrain_input(image_size=256, max_len=25)
  c.eval = dict(every_steps=0, split="test", batch_size=256, k_test=0)
  c.checkpoint = dict(every_steps=2000, max_to_keep=3, async_save=True)
  c.log_every_steps = 100
  # init_from: a finetuning start (params only). allow_mismatch accepts a checkpoint whose
  # architecture differs from config.model; model_from_checkpoint takes the architecture from it.
  c.init_from = dict(path="", dont_load=(), allow_mismatch=False, model_from_checkpoint=False)
  c.resume_from = ""
  c.stages = ()

  if args.size == "tiny":
    c.batch_size = 16
    c.total_steps = 4
    c.steps_per_epoch = 2
    c.objectives.itc.queue_size = 32
    c.model.vision = tiny_vision(32)
    c.model.text = tiny_text(inputs.DEMO_VOCAB_SIZE)
    c.model.dtype = "float32"
    c.optim = demo_optim(1e-3)
    c.optim.schedule.warmup_steps = 1
    c.input = inputs.demo_input(image_size=32, max_len=16, config="tiny")
    c.input.patch_size = 8
    c.eval = dict(every_steps=4, split="test", batch_size=32, k_test=0)
    c.checkpoint = dict(every_steps=2, max_to_keep=2, async_save=True)
    c.log_every_steps = 1
  elif args.size == "demo":
    c.batch_size = 64
    c.total_steps = 400
    c.steps_per_epoch = 0
    # No queue: trained from scratch, the towers start with near-identical features, and a queue of
    # stale copies of them dominates the early ITC gradient (measured: in-batch ITC accuracy stays
    # at chance for 200 steps with a 256-row queue, reaches 22% by step 150 without one).
    c.objectives.itc.queue_size = 0
    c.model.vision = demo_vision()
    c.model.text = demo_text(inputs.DEMO_VOCAB_SIZE)
    c.model.dtype = "float32"
    # Trained from scratch in minutes (ALBEF starts from DeiT + BERT): a higher learning rate and
    # a faster-moving teacher; momentum 0.995 lags ~200 steps, a third of the whole demo run.
    c.optim = demo_optim(1e-3)
    c.teacher.momentum = 0.9
    c.input = inputs.demo_input(image_size=64, max_len=24, config="default")
    c.input.patch_size = 8
    c.eval = dict(every_steps=200, split="test", batch_size=250, k_test=0)
    c.checkpoint = dict(every_steps=200, max_to_keep=2, async_save=True)
    c.log_every_steps = 25
  if args.steps:
    c.total_steps = args.steps
  if args.batch:
    c.batch_size = args.batch
  if args.res:
    c.model.vision.image_size = args.res
    c.input.image_size = args.res  # the op strings read it as {image_size}
  return c, args


def shrink_finetune(config: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
  """Length and optimiser of a `demo` (300 steps, lr 1e-4: a tenth of the demo pretraining's) or
  `tiny` (4 steps) finetune; `args.steps` overrides the length."""
  demo = args.size == "demo"
  config.total_steps = args.steps or (300 if demo else 4)
  config.optim = demo_optim(1e-4 if demo else 3e-4)
  config.optim.schedule.warmup_steps = 10 if demo else 1
  config.teacher.alpha_ramp_steps = 50 if demo else 2


def finetune_config(arg: str, *, fmt: str, kind: str, objectives: dict, eval_kind: str, resolution: int,
                    max_len: int, lr: float, epochs: int, batch: int, num_train_examples: int,
                    warmup_steps: int = 100, heads: tuple = (),
                    ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """A downstream-task finetuning config (ALBEF's protocols, docs/method_spec.md §1.4).

  `arg` as `base_config`: "" = the full recipe on real data given by path (JSON of the task's
  format + image root), "demo" = the task's demo dataset on the demo model (minutes on a CPU),
  "tiny" = tests. Every size starts from a pretrained checkpoint (`--config.init_from.path`).

  Full recipe: AdamW `lr`, wd 0.02, ALBEF's step warm-up from 1e-5 over `warmup_steps`
  iterations (one step per 100), then a per-epoch cosine to 1e-6; alpha 0.4 ramped over epoch 0.
  """
  from input_pipeline import inputs
  config, args = base_config(arg)
  config.model.kind = kind
  config.model.heads = heads
  config.objectives = objectives
  config.input.mlm_prob = 0.0
  config.input.format = fmt
  config.input.pp = ""  # the task's default ops (input_pipeline.tasks.train_pp_spec)
  config.eval = dict(every_steps=0, split="test", batch_size=256, kind=eval_kind)
  if not args.size:
    config.batch_size = args.batch or batch
    config.num_epochs = epochs
    config.model.vision.image_size = args.res or resolution
    config.input.image_size = args.res or resolution
    config.input.max_len = max_len
    config.input.num_train_examples = num_train_examples
    config.optim = albef_optim(lr=lr, epochs=epochs)
    config.optim.schedule.warmup_lr = 1e-5
    config.optim.schedule.warmup_steps = warmup_steps
    config.optim.schedule.min_lr = 1e-6
    config.eval.every_steps = max(1, num_train_examples // config.batch_size)  # every epoch, as ALBEF
    config.checkpoint.every_steps = config.eval.every_steps
    return config, args
  demo = args.size == "demo"
  config.input = inputs.demo_input(image_size=config.model.vision.image_size, max_len=config.input.max_len,
                                   config="default" if demo else "tiny")
  config.input.format = fmt
  config.input.pp = ""
  config.input.mlm_prob = 0.0
  config.input.patch_size = config.model.vision.patch_size
  config.input.num_train_examples = 3000 if demo else 128  # the demo task sets' train sizes
  shrink_finetune(config, args)
  config.eval.every_steps = config.total_steps
  config.eval.batch_size = 256 if demo else 32
  if args.batch:
    config.batch_size = args.batch
  return config, args
