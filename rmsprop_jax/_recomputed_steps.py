"""`rmsprop`'s chain with its step computed again wherever a second kernel reads it.

XLA:CPU writes a value out to memory when two kernels read it and it is expensive to
compute (a division, a square root). Two of `rmsprop`'s variants have such a value, 4 bytes
per parameter at the peak of the update step in every storage format, float32 included:

- Nesterov momentum: the step s = η g / (√ν + ε) is read by the new buffer b = m b + s and by
  the update s + m b.
- L2 (coupled) weight decay: the decayed gradient g + λp is read by the new ν and by s.

This chain computes the new state first and then the step from the gradient, the parameters
and the new state (as the storage formats already compute it from their new averages), once
per kernel that reads it, each time from optimization-barrier copies of those arrays: XLA
cannot merge the copies' computations, so each is fused into its reader, and as the new state
is read (not the old state, overwritten in place) nothing is copied. The arithmetic, the
updates and the state are those of the chain of the same stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from rmsprop_jax.transform import StepsFromState


def chain(
    head: Sequence[optax.GradientTransformation],
    preconditioner: optax.GradientTransformation,
    steps_from_state: StepsFromState,
    learning_rate: optax.GradientTransformation,
    momentum: Any,
    nesterov: bool,
    tail: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(*head, preconditioner, learning_rate, trace, tail)`, recomputing the step.

    Args:
      head: stateless-in-their-updates stages run on the gradient before the preconditioner
        (the sign of `maximize`, L2 weight decay); run twice or more.
      preconditioner: :func:`rmsprop_jax.scale_by_rms`.
      steps_from_state: its step from its new state (see
        :func:`rmsprop_jax.transform.preconditioner`).
      learning_rate: the learning-rate stage, whose new state does not depend on the updates.
      momentum: m, the decay of `optax.trace`'s buffer, or None for no buffer.
      nesterov: whether the update is s + m b (Nesterov) rather than b.
      tail: the stage after the buffer (decoupled weight decay).

    Returns:
      A transformation whose state is that of the chain of the same stages.
    """
    head = [optax.with_extra_args_support(stage) for stage in head]
    preconditioner, learning_rate, tail = (
        optax.with_extra_args_support(stage) for stage in (preconditioner, learning_rate, tail)
    )
    # Nesterov's buffer is the heavy-ball buffer: only the update differs, s + m b.
    trace = optax.with_extra_args_support(
        optax.identity() if momentum is None else optax.trace(decay=momentum)
    )
    init = optax.chain(*head, preconditioner, learning_rate, trace, tail).init

    def update_fn(updates, state, params=None, **extra_args):
        *head_states, rms_state, rate_state, trace_state, tail_state = state
        gradient = updates
        new_head_states = []
        for stage, stage_state in zip(head, head_states, strict=True):
            gradient, stage_state = stage.update(gradient, stage_state, params, **extra_args)
            new_head_states.append(stage_state)
        _, new_rms_state = preconditioner.update(gradient, rms_state, params, **extra_args)
        incoming = updates

        def scaled_step(*distinct):
            """η s, and the learning-rate stage's new state, from barrier copies of the
            inputs and the new state (and of `distinct`, which keeps XLA from merging two
            barriers of the same arrays)."""
            grads, params_copy, rms_copy, _ = jax.lax.optimization_barrier(
                (incoming, params, new_rms_state, distinct)
            )
            for stage, stage_state in zip(head, head_states, strict=True):
                grads, _ = stage.update(grads, stage_state, params_copy, **extra_args)
            steps = steps_from_state(grads, rms_copy)
            return learning_rate.update(steps, rate_state, params_copy, **extra_args)

        steps, new_rate_state = scaled_step()
        buffers, new_trace_state = trace.update(steps, trace_state, params, **extra_args)
        if nesterov:
            # optax.trace's Nesterov update, s + m b_t, with s computed again.
            buffers = jax.tree.map(
                lambda step, buffer: step + momentum * buffer, scaled_step(buffers)[0], buffers
            )
        updates, new_tail_state = tail.update(buffers, tail_state, params, **extra_args)
        new_state = (*new_head_states, new_rms_state, new_rate_state, new_trace_state)
        return updates, (*new_state, new_tail_state)

    return optax.GradientTransformationExtraArgs(init, update_fn)
