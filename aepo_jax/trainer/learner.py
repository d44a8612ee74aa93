"""The learner: the policy's parameters, the optimiser, and two jitted, sharded functions.

* :meth:`Learner.logprobs` - log pi(o_t) at temperature 1 and the full-distribution entropy of
  every response token of a :class:`~aepo_jax.trainer.batch.Batch` (old log-probs, and the
  paper-exact entropy signal of AEPO's controller).
* :meth:`Learner.update` - one optimiser update on one mini-batch: micro-batches scanned inside
  the jit with the mini-batch's global loss denominators (so the loss and gradient do not depend
  on the micro-batch size or the device count), global-norm clipping, AdamW, and a skip of the
  whole update when the loss or the gradient is not finite.

On-policy updates (``LearnerSpec.reuse_old_logp``: one epoch of one mini-batch, as in the paper)
use ``stop_gradient(log pi_theta)`` as log pi_old: before the update theta = theta_old, so this is
the same number without a separate forward pass. The update then also returns the policy's
entropy on the batch's main-rollout rows (``policy/entropy_full``, ``policy/entropy_nll``; ``LearnerSpec.entropy_signal``) from
its own forward pass: the signal the controller reads at the next step.

Parameters live as an ``nnx.State`` sharded by the model's logical-axis rules over the mesh; the
batch's row dimension is sharded over the mesh's ``data`` axis. Shapes are fixed per run (rows
per mini-batch, prompt length P, response length R), so each function compiles once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from aepo_jax.logprobs import chunked_logprobs_entropy
from aepo_jax.losses import NEEDS_RNG, LossConfig, loss_denominators, merge_microbatch_metrics, policy_loss
from aepo_jax.trainer.batch import Batch

log = logging.getLogger("aepo_jax.train")


@dataclass(frozen=True)
class LearnerSpec:
    """Static facts the jitted functions are specialised on.

    loss_name: the registered loss (``MethodSpec.loss``); entropy_grad: differentiate the entropy
    (``MethodSpec.entropy_grad``); reuse_old_logp: on-policy update, log pi_old = sg(log pi_theta);
    entropy_signal: also return the policy's entropy on the main-rollout rows from the update's own
    forward pass (``policy/entropy_*``), for a controller that is not measured before the update.
    """

    loss_name: str
    loss: LossConfig
    prompt_len: int
    response_len: int
    logprob_chunk: int = 256
    micro_batches: int = 1
    entropy_grad: bool = False
    reuse_old_logp: bool = False
    entropy_signal: bool = True
    seed: int = 0  # of the loss's random draws (Clip-Cov): key = (seed, update index, micro-batch)
    prefix_slots: int = 0  # > 0: shared-prefix pass with this many distinct prompts per call (0 = every row whole)


def make_optimizer(optim, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warm-up and constant / cosine / linear decay, after global-norm clipping."""
    warm = max(int(optim.warmup_steps), 0)
    decay_steps = max(total_updates - warm, 1)
    end = optim.lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.min_lr_ratio)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(optim.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(optim.lr)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), after], [warm]) if warm else after
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*parts), schedule


def shared_prefixes(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, prompt_len: int,
                    slots: int) -> dict | None:
    """The distinct prompt prefixes of a block of packed rows, for the shared-prefix pass.

    A row's prefix is its first P - 1 columns (the left-padded prompt without its last token; that
    token stays with the row because its hidden state predicts the first response token). Returns
    {"ids", "mask", "pos"} [slots, P - 1] (the distinct prefixes, then copies of the first to fill
    the fixed number of slots) and "index" [N] (each row's prefix), or None when the rows hold
    more than ``slots`` distinct prefixes or P < 2 (then the rows go through whole).
    """
    lp = prompt_len - 1
    if lp < 1 or slots < 1:
        return None
    ids, mask = np.asarray(input_ids)[:, :lp], np.asarray(attention_mask)[:, :lp]
    keys = np.concatenate([ids, mask], axis=1)
    _, first, index = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    if len(first) > slots:
        return None
    first = np.concatenate([first, np.full(slots - len(first), first[0])])
    return {"ids": ids[first], "mask": mask[first], "pos": np.asarray(position_ids)[first, :lp],
            "index": index.reshape(-1).astype(np.int32)}


def response_logprobs(model, input_ids, attention_mask, position_ids, spec: LearnerSpec, entropy_grad: bool,
                      batch_groups: int = 1, prefixes: dict | None = None):
    """log pi(o_t) and H_t for the R response tokens of each row (fp32 [N, R] each).

    The hidden state at column P + t - 1 predicts the response token at column P + t, so only the
    response part of the sequence goes through the LM head (the prompt's logits are never formed).
    With ``prefixes`` (:func:`shared_prefixes`) each distinct prompt prefix goes through the
    decoder once and the rows continue it from column P - 1 (the same numbers up to rounding).
    """
    p, r = spec.prompt_len, spec.response_len
    if prefixes is None:
        hidden = model.hidden_states(input_ids, attention_mask, position_ids)
        hidden = hidden[:, p - 1 : p + r - 1]
    else:
        cols = slice(p - 1, p + r - 1)
        hidden = model.continuation_hidden_states(
            prefixes["ids"], prefixes["mask"], prefixes["pos"], input_ids[:, cols], attention_mask[:, cols],
            position_ids[:, cols], prefixes["index"])
    targets = input_ids[:, p : p + r]
    return chunked_logprobs_entropy(hidden, model.lm_head_kernel(), targets,
                                    chunk_size=min(spec.logprob_chunk, r), entropy_grad=entropy_grad,
                                    batch_groups=batch_groups)


def _policy_entropy_sums(b: Batch, logp, entropy) -> dict:
    """Sums (over main-rollout rows with tokens) of the per-response token means of the full and
    the sampled (-log pi) entropy, and their count: the controller's estimators, additive over
    micro-batches."""
    mask = b.mask
    lens = jnp.sum(mask, axis=1)
    rows = b.main_rollout.astype(jnp.float32) * (lens > 0)
    inv = rows / jnp.maximum(lens, 1.0)
    sg = jax.lax.stop_gradient
    return {"full": jnp.sum(jnp.sum(sg(entropy) * mask, axis=1) * inv),
            "nll": jnp.sum(jnp.sum(-sg(logp) * mask, axis=1) * inv),
            "rows": jnp.sum(rows)}


class Learner:
    """Holds (graphdef, params, opt_state) and the compiled functions for one run."""

    def __init__(self, model, spec: LearnerSpec, optim, total_updates: int, mesh):
        self.spec = spec
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        self.tx, self.schedule = make_optimizer(optim, total_updates)
        replicated = NamedSharding(mesh, P())
        # A plain jit(tx.init) leaves Adam's step counts and moments wherever XLA puts them (one
        # device, uncommitted), while the update returns them committed with its own shardings: a
        # new jit cache key, so the update compiled again at step 2. The state is created where
        # the update keeps it (moments like their parameters, counts replicated) and out_shardings
        # pins that placement.
        param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        opt_shardings = optax.tree_utils.tree_map_params(
            self.tx, lambda _, sharding: sharding, jax.eval_shape(self.tx.init, self.params), param_shardings,
            transform_non_params=lambda _: replicated)
        init = jax.jit(self.tx.init, out_shardings=opt_shardings)
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params)):
            # An abstract model (no weights, e.g. tools/plan.py): the optimiser state is abstract too,
            # so the functions can be lowered and compiled without allocating anything.
            self.opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                          jax.eval_shape(init, self.params), opt_shardings)
        else:
            self.opt_state = init(self.params)
        self.data_size = int(mesh.shape["data"])
        self._warned_prefixes = False
        self._logprob_fn = jax.jit(self._logprobs_impl)
        self._update_fn = jax.jit(self._update_impl, donate_argnums=(0, 1),
                                  out_shardings=(param_shardings, opt_shardings, replicated))

    # ------------------------------------------------------------------ model access
    def model(self):
        """The current policy as an nnx module (shares the learner's arrays; for export / sync)."""
        return nnx.merge(self.graphdef, self.params)

    def state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def load_state(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints. Every leaf already
        lives where the update keeps it (optax's step counts replicated over the mesh, see
        ``__init__``), so a restored state has the update's shardings and compiles nothing new."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state())

    # ------------------------------------------------------------------ placement
    def _put_rows(self, x: np.ndarray, axis: int = 0) -> jax.Array:
        """Place a host array with its row axis over the mesh's data axis (every process feeds
        only the shards it holds, so the same code runs on one host or many)."""
        spec = [None] * x.ndim
        spec[axis] = "data"
        sharding = NamedSharding(self.mesh, P(*spec))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _gather(self, x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    # ------------------------------------------------------------------ log-probs
    def _put_replicated(self, x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P()), lambda idx: x[idx])

    def _prefixes(self, input_ids, attention_mask, position_ids, rows: int) -> dict | None:
        """:func:`shared_prefixes` of one call's rows when the spec asks for the shared-prefix pass."""
        if not self.spec.prefix_slots:
            return None
        found = shared_prefixes(input_ids, attention_mask, position_ids, self.spec.prompt_len,
                                min(self.spec.prefix_slots, rows))
        if found is None and not self._warned_prefixes:
            self._warned_prefixes = True
            log.warning("more distinct prompts than the %d prefix slots in one call: those rows go through the "
                        "decoder whole (correct, but a second compiled program)", self.spec.prefix_slots)
        return found

    def _logprobs_impl(self, params, input_ids, attention_mask, position_ids, prefixes=None):
        model = nnx.merge(self.graphdef, params)
        logp, ent = response_logprobs(model, input_ids, attention_mask, position_ids, self.spec, entropy_grad=False,
                                      prefixes=prefixes)
        return jax.lax.stop_gradient(logp), jax.lax.stop_gradient(ent)

    def logprobs(self, batch: Batch, rows_per_call: int) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs and entropies (T = 1) of every row, ``rows_per_call`` rows per compiled call
        (the last call is padded so every call has the same shape)."""
        n = batch.num_rows
        rows = max(rows_per_call, self.data_size)
        rows += (-rows) % self.data_size
        tokens = (batch.input_ids, batch.attention_mask, batch.position_ids)
        logps, ents = [], []
        for start in range(0, n, rows):
            chunk = [x[start : start + rows] for x in tokens]
            m = chunk[0].shape[0]
            if m < rows:
                chunk = [np.concatenate([x, np.repeat(x[-1:], rows - m, axis=0)]) for x in chunk]
            prefixes = self._prefixes(*chunk, rows)
            if prefixes is not None:
                index = prefixes.pop("index")
                prefixes = {k: self._put_replicated(v) for k, v in prefixes.items()}
                prefixes["index"] = self._put_rows(index)
            lp, en = self._logprob_fn(self.params, *(self._put_rows(x) for x in chunk), prefixes)
            logps.append(self._gather(lp)[:m])
            ents.append(self._gather(en)[:m])
        return np.concatenate(logps), np.concatenate(ents)

    # ------------------------------------------------------------------ update
    def _update_impl(self, params, opt_state, mb: Batch, update_index, prefixes=None):
        spec = self.spec
        dens = loss_denominators({"mask": mb.mask.reshape(-1, spec.response_len), "is_reg": mb.is_reg.reshape(-1)})

        def micro_loss(p, micro: Batch, micro_prefixes, rng):
            model = nnx.merge(self.graphdef, p)
            # batch_groups = data-axis size: the LM-head gradient is summed over devices once after
            # the chunk loop instead of once per chunk (see aepo_jax/logprobs.py).
            logp, ent = response_logprobs(model, micro.input_ids, micro.attention_mask, micro.position_ids,
                                          spec, spec.entropy_grad, self.data_size, micro_prefixes)
            old = jax.lax.stop_gradient(logp) if spec.reuse_old_logp else micro.old_logp
            loss, metrics = policy_loss(spec.loss_name, {
                "logp": logp, "old_logp": old, "mask": micro.mask, "advantages": micro.advantages,
                "rewards": micro.rewards, "is_reg": micro.is_reg, "entropy": ent,
            }, spec.loss, denominators=dens, rng=rng)
            return loss, (metrics, _policy_entropy_sums(micro, logp, ent) if spec.entropy_signal else None)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(gsum, xs):
            micro, micro_prefixes, rng = xs
            (_, aux), g = grad_fn(params, micro, micro_prefixes, rng)
            return jax.tree.map(jnp.add, gsum, g), aux

        # Losses that draw random tokens get one key per micro-batch, a function of the seed and
        # the update index only (so a resumed run draws the same); the others get none.
        rngs = None
        if spec.loss_name in NEEDS_RNG:
            rngs = jax.random.split(jax.random.fold_in(jax.random.key(spec.seed), update_index), spec.micro_batches)
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (stacked, ent_sums) = jax.lax.scan(body, zeros, (mb, prefixes, rngs))
        metrics = merge_microbatch_metrics(stacked)
        if spec.entropy_signal:
            ent_sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), ent_sums)
            rows = jnp.maximum(ent_sums["rows"], 1.0)
            metrics["policy/entropy_full"] = ent_sums["full"] / rows
            metrics["policy/entropy_nll"] = ent_sums["nll"] / rows
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
        updates, new_opt = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics["actor/grad_norm"] = grad_norm
        metrics["optim/lr"] = self.schedule(update_index)  # this update's, returned with the other metrics
        metrics["actor/update_skipped"] = 1.0 - finite.astype(jnp.float32)
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    def update(self, batch: Batch, update_index: int = 0) -> dict[str, float]:
        """One optimiser update on one mini-batch (a host :class:`Batch`); ``update_index`` (updates
        applied so far) only sets the logged ``optim/lr``: the optimiser counts its own steps."""
        m = self.spec.micro_batches
        n = batch.num_rows
        if n % m:
            raise ValueError(f"mini-batch of {n} rows does not split into {m} micro-batches")
        if not self.spec.reuse_old_logp and batch.old_logp is None:
            raise ValueError("batch.old_logp is None: compute it with Learner.logprobs, or set reuse_old_logp")
        if self.spec.reuse_old_logp:
            batch = dataclasses.replace(batch, old_logp=None, entropy=None)
        else:
            batch = dataclasses.replace(batch, entropy=None)  # the loss recomputes it (with a gradient if needed)
        # [micro, rows / micro, ...]: the scan walks the leading axis; rows are sharded over "data".
        mb = jax.tree.map(lambda x: self._put_rows(np.asarray(x).reshape((m, n // m) + x.shape[1:]), axis=1), batch)
        prefixes = None
        if self.spec.prefix_slots:
            per = [self._prefixes(*(x[j * (n // m) : (j + 1) * (n // m)] for x in
                                    (batch.input_ids, batch.attention_mask, batch.position_ids)), n // m)
                   for j in range(m)]
            if all(p is not None for p in per):
                stacked = {k: np.stack([p[k] for p in per]) for k in per[0]}
                index = stacked.pop("index")
                prefixes = {k: self._put_replicated(v) for k, v in stacked.items()}
                prefixes["index"] = self._put_rows(index, axis=1)
        self.params, self.opt_state, metrics = self._update_fn(self.params, self.opt_state, mb, np.int32(update_index),
                                                               prefixes)
        # The metrics are replicated scalars: one device-to-host transfer for all of them.
        return {k: float(v) for k, v in jax.device_get(metrics).items()}
