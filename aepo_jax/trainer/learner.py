"""The learner: the policy's parameters, the optimiser, and two jitted, sharded functions.

* :meth:`Learner.logprobs` - log pi(o_t) at temperature 1 and the full-distribution entropy of
  every response token (old log-probs, and the entropy signal of AEPO's controller).
* :meth:`Learner.update` - one optimiser update on one mini-batch: micro-batches scanned inside
  the jit with the mini-batch's global loss denominators (so the loss and gradient do not depend
  on the micro-batch size or the device count), global-norm clipping, AdamW, and a skip of the
  whole update when the loss or the gradient is not finite.

Parameters live as an ``nnx.State`` sharded by the model's logical-axis rules over the mesh; the
batch's row dimension is sharded over the mesh's ``data`` axis. Shapes are fixed per run (rows
per mini-batch, prompt length P, response length R), so each function compiles once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from aepo_jax.logprobs import chunked_logprobs_entropy
from aepo_jax.losses import LossConfig, loss_denominators, merge_microbatch_metrics, policy_loss

LOSS_BATCH_KEYS = ("old_logp", "response_mask", "advantages", "rewards", "is_reg")
TOKEN_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class LearnerSpec:
    """Static facts the jitted functions are specialised on."""

    method: str
    loss: LossConfig
    prompt_len: int
    response_len: int
    logprob_chunk: int = 256
    micro_batches: int = 1


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


def response_logprobs(model, input_ids, attention_mask, position_ids, spec: LearnerSpec, entropy_grad: bool,
                      batch_groups: int = 1):
    """log pi(o_t) and H_t for the R response tokens of each row (fp32 [N, R] each).

    The hidden state at column P + t - 1 predicts the response token at column P + t, so only the
    response part of the sequence goes through the LM head (the prompt's logits are never formed).
    """
    p, r = spec.prompt_len, spec.response_len
    hidden = model.hidden_states(input_ids, attention_mask, position_ids)
    hidden = hidden[:, p - 1 : p + r - 1]
    targets = input_ids[:, p : p + r]
    return chunked_logprobs_entropy(hidden, model.lm_head_kernel(), targets,
                                    chunk_size=min(spec.logprob_chunk, r), entropy_grad=entropy_grad,
                                    batch_groups=batch_groups)


def _loss_batch(mb: dict, logp, entropy) -> dict:
    return {
        "logp": logp,
        "old_logp": mb["old_logp"],
        "mask": mb["response_mask"],
        "advantages": mb["advantages"],
        "rewards": mb["rewards"],
        "is_reg": mb["is_reg"],
        "entropy": entropy,
    }


class Learner:
    """Holds (graphdef, params, opt_state) and the compiled functions for one run."""

    def __init__(self, model, spec: LearnerSpec, optim, total_updates: int, mesh):
        self.spec = spec
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        self.tx, self.schedule = make_optimizer(optim, total_updates)
        param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        self.opt_state = jax.jit(self.tx.init)(self.params)
        self._param_shardings = param_shardings
        self.row_sharding = NamedSharding(mesh, P("data"))
        self.data_size = int(mesh.shape["data"])
        self._logprob_fn = jax.jit(self._logprobs_impl)
        self._update_fn = jax.jit(self._update_impl, donate_argnums=(0, 1))

    # ------------------------------------------------------------------ model access
    def model(self):
        """The current policy as an nnx module (shares the learner's arrays; for export / sync)."""
        return nnx.merge(self.graphdef, self.params)

    def state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def load_state(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints. Leaves on one device
        (optax's step counts) are restored replicated over the mesh: restored arrays are committed,
        and one committed to a single device cannot meet the mesh's arrays in the update."""
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding if len(x.sharding.device_set) > 1 else replicated), self.state())

    def learning_rate(self, update_index: int) -> float:
        return float(self.schedule(update_index))

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
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    # ------------------------------------------------------------------ log-probs
    def _logprobs_impl(self, params, input_ids, attention_mask, position_ids):
        model = nnx.merge(self.graphdef, params)
        logp, ent = response_logprobs(model, input_ids, attention_mask, position_ids, self.spec, entropy_grad=False)
        return jax.lax.stop_gradient(logp), jax.lax.stop_gradient(ent)

    def logprobs(self, arrays: dict[str, np.ndarray], rows_per_call: int) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs and entropies of every row, ``rows_per_call`` rows per compiled call (the last
        call is padded so every call has the same shape)."""
        n = arrays["input_ids"].shape[0]
        rows = max(rows_per_call, self.data_size)
        rows += (-rows) % self.data_size
        logps, ents = [], []
        for start in range(0, n, rows):
            chunk = {k: arrays[k][start : start + rows] for k in TOKEN_KEYS}
            m = chunk["input_ids"].shape[0]
            if m < rows:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], rows - m, axis=0)]) for k, v in chunk.items()}
            lp, en = self._logprob_fn(self.params, *(self._put_rows(chunk[k]) for k in TOKEN_KEYS))
            logps.append(self._gather(lp)[:m])
            ents.append(self._gather(en)[:m])
        return np.concatenate(logps), np.concatenate(ents)

    # ------------------------------------------------------------------ update
    def _update_impl(self, params, opt_state, mb):
        spec = self.spec
        entropy_grad = spec.method == "entropy_reg"
        flat = {"mask": mb["response_mask"].reshape(-1, spec.response_len), "is_reg": mb["is_reg"].reshape(-1)}
        dens = loss_denominators(flat)

        def micro_loss(p, micro):
            model = nnx.merge(self.graphdef, p)
            # batch_groups = data-axis size: the LM-head gradient is summed over devices once after
            # the chunk loop instead of once per chunk (see aepo_jax/logprobs.py).
            logp, ent = response_logprobs(model, micro["input_ids"], micro["attention_mask"],
                                          micro["position_ids"], spec, entropy_grad, self.data_size)
            return policy_loss(spec.method, _loss_batch(micro, logp, ent), spec.loss, denominators=dens)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(gsum, micro):
            (_, metrics), g = grad_fn(params, micro)
            return jax.tree.map(jnp.add, gsum, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, stacked = jax.lax.scan(body, zeros, mb)
        metrics = merge_microbatch_metrics(stacked)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
        updates, new_opt = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics["actor/grad_norm"] = grad_norm
        metrics["actor/update_skipped"] = 1.0 - finite.astype(jnp.float32)
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    def update(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimiser update on one mini-batch (host arrays with a leading row axis)."""
        m = self.spec.micro_batches
        n = arrays["input_ids"].shape[0]
        if n % m:
            raise ValueError(f"mini-batch of {n} rows does not split into {m} micro-batches")
        mb = {}
        for k in TOKEN_KEYS + LOSS_BATCH_KEYS:
            x = np.asarray(arrays[k])
            mb[k] = self._put_rows(x.reshape((m, n // m) + x.shape[1:]), axis=1)
        self.params, self.opt_state, metrics = self._update_fn(self.params, self.opt_state, mb)
        # The metrics are replicated scalars: one device-to-host transfer for all of them.
        return {k: float(v) for k, v in jax.device_get(metrics).items()}
