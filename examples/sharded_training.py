"""Train an MLP on scikit-learn's digits with parameters and RMSprop state sharded (FSDP).

    python examples/sharded_training.py --devices 8                  # 8 simulated CPU devices
    python examples/sharded_training.py --devices 8 --storage int8   # 8-bit second moments
    python examples/sharded_training.py --processes 2 --devices 2    # 2 processes, 4 devices

Every weight matrix is split along its largest axis over all devices of all processes (one
mesh axis, "fsdp"), the batch too, and `rj.rmsprop`'s state lives with its parameter: each
device stores the moving averages of the slice of the weights it stores. With `--processes`
the script starts that many copies of itself on this machine, which join through
`jax.distributed.initialize` on 127.0.0.1 and run their collectives over gloo, exactly as
copies on separate hosts would. `--devices` simulates that many CPU devices per process
(on a GPU or TPU host, leave it out: the accelerators are the devices).

Process 0 speaks for all of them: it reports progress, the loss, the test accuracy and which
device (of which process) holds which slice of `w2` and of its second moment, and writes
loss.png and placement.png (the same, as a picture) to --out.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from cli_help import DefaultsHelpFormatter, positive_integer, positive_number

STORAGE_FORMATS = ("float32", "bfloat16", "int8", "factored")  # rj.rmsprop's moment_storage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--devices", type=positive_integer, default=None, help="simulated CPU devices per process"
    )
    parser.add_argument(
        "--processes", type=positive_integer, default=1, help="processes on this machine"
    )
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--storage", default="float32", choices=STORAGE_FORMATS, help="moment_storage of rj.rmsprop"
    )
    parser.add_argument(
        "--hidden", type=positive_integer, default=512, help="width of the hidden layers"
    )
    parser.add_argument("--steps", type=positive_integer, default=300, help="training steps")
    parser.add_argument("--batch", type=positive_integer, default=256, help="global batch size")
    parser.add_argument("--learning-rate", type=positive_number, default=1e-3, help="of rj.rmsprop")
    parser.add_argument(
        "--timeout", type=positive_number, default=600, help="seconds, with --processes"
    )
    parser.add_argument("--out", default="outputs/sharded_training", help="folder for the figures")
    return parser.parse_args(argv)


def _forward_output(stream: Iterable[str]) -> None:
    """Copies process 0's output to ours, without gloo's notes on each connection it makes."""
    for line in stream:
        if not line.startswith("[Gloo]"):
            sys.stdout.write(line)
            sys.stdout.flush()


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Starts `args.processes` copies of this script on 127.0.0.1 and waits for all of them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, os.path.abspath(__file__), *argv, "--port", str(port)]
    # Process 0 speaks for all: the others' standard output (the same lines, and the
    # connection notes of gloo) is dropped, their errors are kept.
    children = [
        subprocess.Popen(
            [*command, "--process-id", str(i)],
            stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
            text=True,
        )
        for i in range(args.processes)
    ]
    forward = threading.Thread(target=_forward_output, args=(children[0].stdout,), daemon=True)
    forward.start()
    deadline = time.monotonic() + args.timeout
    interrupted = False
    try:
        for child in children:
            child.wait(timeout=max(deadline - time.monotonic(), 1))
        forward.join(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"stopping: not done after --timeout {args.timeout} s", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        interrupted = True
    finally:
        # A process whose peer died waits for it in a collective: stop them all.
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if interrupted:
        return 130  # the shell's code for a process stopped by Ctrl-C
    return max(abs(child.returncode) for child in children)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.processes > 1 and ARGS.process_id is None:
        sys.exit(launch(ARGS, sys.argv[1:]))
    if ARGS.devices:
        # Read once, when JAX starts its CPU backend: before `import jax`.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={ARGS.devices}"
        )

import jax  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from progress_report import Progress, format_loss  # noqa: E402

import rmsprop_jax as rj  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def digits() -> tuple[np.ndarray, ...]:
    """Train and test splits of the 8x8 digits (1797 images), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1536], y[:1536], x[1536:], y[1536:]


def init_mlp(hidden: int) -> dict[str, np.ndarray]:
    """64 -> hidden -> hidden -> 10, He-initialized; identical in every process (seed 0)."""
    rng = np.random.default_rng(0)
    sizes = [64, hidden, hidden, 10]
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        params[f"w{i}"] = (rng.normal(size=(fan_in, fan_out)) * np.sqrt(2 / fan_in)).astype(
            np.float32
        )
        params[f"b{i}"] = np.zeros(fan_out, np.float32)
    return params


def mlp(params: Mapping[str, jax.Array | np.ndarray], x: jax.Array | np.ndarray) -> jax.Array:
    x = jax.nn.relu(x @ params["w1"] + params["b1"])
    x = jax.nn.relu(x @ params["w2"] + params["b2"])
    return x @ params["w3"] + params["b3"]


def fsdp_spec(shape: tuple[int, ...], devices: int) -> P:
    """Split the largest axis the device count divides; replicate what no axis allows."""
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % devices == 0:
            return P(*["fsdp" if a == axis else None for a in range(len(shape))])
    return P()


def to_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds whole: each takes its shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(name: str, leaf: jax.Array) -> str:
    """Where a (global) array lives: the slice each device holds, and in which process."""
    number = {device: i for i, device in enumerate(jax.devices())}
    # Keyed by jaxlib's Device, which has no stubs (see pyproject.toml): Any to mypy.
    places: Mapping[Any, tuple[slice, ...]] = leaf.sharding.devices_indices_map(leaf.shape)
    slices = ", ".join(
        f"{number[device]} (process {device.process_index}): "
        + " x ".join(
            f"{s.start or 0}:{s.stop or n}" for s, n in zip(index, leaf.shape, strict=True)
        )
        for device, index in sorted(places.items(), key=lambda item: number[item[0]])
    )
    sharding = leaf.sharding
    if not isinstance(sharding, NamedSharding):  # every array here is laid out on the mesh
        raise TypeError(f"{name} is not laid out by a NamedSharding: {sharding}")
    return f"{name} {leaf.shape} {leaf.dtype} sharded as {sharding.spec}; devices {slices}"


def placement_figure(params: dict, state: Any, path: str) -> None:
    """Maps of which device holds which entries of w2 and of its stored second moment."""
    nu = optax.tree_utils.tree_get(state, "nu")
    arrays = {"parameter w2": params["w2"]}
    if isinstance(nu, rj.QuantizedMoment):
        arrays.update({"nu codes (int8)": nu.codes["w2"], "nu block scales": nu.scales["w2"]})
    elif isinstance(nu, rj.FactoredMoment):
        arrays.update({"nu row statistics": nu.row["w2"], "nu column statistics": nu.col["w2"]})
    else:
        arrays[f"nu ({nu['w2'].dtype})"] = nu["w2"]
    devices = jax.devices()
    number = {device: i for i, device in enumerate(devices)}
    palette = plt.get_cmap("tab10" if len(devices) <= 10 else "tab20")
    # One color per device, then light gray for entries held by several devices.
    colors = ListedColormap([palette(i) for i in range(len(devices))] + ["#dddddd"])
    width = 4 * len(arrays)
    fig, axes = plt.subplots(1, len(arrays), figsize=(width, 4.8), layout="constrained")
    for ax, (title, leaf) in zip(axes, arrays.items(), strict=True):
        shape = leaf.shape if leaf.ndim == 2 else (1, leaf.shape[0])
        owner, holders = np.zeros(shape), np.zeros(shape, int)
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            index = index if leaf.ndim == 2 else (slice(None), *index)
            owner[index] = number[device]
            holders[index] += 1
        owner[holders > 1] = len(devices)
        ax.imshow(
            owner,
            aspect="auto",
            cmap=colors,
            vmin=-0.5,
            vmax=len(devices) + 0.5,
            interpolation="nearest",
        )
        ax.set_title(f"{title}\n{leaf.shape}, {leaf.sharding.spec}")
        ax.set_xlabel("column" if leaf.ndim == 2 else "index")
        if shape[1] < 10:  # a few columns (2 block scales): label each, not 0.5 steps
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if leaf.ndim == 2:
            ax.set_ylabel("row")
        else:
            ax.set_yticks([])
    labels = [f"device {i} (process {d.process_index})" for i, d in enumerate(devices)]
    labels.append("several devices (replicated)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i)) for i in range(len(labels))]
    # As many columns as fit the figure's width (about 2 inches an entry), below the panels.
    columns = max(1, min(len(labels), int(width / 2.1)))
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8)
    fig.suptitle("Which device holds each entry")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    me, devices, processes = jax.process_index(), jax.device_count(), jax.process_count()
    speaks = me == 0  # one process reports for all: the others' lines would interleave

    def say(line: str) -> None:
        if speaks:
            print(line, flush=True)

    plural = "process" if processes == 1 else "processes"
    say(f"{devices} devices in {processes} {plural}, {jax.local_device_count()} per process")
    mesh = jax.make_mesh((devices,), ("fsdp",), axis_types=(AxisType.Auto,))

    x_train, y_train, x_test, y_test = digits()
    if args.batch % devices:
        raise ValueError(f"--batch {args.batch} must be a multiple of the {devices} devices.")
    host_params = init_mlp(args.hidden)
    shardings = {
        k: NamedSharding(mesh, fsdp_spec(v.shape, devices)) for k, v in host_params.items()
    }
    params = {k: to_global(v, shardings[k]) for k, v in host_params.items()}
    batch_x, batch_y = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P("fsdp"))

    tx = rj.rmsprop(args.learning_rate, momentum=0.9, moment_storage=args.storage)
    # The state's layout, known before anything is allocated; init places it there.
    state_shardings = rj.sharding.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(1)  # the same batches in every process
    losses = []
    bar = Progress(
        range(args.steps), total=args.steps, desc="training", unit="step", enabled=speaks
    )
    for i in bar:
        batch = rng.choice(len(x_train), size=args.batch, replace=False)
        x, y = to_global(x_train[batch], batch_x), to_global(y_train[batch], batch_y)
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss.addressable_data(0)))  # replicated: each process has it
        bar.set_postfix(loss=format_loss(losses[-1]))
        if i % max(args.steps // 5, 1) == 0 or i == args.steps - 1:
            bar.write(f"step {i:4d}  loss {format_loss(losses[-1])}")

    host_params = {k: to_host(v) for k, v in params.items()}
    accuracy = float(np.mean(np.argmax(mlp(host_params, x_test), axis=1) == y_test))
    say(f"test accuracy {accuracy:.3f}")
    say(describe("params w2", params["w2"]))
    nu = optax.tree_utils.tree_get(state, "nu")
    if isinstance(nu, rj.QuantizedMoment | rj.FactoredMoment):
        stored = {field: tree["w2"] for field, tree in nu._asdict().items() if field != "dense"}
    else:
        stored = {"": nu["w2"]}
    for field, leaf in stored.items():
        say(describe(f"state nu{'.' + field if field else ''}['w2']", leaf))

    if speaks:
        os.makedirs(args.out, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(losses)
        ax.set(xlabel="step", ylabel="training loss", yscale="log")
        ax.set_title(f"MLP on digits, {devices} devices in {processes} {plural}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "loss.png"), dpi=100)
        plt.close(fig)
        placement_figure(params, state, os.path.join(args.out, "placement.png"))
        say(f"wrote loss.png and placement.png to {args.out}")
    if args.processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(ARGS)
    except KeyboardInterrupt:
        # One line instead of a traceback; with --processes, the launcher says it.
        if ARGS.process_id is None:
            sys.stderr.write("interrupted\n")
        sys.exit(130)
