"""An RMSprop chain with its step computed again wherever a second kernel reads it.

XLA:CPU writes a value out to memory when two kernels read it and it is expensive to
compute (a division, a square root). Two variants of `rmsprop` (and of the PyTorch preset,
for weight decay) have such a value, 4 bytes per parameter at the peak of the update step in
every storage format, float32 included:

- Nesterov momentum: the step s = η g / (√ν + ε) is read by the new buffer b = m b + s and by
  the update s + m b.
- L2 (coupled) weight decay: the decayed gradient g + λp is read by the new ν and by s.

This chain computes the new state first and then the step from the gradient, the parameters
and the new state (as the storage formats already compute it from their new averages), once
per kernel that reads it, each time from optimization-barrier copies of those arrays: XLA
cannot merge the copies' computations, so each is fused into its reader, and as the new state
is read (not the old state, overwritten in place) nothing is copied. The arithmetic, the
updates and the state are those of the chain of the same stages: bit for bit eagerly, to
rounding under jit, where XLA fuses the two programs differently.
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
    *,
    scale: Sequence[optax.GradientTransformation] = (),
    momentum: Any = None,
    nesterov: bool = False,
    tail: Sequence[optax.GradientTransformation] = (),
) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(*head, preconditioner, *scale, trace, *tail)`, computing the step again.

    Args:
      head: stages run on the gradient before the preconditioner (the sign of `maximize`,
        L2 weight decay), whose updates do not depend on their state; run once per reader.
      preconditioner: :func:`rmsprop_jax.scale_by_rms`.
      steps_from_state: its step from its new state (see
        :func:`rmsprop_jax.transform.preconditioner`).
      scale: stages between the preconditioner and the momentum buffer (the learning rate
        of optax's order), whose new state does not depend on the updates.
      momentum: m, the decay of the `optax.trace` buffer, or None for an `optax.identity`.
      nesterov: whether the update is s + m b (Nesterov) rather than b.
      tail: the stages after the buffer (decoupled weight decay; PyTorch's learning rate).

    Returns:
      A transformation whose state is that of the chain of the same stages (a tuple, one
      state per stage).
    """
    head, scale, tail = (
        [optax.with_extra_args_support(stage) for stage in stages] for stages in (head, scale, tail)
    )
    preconditioner = optax.with_extra_args_support(preconditioner)
    # Nesterov's buffer is the heavy-ball buffer: only the update differs, s + m b.
    trace = optax.with_extra_args_support(
        optax.identity() if momentum is None else optax.trace(decay=momentum)
    )
    init = optax.chain(*head, preconditioner, *scale, trace, *tail).init

    def run(stages, updates, states, params, extra_args):
        """`updates` through `stages`, and their new states."""
        new_states = []
        for stage, stage_state in zip(stages, states, strict=True):
            updates, stage_state = stage.update(updates, stage_state, params, **extra_args)
            new_states.append(stage_state)
        return updates, new_states

    def update_fn(updates, state, params=None, **extra_args):
        # The state's length is checked by `rmsprop_jax._validation.stage_states_checked`.
        states = iter(state)
        head_states = [next(states) for _ in head]
        rms_state = next(states)
        scale_states = [next(states) for _ in scale]
        trace_state = next(states)
        tail_states = list(states)

        gradient, new_head_states = run(head, updates, head_states, params, extra_args)
        _, new_rms_state = preconditioner.update(gradient, rms_state, params, **extra_args)
        incoming = updates

        def scaled_step(*distinct):
            """The step through `scale`, and their new states, from barrier copies of the
            inputs and the new state (and of `distinct`, which keeps XLA from merging two
            barriers of the same arrays)."""
            grads, params_copy, rms_copy, _ = jax.lax.optimization_barrier(
                (incoming, params, new_rms_state, distinct)
            )
            grads, _ = run(head, grads, head_states, params_copy, extra_args)
            steps = steps_from_state(grads, rms_copy, params_copy)
            return run(scale, steps, scale_states, params_copy, extra_args)

        steps, new_scale_states = scaled_step()
        buffers, new_trace_state = trace.update(steps, trace_state, params, **extra_args)
        if nesterov:
            # optax.trace's Nesterov update, s + m b_t, with s computed again.
            buffers = jax.tree.map(
                lambda step, buffer: step + momentum * buffer, scaled_step(buffers)[0], buffers
            )
        updates, new_tail_states = run(tail, buffers, tail_states, params, extra_args)
        new_states = (*new_head_states, new_rms_state, *new_scale_states, new_trace_state)
        return updates, (*new_states, *new_tail_states)

    return optax.GradientTransformationExtraArgs(init, update_fn)
