"""Multi-seed, multi-read training on MAD noisy recall.

One jitted step advances every seed of every read: per read, the model's
parameters, optimizer state and data key carry a leading seed axis and the
step is ``vmap``-ed over it; the reads (different static computations) sit
side by side in the same jitted function and share each seed's batch, so seed
s of every read sees the same initialization and the same data (a paired
comparison, as in the reference, where seed s fixes both).

Across several devices the seed axis is sharded over a one-axis ``seed`` mesh
with ``NamedSharding`` (``jax.pmap`` is in maintenance mode); a seed count that
does not divide the device count is padded with extra seeds whose results are
computed and dropped.

Protocol defaults (REFERENCE §4): AdamW(3e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01 on every parameter), cosine to 0 over the budget without
warmup, global gradient-norm clip 1.0 per seed, batch 64, 2,000 steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orthorecall import compilation, evaluation
from orthorecall import model as model_lib
from orthorecall.validation import check_int, check_real

SCHEDULES = ("cosine", "constant", "stretched_cosine")


def learning_rate_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    stretch_steps: int | None = None,
) -> optax.Schedule:
    """The learning-rate schedule of a run.

    Args:
        name: ``"cosine"`` (to 0 over ``total_steps``, the reference),
            ``"constant"``, or ``"stretched_cosine"`` (the cosine of a
            ``stretch_steps``-step budget, cut at ``total_steps``: the
            replication's 4,000-step schedule run for 2,000 steps).
        learning_rate: peak rate.
        total_steps: the step budget.
        stretch_steps: horizon of ``stretched_cosine``.

    Raises:
        ValueError: unknown schedule or bad horizon.
    """
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=0.0)
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "stretched_cosine":
        if not stretch_steps or stretch_steps < total_steps:
            raise ValueError(
                f"stretched_cosine needs stretch_steps >= total_steps ({total_steps}); got "
                f"{stretch_steps!r}."
            )
        return optax.cosine_decay_schedule(learning_rate, stretch_steps, alpha=0.0)
    raise ValueError(f"schedule={name!r} is not known; use one of {SCHEDULES}.")


# optax counts steps in an int32 that saturates here: a longer schedule would never end.
MAX_STEPS = 2**31 - 1


def make_optimizer(
    *,
    learning_rate: float = 3e-3,
    total_steps: int = 2000,
    schedule: str = "cosine",
    stretch_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with the reference's decoupled weight decay on every parameter,
    after a global-norm gradient clip (``clip_norm=None`` disables it).

    Raises:
        ValueError: naming the argument: a learning rate, eps or clip norm that is not
            finite and > 0, b1 or b2 outside [0, 1), a negative or non-finite weight
            decay, step counts that are not integers in [1, 2**31 - 1], an unknown
            schedule, or a ``stretch_steps`` below ``total_steps`` for
            ``stretched_cosine``.
    """
    learning_rate = check_real("learning_rate", learning_rate, minimum=0, minimum_inclusive=False)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    if total_steps > MAX_STEPS:
        raise ValueError(f"total_steps must be <= {MAX_STEPS} (optax's int32 step count)")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if stretch_steps is not None:
        stretch_steps = check_int("stretch_steps", stretch_steps, minimum=1)
        if stretch_steps > MAX_STEPS:
            raise ValueError(f"stretch_steps must be <= {MAX_STEPS} (optax's int32 step count)")
    b1 = check_real("b1", b1, minimum=0, maximum=1, maximum_inclusive=False)
    b2 = check_real("b2", b2, minimum=0, maximum=1, maximum_inclusive=False)
    eps = check_real("eps", eps, minimum=0, minimum_inclusive=False)
    weight_decay = check_real("weight_decay", weight_decay, minimum=0)
    if clip_norm is not None:
        clip_norm = check_real("clip_norm", clip_norm, minimum=0, minimum_inclusive=False)
    schedule_fn = learning_rate_schedule(schedule, learning_rate, total_steps, stretch_steps)
    adamw = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


class SeedState(NamedTuple):
    """Training state of one read; every leaf has a leading seed axis.

    Attributes:
        params: model parameters.
        opt_state: optimizer state.
        nonfinite: (S,) bool; a seed whose loss or gradient went NaN/Inf is
            frozen from then on (its update is skipped) and reported.
    """

    params: Any
    opt_state: Any
    nonfinite: jax.Array


def next_token_loss(
    params,
    inputs,
    targets,
    config: model_lib.ModelConfig,
    ignore_index: int = evaluation.IGNORE_INDEX,
    segment_length: int | None = None,
    read_mix=None,
):
    """Mean next-token cross-entropy over scored positions (all of them for
    training batches).

    Args:
        params, inputs (B, T), targets (B, T), config, ignore_index: as named.
        segment_length: None, or run the model over segments of this many positions,
            carrying its state from one to the next, each under ``jax.checkpoint``:
            backward then keeps one state per segment and recomputes one segment's
            activations at a time, so the step's memory shrinks by about T / segment
            length for one more forward pass. The loss is the same function; the sums
            are ordered differently, so it agrees to float32 rounding.
        read_mix: None, or the scaffold anneal's α (``model.apply``).
    """
    if segment_length is not None:
        segment_length = check_int("segment_length", segment_length, minimum=1)
    if segment_length is None or segment_length >= inputs.shape[-1]:
        logits = model_lib.apply(params, inputs, config, read_mix=read_mix)
        return evaluation.masked_metrics(logits, targets, ignore_index)[0]
    return _segmented_loss(params, inputs, targets, config, ignore_index, segment_length, read_mix)


def _segmented_loss(params, inputs, targets, config, ignore_index, segment_length, read_mix):
    batch, length = inputs.shape
    count = -(-length // segment_length)
    pad = count * segment_length - length
    if pad:  # Unscored positions after the end: causal, so they change nothing before.
        inputs = jnp.pad(inputs, ((0, 0), (0, pad)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=ignore_index)
    to_segments = lambda x: jnp.swapaxes(x.reshape(batch, count, segment_length), 0, 1)

    def segment(carry, xs):
        state, total, scored = carry
        segment_inputs, segment_targets = xs
        logits, state = model_lib.apply(
            params, segment_inputs, config, state=state, return_state=True, read_mix=read_mix
        )
        loss, _, num = evaluation.masked_metrics(logits, segment_targets, ignore_index)
        # A segment with nothing scored has a NaN mean: it adds nothing.
        total = total + jnp.where(num > 0, loss * num, 0.0)
        return (state, total, scored + num), None

    carry = (model_lib.initial_state(config, batch), jnp.float32(0.0), jnp.int32(0))
    (_, total, scored), _ = jax.lax.scan(
        jax.checkpoint(segment, prevent_cse=False),
        carry,
        (to_segments(inputs), to_segments(targets)),
    )
    return total / scored


def init_seed_states(
    seeds: np.ndarray,
    config: model_lib.ModelConfig,
    optimizer: optax.GradientTransformation,
    initial_params: Sequence[Any | None] | None = None,
) -> SeedState:
    """Initial state for an array of integer seeds: seed s initializes from
    ``PRNGKey(s)`` whatever the read, so reads are compared on equal starts.

    Args:
        seeds, config, optimizer: as named.
        initial_params: None, or one entry per seed: parameters (``model.init_params``'
            layout and shapes) that seed starts from instead, or None for the
            initializer. The optimizer state starts fresh either way.

    Raises:
        ValueError: ``initial_params`` of another length, layout or shape.
    """

    def one(seed):
        params = model_lib.init_params(jax.random.PRNGKey(seed), config)
        return params, optimizer.init(params)

    params, opt_state = jax.vmap(one)(jnp.asarray(seeds, jnp.uint32))
    if initial_params is not None:
        params = _with_initial_params(params, initial_params)
        opt_state = jax.vmap(optimizer.init)(params)
    return SeedState(params, opt_state, jnp.zeros(len(seeds), bool))


def _with_initial_params(params, initial_params: Sequence[Any | None]):
    """``params`` (leading seed axis) with seed i's replaced by ``initial_params[i]``."""
    num_seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    if len(initial_params) != num_seeds:
        raise ValueError(f"initial_params has {len(initial_params)} entries for {num_seeds} seeds.")
    like = jax.tree_util.tree_map(lambda x: x[0], params)
    shapes = jax.tree_util.tree_structure(like), [x.shape for x in jax.tree.leaves(like)]
    for i, given in enumerate(initial_params):
        if given is None:
            continue
        if (
            jax.tree_util.tree_structure(given),
            [np.shape(x) for x in jax.tree.leaves(given)],
        ) != shapes:
            raise ValueError(
                f"initial_params[{i}] is not in the model's parameter layout and shapes."
            )
        params = jax.tree_util.tree_map(
            lambda x, g, i=i: x.at[i].set(jnp.asarray(g, x.dtype)), params, given
        )
    return params


def _update_one_seed(
    state_params,
    opt_state,
    nonfinite,
    inputs,
    targets,
    read_mix,
    active,
    config,
    optimizer,
    segment_length=None,
):
    loss_fn = functools.partial(next_token_loss, segment_length=segment_length, read_mix=read_mix)
    loss, grads = jax.value_and_grad(loss_fn)(state_params, inputs, targets, config)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, state_params)
    new_params = model_lib.keep_frozen(
        optax.apply_updates(state_params, updates), state_params, config
    )
    bad = nonfinite | ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm)
    # A diverged seed keeps its last finite parameters, and a seed past its own budget
    # (``active`` false: the gated anneal's longer budgets) stays as it ended; the
    # others never notice.
    keep = lambda new, old: jnp.where(bad | ~active, old, new)
    new_params = jax.tree_util.tree_map(keep, new_params, state_params)
    new_opt_state = jax.tree_util.tree_map(keep, new_opt_state, opt_state)
    return new_params, new_opt_state, bad, loss, grad_norm


def in_seed_groups(fn: Callable, seed_groups: int, *trees):
    """``fn`` (seed-vmapped: (S, ...) leaves in and out) computed on ``seed_groups``
    groups of seeds one after the other (``lax.map``), so that only one group's
    temporaries are alive at a time; the same values as ``fn(*trees)``.

    Group g holds seeds g, g + G, g + 2G, ...: when the seed axis is sharded over
    devices in contiguous blocks whose size G divides, every group takes the same
    number of seeds from every device's own block, so grouping moves no data.
    """
    if seed_groups == 1:
        return fn(*trees)

    def split(x):  # (S, ...) -> (G, S / G, ...)
        return jnp.swapaxes(x.reshape((-1, seed_groups) + x.shape[1:]), 0, 1)

    def merge(x):  # (G, S / G, ...) -> (S, ...)
        return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

    grouped = jax.tree_util.tree_map(split, trees)
    out = jax.lax.map(lambda group: fn(*group), grouped)
    return jax.tree_util.tree_map(merge, out)


def _check_seed_groups(seed_groups) -> int:
    return check_int("seed_groups", seed_groups, minimum=1)


def make_train_step(
    configs: dict[str, model_lib.ModelConfig],
    optimizer: optax.GradientTransformation,
    sample_batch: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None,
    segment_length: int | None = None,
    seed_groups: int = 1,
) -> Callable:
    """Builds the jitted step over all reads and seeds.

    Args:
        configs: read name -> model configuration (same data shapes).
        optimizer: the per-seed optimizer.
        sample_batch: key -> (inputs, targets) of one seed's batch, for data
            generated on device; None when batches are passed in (numpy stream).
        segment_length: None, or the loss's ``segment_length`` (``next_token_loss``):
            backward recomputes the sequence segment by segment, for memory.
        seed_groups: G >= 1: every read's update runs on G groups of seeds one after the
            other (``in_seed_groups``), for memory; G must divide the seed count (and,
            on several devices, each device's share of it). Results are the same to
            float32 rounding.

    Returns:
        ``step(states, keys, batch, read_mix=None, active=None) -> (states, keys,
        metrics)`` where states is a dict read -> ``SeedState``, keys (S,) data keys
        (advanced by the step when data are generated on device), batch None or
        (inputs, targets) of shape (S, B, L), read_mix None or a dict read -> (S,) α
        of the reads under the scaffold anneal (``orthorecall.anneal``), active None
        or a dict read -> (S,) bool (false: the seed is not updated), and metrics a
        dict read -> {"loss", "grad_norm"} of (S,) arrays.
    """
    if segment_length is not None:
        segment_length = check_int("segment_length", segment_length, minimum=1)
    seed_groups = _check_seed_groups(seed_groups)

    def step(states, keys, batch, read_mix=None, active=None):
        _check_divides(seed_groups, keys.shape[0])
        num_seeds = keys.shape[0]
        if batch is None:
            split = jax.vmap(jax.random.split)(keys)
            keys, batch_keys = split[:, 0], split[:, 1]
            batch = jax.vmap(sample_batch)(batch_keys)
        inputs, targets = batch
        new_states, metrics = {}, {}
        for read, config in configs.items():
            state = states[read]
            update = functools.partial(
                _update_one_seed,
                config=config,
                optimizer=optimizer,
                segment_length=segment_length,
            )
            mix = None if read_mix is None else read_mix.get(read)
            seed_active = jnp.ones(num_seeds, bool) if active is None else active[read]
            params, opt_state, bad, loss, grad_norm = in_seed_groups(
                jax.vmap(update, in_axes=(0, 0, 0, 0, 0, None if mix is None else 0, 0)),
                seed_groups,
                state.params,
                state.opt_state,
                state.nonfinite,
                inputs,
                targets,
                mix,
                seed_active,
            )
            new_states[read] = SeedState(params, opt_state, bad)
            metrics[read] = {"loss": loss, "grad_norm": grad_norm}
        return new_states, keys, metrics

    return compilation.jit_training_step(step, donate_argnums=(0,))


def _check_divides(seed_groups: int, num_seeds: int) -> None:
    if num_seeds % seed_groups:
        raise ValueError(
            f"seed_groups={seed_groups} must divide the number of seeds, {num_seeds}; "
            "pick a divisor (training.padded_seed_count pads seeds to the device count)."
        )


def make_eval_step(configs: dict[str, model_lib.ModelConfig], seed_groups: int = 1) -> Callable:
    """Builds the jitted evaluation of every seed of every read.

    ``seed_groups`` evaluates the seeds in that many groups one after the other, as
    ``make_train_step``'s.

    Returns:
        ``evaluate(states, inputs, targets, read_mix=None) -> {read: {"accuracy",
        "loss"}}`` with inputs/targets (S, num_batches, batch, L) (each seed's reference
        validation set), read_mix as ``make_train_step``'s, and (S,) results: means over
        batches of per-batch values, as the reference reports them.
    """

    seed_groups = _check_seed_groups(seed_groups)

    def evaluate(states, inputs, targets, read_mix=None):
        _check_divides(seed_groups, inputs.shape[0])
        out = {}
        for read, config in configs.items():
            mix = None if read_mix is None else read_mix.get(read)

            def one_seed(params, seed_inputs, seed_targets, seed_mix, config=config):
                losses, accuracies = evaluation.per_batch_metrics(
                    params, seed_inputs, seed_targets, config, read_mix=seed_mix
                )
                return {"loss": jnp.mean(losses), "accuracy": jnp.mean(accuracies)}

            out[read] = in_seed_groups(
                jax.vmap(one_seed, in_axes=(0, 0, 0, None if mix is None else 0)),
                seed_groups,
                states[read].params,
                inputs,
                targets,
                mix,
            )
        return out

    return jax.jit(evaluate)


def seed_mesh(devices=None) -> Mesh:
    """A one-axis mesh named ``seed`` over ``devices`` (all by default)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("seed",))


def padded_seed_count(num_seeds: int, mesh: Mesh) -> int:
    """Seeds rounded up to a multiple of the mesh size (padding is dropped)."""
    size = mesh.devices.size
    return size * math.ceil(num_seeds / size)


def shard_seeds(tree, mesh: Mesh):
    """Places every leaf's leading (seed) axis across the mesh.

    With several processes (``orthorecall.multihost``) every process passes the same
    global values (host arrays, or arrays already sharded over the mesh) and keeps the
    seeds of its own devices.
    """
    sharding = NamedSharding(mesh, PartitionSpec("seed"))
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            # A process-local array: its host value is the global one.
            x = np.asarray(jax.device_get(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)
