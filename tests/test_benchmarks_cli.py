"""The benchmark scripts: new results files unless told otherwise, durations, missing contenders."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = (
    "update_step",
    "memory",
    "sweep",
    "compile_time",
    "variant_memory",
    "step_profile",
    "reductions",
)


def committed_record(name: str) -> dict:
    """The committed CPU record of benchmarks/`name`.py (results/`name`_cpu.json)."""
    return json.loads((BENCHMARKS / "results" / f"{name}_cpu.json").read_text())


def markdown_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def benchmark(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def committed_results() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (BENCHMARKS / "results").glob("*.json")}


def test_a_run_writes_a_new_file_and_only_update_results_names_the_committed_one(tmp_path):
    results = benchmark("_results")
    args = argparse.Namespace(out=tmp_path, update_results=False)
    first = results.output_path("sweep", "cpu", args)
    assert first.parent == tmp_path and first.name.startswith("sweep_cpu_")
    first.write_text("{}")
    second = results.output_path("sweep", "cpu", args)
    assert second != first and not second.exists()

    args.update_results = True
    assert results.output_path("sweep", "cpu", args) == BENCHMARKS / "results" / "sweep_cpu.json"


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_runs_may_not_replace_the_committed_results(script, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark(script).main(["--quick", "--update-results"])
    assert stop.value.code == 2
    assert "--update-results replaces the committed full results" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_count_of_zero_is_refused_before_the_run_starts(script, capsys):
    # It ran the whole benchmark and then failed taking the median of no rounds.
    flag = "--leaves" if script == "compile_time" else "--repeats"
    with pytest.raises(SystemExit) as stop:
        benchmark(script).main([flag, "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a whole number >= 1, got 0" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once(script, capsys):
    with pytest.raises(SystemExit):
        benchmark(script).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\(default \d+\) \(default: \d+\)", text), text
    assert "(default: False)" not in text and "(default: [])" not in text, text
    assert "(default: outputs/benchmarks)" in text, text  # options that take a value keep it


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_how_long_the_full_and_quick_runs_take(script, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark(script).main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert re.search(r"full (run|grid) takes about \d+ minutes? on 2 CPU cores", text), text
    assert re.search(r"--quick takes (about \d+|under a) minute", text), text


def test_every_run_first_says_what_it_will_cost(capsys):
    results = benchmark("_results")
    memory = results.Durations("about 3 minutes", "about 2 minutes")
    results.announce("memory", False, memory)
    results.announce("memory", True, memory)
    grid = results.Durations("about 20 minutes", "about 3", whole="full grid")
    results.announce("update_step", False, grid)
    idle = " Cores are assumed idle: other work slows every contender."
    assert capsys.readouterr().out.splitlines() == [
        "memory: the full run takes about 3 minutes (--quick: about 2 minutes)." + idle,
        "memory: about 2 minutes (--quick)." + idle,
        "update_step: the full grid takes about 20 minutes (--quick: about 3)." + idle,
    ]


def test_missing_pytorch_is_reported_with_the_extra_that_installs_it(monkeypatch):
    results = benchmark("_results")
    monkeypatch.setattr(results.importlib.util, "find_spec", lambda name: None)
    note = results.missing_contenders("torch")
    assert note.startswith("PyTorch is not installed")
    assert 'pip install -e ".[conformance]"' in note


@pytest.mark.slow
def test_update_step_writes_a_new_file_and_names_skipped_contenders(tmp_path, monkeypatch, capsys):
    update_step = benchmark("update_step")
    monkeypatch.setattr(update_step, "missing_contenders", lambda module: f"no {module} here")
    before = committed_results()

    report = update_step.main(
        ["--sizes", "4096", "--leaves", "1", "--repeats", "1", "--out", str(tmp_path)]
    )

    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("update_step: the full grid takes about 20 minutes")
    assert "note: no torch here" in out
    assert report["skipped_contenders"] == {"torch": "no torch here"}
    assert not any("torch" in name for name in report["runs"][0]["results"])
    [written] = tmp_path.glob("update_step_*.json")
    assert json.loads(written.read_text())["skipped_contenders"] == {"torch": "no torch here"}
    assert committed_results() == before


@pytest.mark.slow
def test_sweep_writes_a_new_file(tmp_path):
    before = committed_results()
    benchmark("sweep").main(
        ["--hidden", "4", "--steps", "5", "--repeats", "1", "--out", str(tmp_path)]
    )
    [written] = tmp_path.glob("sweep_*.json")
    assert json.loads(written.read_text())["rows"][0]["hidden"] == 4
    assert committed_results() == before


def test_compile_time_writes_a_new_file_with_every_contender_against_float32(tmp_path, capsys):
    before = committed_results()
    benchmark("compile_time").main(["--leaves", "2", "--out", str(tmp_path)])
    [written] = tmp_path.glob("compile_time_*.json")
    rows = json.loads(written.read_text())["leaves"]["2"]
    assert set(rows["plain"]) == {
        "float32",
        "bfloat16",
        "int8",
        "factored",
        "optax.rmsprop",
        "optax.adam",
        "optax.adafactor",
    }
    assert set(rows["centered + momentum"]) == {"float32", "bfloat16", "int8", "factored"}
    for variant in rows.values():
        assert variant["float32"]["relative_to_float32"] == 1.0
        for row in variant.values():
            assert len(row["attempts"]) == 2 and row["total_seconds"] > 0
    assert "Update step compile time" in capsys.readouterr().out
    assert committed_results() == before
    with pytest.raises(SystemExit):
        benchmark("compile_time").main(["--leaves", "0", "--out", str(tmp_path)])


def test_the_compile_time_table_quotes_the_committed_record():
    record = committed_record("compile_time")
    text = (BENCHMARKS / "README.md").read_text()
    for variant, suffix in (("plain", ""), ("centered + momentum", " c+m")):
        for name in record["leaves"]["16"][variant]:
            label = (name if name.startswith("optax") else f"rj {name}") + suffix
            cells = [
                f"{row[variant][name]['total_seconds']:.2f} s "
                f"({row[variant][name]['relative_to_float32']:.1f}x)"
                for row in record["leaves"].values()
            ]
            assert f"| {label} | {' | '.join(cells)} |" in text, label


def _table_rows(document: Path) -> dict[str, list[str]]:
    """The low-memory table's rows: first cell's name (`"int8"` -> int8) -> numeric cells."""
    rows = {}
    for line in document.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 5:
            continue
        name = cells[0].split("`")[1].strip('"')
        rows[name] = cells[1:5]
    return rows


@pytest.mark.parametrize("document", ["README.md", "docs/storage.md"])
def test_the_low_memory_table_quotes_the_committed_benchmark_record(document):
    tables = benchmark("memory_table")
    record = committed_record("memory")
    path = BENCHMARKS.parent / document
    quoted = _table_rows(path)
    for name, cells in tables.table_cells(record).items():
        assert quoted[name][: len(cells)] == cells, (document, name)
    text = " ".join(path.read_text().split())
    assert tables.training_sentence(record) in text
    assert tables.spread_sentence(record) in text
    assert tables.fast_rounds_sentence(record) in text
    assert tables.bandwidth_sentence(record) in text


def test_the_benchmark_readme_quotes_the_ratios_in_the_rounds_with_the_fastest_float32_step():
    tables = benchmark("memory_table")
    record = committed_record("memory")
    text = " ".join((BENCHMARKS / "README.md").read_text().split())
    assert tables.fast_rounds_sentence(record) in text
    assert tables.bandwidth_sentence(record) in text


def _update_step_runs(parameters: int) -> dict[int, dict]:
    """The committed update-step record's runs of `parameters` parameters, by leaf count."""
    runs = committed_record("update_step")["runs"]
    return {run["leaves"]: run for run in runs if run["parameters"] == parameters}


# The unpacked and packed steps of update_step.py, plain and centered with momentum.
RJ, RJ_CM = "rj.rmsprop", "rj.rmsprop centered+momentum"
PACKED, PACKED_CM = (
    "rj.pack_small_leaves(rmsprop)",
    "rj.pack_small_leaves(rmsprop centered+momentum)",
)


def _compile_seconds(run: dict, name: str) -> float:
    return run["results"][name]["compile_seconds"]


def _packed_compile_ratios() -> list[str]:
    """Compile time packed / unpacked at 512 and 2048 leaves of 1M: plain, then c+m."""
    runs = _update_step_runs(2**20)
    return [
        f"{_compile_seconds(runs[n], packed) / _compile_seconds(runs[n], unpacked):.2f}"
        for packed, unpacked in ((PACKED, RJ), (PACKED_CM, RJ_CM))
        for n in (512, 2048)
    ]


def test_the_benchmark_readme_quotes_the_committed_update_step_tables():
    update_step = benchmark("update_step")
    record = committed_record("update_step")
    text = (BENCHMARKS / "README.md").read_text()
    lines = text.splitlines()
    tables = update_step.markdown_table(record["runs"]).splitlines()
    assert [line for line in tables if line not in lines] == []

    def compile_row(run):
        cells = []
        for unpacked, packed in ((RJ, PACKED), (RJ_CM, PACKED_CM)):
            seconds = _compile_seconds(run, unpacked), _compile_seconds(run, packed)
            cells += [f"{seconds[0]:.2f}", f"{seconds[1]:.2f}", f"{seconds[1] / seconds[0]:.2f}"]
        for unpacked, packed in ((RJ, PACKED), (RJ_CM, PACKED_CM)):
            cells.append(f"{update_step.paired_ratio(run['results'], packed, unpacked):.2f}")
        return markdown_row("1M", str(run["leaves"]), str(2**20 // run["leaves"]), *cells)

    runs = _update_step_runs(2**20)
    rows = [compile_row(runs[n]) for n in (512, 2048)]
    assert [row for row in rows if row not in lines] == []
    plain, plain_2048, centered, centered_2048 = _packed_compile_ratios()
    assert (
        f"The packed step compiles in about the unpacked step's time ({plain}x and {plain_2048}x), "
        f"in {centered}x and {centered_2048}x of it with centered + momentum"
    ) in " ".join(text.split())


@pytest.mark.parametrize("document", ["README.md", "docs/performance.md"])
def test_the_performance_section_quotes_the_committed_update_step_record(document):
    update_step = benchmark("update_step")
    record = committed_record("update_step")
    lines = (BENCHMARKS.parent / document).read_text().splitlines()

    def ms(run, name):
        return f"{run['results'][name]['seconds'] * 1e3:.2f}"

    def fastest_torch(run):
        names = ("torch foreach=True", "torch foreach=False")
        return f"{min(run['results'][name]['seconds'] for name in names) * 1e3:.2f}"

    def packed(run, name, unpacked):
        ratio = update_step.paired_ratio(run["results"], name, unpacked)
        return f"{ms(run, name)} ms ({ratio:.2f}x)"

    large = [_update_step_runs(2**24)[n] for n in (1, 64, 512, 2048)]
    small = [_update_step_runs(2**20)[n] for n in (512, 2048)]
    expected = [
        markdown_row("`rj.rmsprop`", *[ms(run, RJ) for run in large]),
        markdown_row(
            "`optax.rmsprop` (same settings)", *[ms(run, "optax.rmsprop") for run in large]
        ),
        markdown_row(
            "`rj` / `optax`, paired",
            *[
                f"{update_step.paired_ratio(run['results'], RJ, 'optax.rmsprop'):.2f}"
                for run in large
            ],
        ),
        markdown_row("fastest `torch.optim.RMSprop`", *[fastest_torch(run) for run in large]),
        markdown_row("bare SGD step `p - lr * g`", *[ms(run, "sgd (floor)") for run in large]),
        markdown_row("`rj.rmsprop`", *[f"{ms(run, RJ)} ms" for run in small]),
        markdown_row("packed", *[packed(run, PACKED, RJ) for run in small]),
        markdown_row(
            "`rj.rmsprop` centered + momentum", *[f"{ms(run, RJ_CM)} ms" for run in small]
        ),
        markdown_row("packed", *[packed(run, PACKED_CM, RJ_CM) for run in small]),
    ]
    assert [line for line in expected if line not in lines] == []
    text = " ".join(" ".join(lines).split())
    versus_torch = record["targets"]["rj_over_fastest_torch_16M"].values()
    assert (
        f"It takes {min(versus_torch):.2f}x to {max(versus_torch):.2f}x the time of PyTorch's step"
    ) in text
    plain, plain_2048, centered, centered_2048 = _packed_compile_ratios()
    assert (
        f"({plain}x and {plain_2048}x; {centered}x and {centered_2048}x centered with momentum"
    ) in text


def test_the_benchmark_readme_quotes_the_committed_sweep_record():
    record = committed_record("sweep")
    lines = (BENCHMARKS / "README.md").read_text().splitlines()
    rows = [
        f"| {row['hidden']} | {row['sequential_s']:.3f} s | {row['vmapped_s']:.3f} s "
        f"| {row['speedup']:.2f}x | {row['sequential_compile_s']:.2f} s "
        f"| {row['vmapped_compile_s']:.2f} s |"
        for row in record["rows"]
    ]
    assert [row for row in rows if row not in lines] == []


FORMATS = ("float32", "bfloat16", "int8", "factored")
BYTES = ("arguments", "temporary", "peak")  # per parameter, in memory.py's record


def test_the_benchmark_readme_quotes_the_committed_low_memory_record():
    record = committed_record("memory")
    lines = (BENCHMARKS / "README.md").read_text().splitlines()

    def label(name):
        return name if name.startswith("optax") else f"rj {name}"

    expected = [
        markdown_row(
            name,
            f"{record['memory'][name]['plain']['bytes_per_parameter']:.4f}",
            f"{record['memory'][name]['centered']['bytes_per_parameter']:.4f}",
        )
        for name in FORMATS
    ]
    for variant, steps in record["update_step"]["variants"].items():
        for name, step in steps.items():
            first, third = step["relative_to_float32_quartiles"]
            expected.append(
                markdown_row(
                    "plain" if variant == "plain" else "c+m",
                    label(name),
                    *(f"{step[f'{kind}_bytes_per_parameter']:.2f}" for kind in BYTES),
                    f"{1e3 * step['median_seconds']:.1f}",
                    f"{step['relative_to_float32']:.2f}x",
                    f"{first:.2f}x-{third:.2f}x",
                )
            )
    for name, step in record["training_step"]["formats"].items():
        bytes_per_parameter = (f"{step[f'{kind}_bytes_per_parameter']:.2f}" for kind in BYTES)
        expected.append(
            markdown_row(label(name), *bytes_per_parameter, f"{step['saved_against_float32']:+.2f}")
        )
    for configuration, formats in record["quality"].items():
        if configuration == "least_squares_optimum":
            continue
        for index, name in enumerate(FORMATS):
            quality = formats[name]
            differences = (
                ("", "", "")
                if name == "float32"
                else (
                    f"{100 * quality['digits_train_loss_relative_difference']:+.2f}%",
                    f"{quality['accuracy_difference_points']:+.2f}",
                    f"{100 * quality['least_squares_loss_relative_difference']:+.2f}%",
                )
            )
            expected.append(
                markdown_row(
                    configuration if index == 0 else "",
                    name,
                    f"{quality['digits_train_loss']['mean']:.5f}",
                    differences[0],
                    f"{quality['digits_test_accuracy']['mean']:.2f}",
                    differences[1],
                    f"{quality['least_squares_loss']['mean']:.5f}",
                    differences[2],
                )
            )
    quoted = [" ".join(line.split()) for line in lines]  # the table pads some empty cells
    missing = [
        line for line in expected if not any(q.startswith(" ".join(line.split())) for q in quoted)
    ]
    assert missing == []


def test_the_rounds_split_by_float32_speed_into_the_fastest_third_and_the_others():
    tables = benchmark("memory_table")
    float32 = [0.6, 0.1, 0.5, 0.2, 0.4, 0.3]
    int8 = [0.6, 0.3, 1.0, 0.4, 0.4, 0.3]  # 3x and 2x float32 in its two fastest rounds.
    rows = {"float32": {"seconds_per_repeat": float32}, "int8": {"seconds_per_repeat": int8}}
    record = {"update_step": {"variants": {"plain": rows}}}
    split = tables.split_by_float32_speed(record)["plain"]
    assert split["float32_seconds"] == {"fast": [0.1, 0.2], "other": [0.3, 0.4, 0.5, 0.6]}
    assert split["ratios"]["int8"]["fast"] == pytest.approx(2.5)
    assert split["ratios"]["int8"]["other"] == pytest.approx(1.0)
    assert split["ratios"]["float32"] == {"fast": 1.0, "other": 1.0}
    assert split["median_seconds"]["float32"] == pytest.approx({"fast": 0.15, "other": 0.45})
    assert split["median_seconds"]["int8"] == pytest.approx({"fast": 0.35, "other": 0.5})


def test_the_bandwidth_sentence_compares_each_step_in_the_fast_rounds_with_the_others():
    tables = benchmark("memory_table")

    def rows(float32, **others):
        times = {"float32": float32, **others}
        return {name: {"seconds_per_repeat": seconds} for name, seconds in times.items()}

    slow_then_fast = [0.4, 0.4, 0.1, 0.1, 0.2, 0.2]  # The fastest third: the 3rd and 4th.
    steady = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    slower = [1.0, 1.0, 1.3, 1.3, 1.0, 1.0]
    plain = rows(slow_then_fast, bfloat16=steady, int8=slower, factored=steady)
    plain["optax.adam"] = {"seconds_per_repeat": slow_then_fast}
    record = {
        "update_step": {
            "variants": {
                "plain": plain,
                "centered + momentum": rows(
                    slow_then_fast, bfloat16=steady, int8=steady, factored=slower
                ),
            }
        }
    }
    sentence = tables.bandwidth_sentence(record)
    assert "0.33x / 0.33x with float32 (`optax.adam`, plain: 0.33x)" in sentence
    assert "1.00x / 1.00x with bfloat16, 1.30x / 1.00x with int8 and 1.00x / 1.30x" in sentence
    del plain["int8"]["seconds_per_repeat"]
    assert tables.bandwidth_sentence(record) is None


def test_memory_xla_options_are_parsed_and_never_replace_the_committed_record(capsys):
    memory = benchmark("memory")
    assert memory.parse_xla_option("xla_cpu_prefer_vector_width=512") == (
        "xla_cpu_prefer_vector_width",
        512,
    )
    assert memory.parse_xla_option("some_flag=True") == ("some_flag", True)
    assert memory.parse_xla_option("some_flag=fast") == ("some_flag", "fast")
    with pytest.raises(SystemExit) as stop:
        memory.main(["--xla-option", "xla_cpu_prefer_vector_width"])
    assert stop.value.code == 2
    assert "expected NAME=VALUE, got 'xla_cpu_prefer_vector_width'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        memory.main(["--xla-option", "xla_cpu_prefer_vector_width=512", "--update-results"])
    assert stop.value.code == 2
    assert "records XLA's default compilation" in capsys.readouterr().err


def test_memory_figures_need_the_backends_memory_analysis():
    import jax
    import jax.numpy as jnp

    memory = benchmark("memory")
    compiled = jax.jit(lambda x: x * 2, donate_argnums=0).lower(jnp.ones(1024)).compile()
    figures = memory.compiled_memory(compiled, 1024)
    assert figures["arguments_bytes_per_parameter"] == 4.0

    class WithoutAnalysis:
        def memory_analysis(self):
            return None  # what `Compiled.memory_analysis()` gives on backends without one

    with pytest.raises(RuntimeError, match="no memory analysis on this backend"):
        memory.compiled_memory(WithoutAnalysis(), 1024)


def test_memory_times_every_format_in_every_variant_and_8_bit_mu_where_centered():
    import jax.numpy as jnp

    import rmsprop_jax as rj

    memory = benchmark("memory")
    contenders = memory._contenders()
    for variant in memory.VARIANTS:
        assert {name for v, name in contenders if v == variant} >= set(memory.FORMATS)
    eight_bit = contenders["centered + momentum", memory.EIGHT_BIT_MU]
    params = {"w": jnp.ones((64, 128))}
    assert isinstance(eight_bit.init(params)[2].mu, rj.QuantizedMoment)
    assert ("plain", memory.EIGHT_BIT_MU) not in contenders


def test_memory_compiles_the_timed_steps_with_the_xla_options(monkeypatch):
    import jax.numpy as jnp

    import rmsprop_jax as rj

    memory = benchmark("memory")
    monkeypatch.setattr(memory, "transformer_init", lambda key: {"w": jnp.ones((64, 64))})
    monkeypatch.setattr(memory, "_contenders", lambda: {("plain", "float32"): rj.rmsprop(1e-3)})
    options = {"xla_cpu_prefer_vector_width": 512}
    rows = memory.measure_update_step(repeats=1, steps=1, compiler_options=options)
    assert rows["variants"]["plain"]["float32"]["relative_to_float32"] == 1.0
    # An option XLA does not know reaches the compiler, which refuses it.
    with pytest.raises(Exception, match="no_such_xla_option"):
        memory.measure_update_step(repeats=1, steps=1, compiler_options={"no_such_xla_option": 1})


def test_the_variant_table_quotes_the_committed_variant_memory_record():
    record = committed_record("variant_memory")
    text = (BENCHMARKS / "README.md").read_text()
    for variant, row in record["memory"].items():
        if variant == "parameters":
            continue
        cells = [
            ""
            if (step := row["steps"].get(name)) is None
            else f"{step['temporary_bytes_per_parameter']:.2f} / "
            f"{step['peak_bytes_per_parameter']:.2f} / {step['relative_to_float32']:.2f}"
            for name in ("float32", "bfloat16", "int8", "factored", "optax")
        ]
        assert f"| {variant} | " + " | ".join(cells) + " |" in text, variant


def test_the_step_profile_table_quotes_the_committed_record():
    record = committed_record("step_profile")
    text = (BENCHMARKS / "README.md").read_text()
    rows = benchmark("step_profile").markdown_rows(record["update_step"])
    assert len(rows) == 8
    for row in rows:
        assert row in text, row


def _small_step(**options):
    import jax
    import jax.numpy as jnp

    import rmsprop_jax as rj

    memory = benchmark("memory")
    tx = rj.rmsprop(1e-3, moment_storage="int8", **options)
    params = {"w": jnp.ones((64, 256)), "b": jnp.ones(8)}
    state = tx.init(params)
    compiled = (
        jax.jit(memory.update_step(tx), donate_argnums=(0, 1))
        .lower(params, state, params)
        .compile()
    )
    return compiled, params, state


def test_step_profile_charges_each_kernel_to_the_output_it_writes():
    profile = benchmark("step_profile")
    compiled, params, state = _small_step(centered=True, momentum=0.9)
    roles = profile.output_roles(params, state)
    assert roles[:2] == ["parameters", "parameters"] and roles.count("parameters") == 2
    assert {"second moment", "first moment", "momentum", "other state"} <= set(roles)

    module, written, nested = profile.kernel_roles(compiled.as_text(), roles)
    assert module == "jit_step"
    # The step seeds' conditional (`rmsprop_jax._runtime_integers`), calls or loops with older
    # JAX: left out of the kernel times, as their events span the kernels they run.
    assert nested and all(name.startswith(("cond", "call", "while")) for name in nested)
    assert not nested & set(written)
    # Every kind of output is written by a kernel of its own (the 8-bit codes of `w`, the
    # small leaf `b` kept in float32, the momentum buffer, the parameters).
    assert {"parameters", "second moment", "first moment", "momentum"} <= set(written.values())
    with pytest.raises(ValueError, match="outputs in the program"):
        profile.kernel_roles(compiled.as_text(), roles[:-1])
    with pytest.raises(ValueError, match="no HloModule"):
        profile.kernel_roles("ENTRY %main {\n}", roles)


def test_step_profile_sums_kernel_time_per_role_and_counts_kernels_at_once():
    profile = benchmark("step_profile")

    def kernel(name, start, duration, module="jit_step"):
        args = {"hlo_module": module, "hlo_op": name}
        return {"ph": "X", "name": name, "ts": start, "dur": duration, "args": args}

    trace = [
        kernel("fusion.1", 0, 1000),  # writes the parameters, alone
        kernel("fusion.2", 1000, 2000),  # two intermediates side by side
        kernel("reduce.3", 1000, 2000),
        kernel("fusion.1", 3000, 1000),
        kernel("fusion.9", 0, 5000, module="jit_other"),  # another program's: left out
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 4000, "args": {}},
        kernel("while.4", 0, 4000),  # a loop: its kernels are traced one by one
    ]
    roles = {"fusion.1": "parameters"}
    times = profile.kernel_times([trace], "jit_step", 2, roles, {"while.4"})
    assert times["kernels_per_step"] == 2
    assert times["at_once"] == pytest.approx(6000 / 4000)
    assert times["roles"]["parameters"] == {"milliseconds_per_step": 1.0, "at_once": 1.0}
    assert times["roles"]["intermediates"] == {"milliseconds_per_step": 2.0, "at_once": 2.0}

    # A second trace (its clock starting at 0 again) adds its steps, never overlapping the first.
    second = [kernel("fusion.1", 0, 3000), kernel("reduce.3", 0, 1000)]
    both = profile.kernel_times([trace, second], "jit_step", 2, roles, {"while.4"})
    assert both["kernels_per_step"] == 6 / 4
    assert both["at_once"] == pytest.approx((6000 + 4000) / (4000 + 3000))
    assert both["roles"]["parameters"]["milliseconds_per_step"] == pytest.approx(5 / 4)
    assert both["roles"]["intermediates"]["at_once"] == pytest.approx(5000 / 3000)
    with pytest.raises(RuntimeError, match="no kernel events of jit_none"):
        profile.kernel_times([trace], "jit_none", 1, {})


@pytest.mark.slow
def test_step_profile_reads_the_kernels_of_a_traced_step():
    import jax

    profile = benchmark("step_profile")
    compiled, params, state = _small_step()
    grads = jax.tree.map(lambda p: p * 0.5, params)
    carry = compiled(params, state, grads)
    carry, events = profile.traced_steps(compiled, carry, grads, 2)
    module, written, nested = profile.kernel_roles(compiled.as_text(), profile.output_roles(*carry))
    times = profile.kernel_times([events], module, 2, written, nested)
    assert times["kernels_per_step"] >= 1
    assert sum(r["milliseconds_per_step"] for r in times["roles"].values()) > 0


def _update_step_state(tx, params, grads):
    import jax

    return jax.jit(lambda p, s, g: tx.update(g, s, p)[1]).lower(params, tx.init(params), grads)


@pytest.mark.parametrize(
    ("moment_storage", "options", "stand_in"),
    [
        ("int8", {}, "block_maxima_stand_in"),
        ("factored", {"centered": True, "momentum": 0.9}, "statistics_stand_in"),
    ],
)
def test_the_reductions_stand_ins_change_the_step_and_are_put_back(
    moment_storage, options, stand_in
):
    import jax
    import jax.numpy as jnp

    import rmsprop_jax as rj
    from rmsprop_jax import storage
    from rmsprop_jax._jax_compat import JAX_VERSION
    from rmsprop_jax.storage import _sums, int8

    reductions = benchmark("reductions")
    originals = (int8.finite_maxima, storage.fused_sums)
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.random.normal(keys[0], (256, 512))}
    grads = {"w": jax.random.normal(keys[1], (256, 512)) * jnp.linspace(0.1, 10.0, 512)}
    tx = rj.rmsprop(1e-3, moment_storage=moment_storage, **options)
    real = _update_step_state(tx, params, grads).compile()
    state = tx.init(params)

    def replaced():
        return _update_step_state(tx, params, grads).compile()

    if moment_storage == "factored" and JAX_VERSION < _sums.SUMS_FUSE_FROM:
        # This release updates factored leaves in row chunks, without the fused sums.
        with pytest.raises(RuntimeError, match="never called the function it replaces"):
            reductions.traced_with(getattr(reductions, stand_in), replaced)
    else:
        stood_in = reductions.traced_with(getattr(reductions, stand_in), replaced)
        real_state = real(params, state, grads)
        stood_in_state = stood_in(params, state, grads)
        assert any(
            not jnp.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(real_state), jax.tree.leaves(stood_in_state), strict=True
            )
        )
    assert (int8.finite_maxima, storage.fused_sums) == originals


def test_the_reductions_tables_quote_the_committed_record():
    reductions = benchmark("reductions")
    record = committed_record("reductions")
    text = (BENCHMARKS / "README.md").read_text()
    for line in reductions.step_rows(record["update_step"]) + reductions.leaf_rows(record["leaf"]):
        assert line in text, line
    assert reductions.factored_sentence(record) in text
    assert reductions.int8_sentence(record) in text
