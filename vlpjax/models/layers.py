"""Shared Flax building blocks: dense layers with logical axes, attention, MLPs.

Params are float32; `dtype` is the compute dtype. Every param carries logical axis names
(`embed`, `mlp`, `heads`, `vocab`, ...) that `vlpjax.sharding` maps to mesh axes.
"""
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# BERT and timm's ViT both initialise weights with a (truncated) normal of std 0.02.
default_kernel_init = nn.initializers.truncated_normal(0.02)


def with_axes(init: Initializer, axes: tuple[Optional[str], ...]) -> Initializer:
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """A dense layer whose kernel [in, out] and bias [out] carry logical axis names."""
  features: int
  kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    return nn.Dense(
        self.features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=with_axes(self.kernel_init, self.kernel_axes),
        bias_init=with_axes(nn.initializers.zeros, (self.kernel_axes[1],)),
        name="dense",
    )(x)


class LayerNorm(nn.Module):
  """LayerNorm with scale/bias on the `embed` axis; statistics are computed in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(
        epsilon=self.epsilon,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        scale_init=with_axes(nn.initializers.ones, ("embed",)),
        bias_init=with_axes(nn.initializers.zeros, ("embed",)),
        name="norm",
    )(x.astype(jnp.float32)).astype(self.dtype)


# ----------------------------------------------------------------------------- rematerialisation

# `config.model.remat`: what each transformer layer (ViT block, text layer, fusion layer) keeps
# for the backward pass; the rest is recomputed there from the layer's input. Names -> the
# `jax.checkpoint_policies` policy of `nn.remat`; 'none' (None) is no rematerialisation at all.
REMAT_POLICIES = {
    # Every activation kept (no remat): the most memory, no recompute.
    "none": None,
    # Only each layer's input kept; the whole layer forward is recomputed (~1/3 more matmul FLOPs).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Matmuls without batch dimensions kept: the dense projections (query/key/value/out, both MLP
    # matmuls). Recomputed: LayerNorms, GELU, the attention core (scores, softmax, context: batched
    # matmuls, or the fused kernel), dropout. Little recompute; about half the memory of 'none'.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul output kept, the attention scores [B, heads, L, L] included: recomputes only
    # elementwise work; more memory than 'dots' (mainly there for measuring).
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}


class RematPolicy(str):
  """A canonical `REMAT_POLICIES` name; false only for 'none', so `if cfg.remat:` written for the
  old boolean flag still means "some rematerialisation"."""

  def __bool__(self):
    return self != "none"


def remat_policy(value) -> RematPolicy:
  """`config.model.remat` -> a canonical policy name.

  Accepts the names of `REMAT_POLICIES` and, for old configs and command lines, booleans
  (True -> 'full', False -> 'none', also as the strings 'true' / 'false', any case).
  """
  if isinstance(value, (bool, np.bool_)) or value is None:
    return RematPolicy("full" if value else "none")
  name = str(value).strip().lower()
  name = {"true": "full", "false": "none", "": "none"}.get(name, name)
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={value!r}; known policies: {sorted(REMAT_POLICIES)} (or True / False)")
  return RematPolicy(name)


def remat(module_class, policy, static_argnums: tuple[int, ...] = ()):
  """`module_class` rematerialised under `policy` (a `remat_policy` value); 'none' returns it as is.

  `static_argnums` counts `self` as argument 0 (Flax): e.g. BERT layers pass (5,) for their
  positional `deterministic`, which must be static.
  """
  name = remat_policy(policy)
  if name == "none":
    return module_class
  return nn.remat(module_class, static_argnums=static_argnums, policy=REMAT_POLICIES[name])


# ----------------------------------------------------------------------------- scanned layer stacks

# `config.model.scan_layers`: a tower's layers as one `nn.scan` over a single layer body whose
# params carry a leading [layers] axis (logical name 'layers', never sharded), so XLA compiles one
# layer instead of `depth` copies. Sown attention and Grad-CAM perturbation points are stacked the
# same way. `vlpjax.models.layout` converts params between this layout and the unrolled one.
SCAN_VARIABLE_AXES = {"params": 0, "intermediates": 0, "perturbations": 0}
LAYERS_AXIS = "layers"


def scan_stack(body_class, length: int, policy, in_axes: tuple):
  """`body_class` (a layer whose `__call__(carry, *args)` returns (carry, per-layer output)) scanned
  `length` times, each iteration rematerialised under `policy` (a `remat_policy` value).

  `in_axes` gives each non-carry argument's axis: `nn.broadcast` (the same for every layer) or 0
  (a per-layer slice, e.g. a stacked key/value cache). Returns the module class; per-layer outputs
  come back stacked on a leading [length] axis.
  """
  name = remat_policy(policy)
  if name != "none":
    body_class = nn.remat(body_class, policy=REMAT_POLICIES[name], prevent_cse=False)
  return nn.scan(body_class, variable_axes=SCAN_VARIABLE_AXES, split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


def key_padding_mask(mask: Optional[jax.Array]) -> Optional[jax.Array]:
  """[batch, keys] {0,1} -> bool [batch, 1, 1, keys], broadcastable over heads and queries."""
  if mask is None:
    return None
  return mask.astype(bool)[:, None, None, :]


ATTENTION_IMPLEMENTATIONS = ("", "xla", "cudnn")
# cuDNN's fused attention refuses odd sequence lengths in training (ViT's 1 + 256 tokens);
# `padded_dot_product_attention` rounds them up to a multiple of this.
CUDNN_LENGTH_MULTIPLE = 8
# The default implementation uses cuDNN from this many scores per head (q_len * kv_len) up.
CUDNN_MIN_SCORES = 128 * 128


def _prefer_cudnn(query, key) -> bool:
  """The default ('') picks cuDNN's fused kernel on GPUs for 16-bit compute and long sequences.

  Measured on an H100 (bf16, 12 heads of 64, fwd + bwd, B=128): 257 tokens 0.97 ms against
  XLA's 2.30; 30 tokens 0.14 ms against XLA's 0.10, so short sequences keep XLA.
  """
  return (jax.default_backend() == "gpu" and jnp.dtype(query.dtype) in (jnp.bfloat16, jnp.float16)
          and query.shape[1] * key.shape[1] >= CUDNN_MIN_SCORES)


def padded_dot_product_attention(query, key, value, mask=None, *, multiple: int,
                                 implementation: Optional[str] = None):
  """`jax.nn.dot_product_attention` with q/kv lengths zero-padded up to a multiple of `multiple`.

  Padded keys are masked out (by `key_value_seq_lengths`, or by extending a given boolean
  mask [batch, 1|heads, 1|q, kv] with False); padded query rows are dropped from the result,
  so it equals the unpadded attention, gradients included.
  """
  batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
  q_pad, kv_pad = -q_len % multiple, -kv_len % multiple

  def pad(x, n):
    return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x

  kv_lengths = None
  if mask is None:
    if kv_pad:
      kv_lengths = jnp.full((batch,), kv_len, jnp.int32)
  else:
    # cuDNN wants the mask (a bias to it) at full query and key length.
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, 0)), constant_values=True)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, kv_pad)), constant_values=False)
  out = jax.nn.dot_product_attention(pad(query, q_pad), pad(key, kv_pad), pad(value, kv_pad), mask=mask,
                                     key_value_seq_lengths=kv_lengths, implementation=implementation)
  return out[:, :q_len]


class KeyValue(NamedTuple):
  """Projected keys and values of an attention, [batch, kv_len, heads, head_dim] each: a cache that
  `Attention` takes in place of `inputs_kv` (see its `key_value_only`)."""
  key: jax.Array
  value: jax.Array


class Attention(nn.Module):
  """Multi-head attention with separate query/key/value projections (BERT / ViT layout).

  `inputs_q` [batch, q_len, width_q] attends to `inputs_kv` [batch, kv_len, width_kv]; the
  key/value projections map width_kv -> num_heads * head_dim, so cross-attention to a vision
  tower of another width needs no extra adapter. Without attention-probability dropout the
  computation goes through `jax.nn.dot_product_attention`, which picks a fused kernel on GPU.
  With `sow_weights` the attention probabilities [batch, heads, q_len, kv_len] are stored in the
  `intermediates` collection and pass through a Flax `perturb` point of the same name (collection
  `perturbations`): a no-op unless the caller supplies that collection, whose gradient is then the
  gradient w.r.t. the probabilities (Grad-CAM). This forces the explicit softmax path.
  `implementation` picks the fused kernel: 'xla', 'cudnn' (sequences padded to a multiple of
  `CUDNN_LENGTH_MULTIPLE`, `padded_dot_product_attention`), or '' = cuDNN on a GPU with 16-bit
  compute for long sequences (`CUDNN_MIN_SCORES`) when cuDNN accepts the shapes, XLA otherwise.

  Key/value cache (the ITM rerank's per-image cache): `key_value_only=True` returns the
  `KeyValue` projections of `inputs_kv` (`inputs_q` is not used); a `KeyValue` given as
  `inputs_kv` skips the key/value projections. Its batch G may be smaller than the queries'
  batch B = G * S: then each run of S consecutive query sequences attends to the same keys and
  values (one attention over those sequences' S * q_len queries side by side, which equals S
  separate ones: attention is computed per query row), and `mask` is the keys' [G, kv_len];
  sown probabilities then have that grouped shape [G, heads, S * q_len, kv_len].
  """
  num_heads: int
  out_features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  sow_weights: bool = False
  implementation: str = ""

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None, *, deterministic=True, key_value_only=False):
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"unknown attention implementation {self.implementation!r}; known: "
                       f"{ATTENTION_IMPLEMENTATIONS}")
    inner = self.out_features
    if inner % self.num_heads:
      raise ValueError(f"width {inner} is not divisible by {self.num_heads} heads")
    head_dim = inner // self.num_heads

    def project(name, x):
      y = Dense(inner, ("embed", "heads"), dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

    if isinstance(inputs_kv, KeyValue):
      key, value = inputs_kv
    else:
      key = project("key", inputs_kv)      # [batch, kv_len, heads, head_dim]
      value = project("value", inputs_kv)  # [batch, kv_len, heads, head_dim]
      if key_value_only:
        return KeyValue(key, value)
    query = project("query", inputs_q)   # [batch, q_len, heads, head_dim]
    batch, q_len = query.shape[:2]
    if key.shape[0] != batch:   # a cache of G = batch / S key/value sequences, S queries each
      if batch % key.shape[0]:
        raise ValueError(f"{batch} query sequences do not split evenly over {key.shape[0]} cached key/value "
                         "sequences")
      query = query.reshape(key.shape[0], -1, *query.shape[2:])   # [G, S * q_len, heads, head_dim]
    bool_mask = key_padding_mask(mask)

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    if use_dropout or self.sow_weights:
      scale = head_dim ** -0.5
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
      if bool_mask is not None:
        logits = jnp.where(bool_mask, logits, jnp.finfo(jnp.float32).min)
      weights = jax.nn.softmax(logits, axis=-1)
      if self.sow_weights:
        self.sow("intermediates", "attention_weights", weights)
        weights = self.perturb("attention_weights", weights)
      if use_dropout:
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    else:
      context = None
      if self.implementation == "cudnn" or (self.implementation == "" and _prefer_cudnn(query, key)):
        try:
          context = padded_dot_product_attention(query, key, value, bool_mask,
                                                 multiple=CUDNN_LENGTH_MULTIPLE, implementation="cudnn")
        except (NotImplementedError, ValueError):  # cuDNN refuses: only the default falls back
          if self.implementation == "cudnn":
            raise
      if context is None:
        context = jax.nn.dot_product_attention(query, key, value, mask=bool_mask, implementation="xla")
    context = context.reshape(batch, q_len, inner)
    return Dense(self.out_features, ("heads", "embed"), dtype=self.dtype, name="out")(context)


class Mlp(nn.Module):
  """Two dense layers with a GELU between them: width -> hidden -> width."""
  hidden: int
  out_features: int
  dropout_rate: float = 0.0
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    x = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = Dense(self.out_features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Normalises the last axis to unit L2 norm (F.normalize semantics), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
