"""Every benchmark of the lab in one command: `python -m cotlab_jax.bench all [--size=auto]`.

Runs the sampler, model, train, sweep, size_packing and quantize benchmarks one after another,
each in its own process (a crash or out-of-memory in one leaves the others' numbers), prints one
summary table and writes every benchmark's JSON plus `all.json` (the same numbers together)
under `--out_dir`.

Two plans, sized by `--size` (`auto`: `accelerator` when JAX's default backend is not the CPU):
- `cpu`: the laptop-sized cases (a few minutes on 2 cores).
- `accelerator`: the papers' shapes (the depth-4 and depth-12 reference Llamas), the sampler at
  16,384 tasks per call, and packing 16 depth-4, hidden-256 members; about 5 minutes on one
  H100/H200 including compiles.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from cotlab_jax.bench import positive_int

# label -> (benchmark, flags); each writes <out_dir>/<label>.json.
PLANS = {
    "cpu": {
        "sampler": ("sampler", []),
        "model": ("model", ["--shapes=cpu"]),
        "train_quickstart": ("train", ["--config=configs/quickstart.py"]),
        "sweep_8x_hidden64": ("sweep", ["--members=8", "--hidden_size=64"]),
        # The depth sweep {4, 8, 12}'s evaluation at a CPU width, and its reference-width
        # compile for a TPU topology (skipped without libtpu).
        "size_packing": ("size_packing", ["--cases=cpu,tpu_aot", "--repeats=1"]),
        "quantize": ("quantize", ["--shape=cpu"]),
    },
    "accelerator": {
        "sampler": ("sampler", ["--batch_size=16384"]),
        "model": ("model", ["--shapes=cpu,depth4,depth12"]),
        "train_quickstart": ("train", ["--config=configs/quickstart.py"]),
        "sweep_8x_hidden64": ("sweep", ["--members=8", "--hidden_size=64", "--repeats=3"]),
        "sweep_16x_depth4_hidden256": (
            "sweep",
            ["--members=16", "--hidden_size=256", "--num_hidden_layers=4", "--repeats=3"],
        ),
        "size_packing": ("size_packing", ["--cases=cpu,reference_compile", "--repeats=3"]),
        "quantize": ("quantize", ["--shape=depth4"]),
    },
}


PROBE = (
    "import json, jax; d = jax.devices()[0]; print(json.dumps(dict(backend="
    "jax.default_backend(), device_kind=d.device_kind, device_count=jax.device_count(), "
    "jax_version=jax.__version__)))"
)


def probe_devices() -> dict:
    """The backend and devices, asked in a child process: a JAX client in this process would
    hold accelerator memory (preallocation) while the benchmarks run."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def summary_rows(label: str, result: dict) -> list[tuple[str, str, str]]:
    """(benchmark, case, headline numbers) rows for one benchmark's JSON."""
    name = result["benchmark"]
    if name == "sampler":
        return [
            (label, r["case"], f"{r['jax_tasks_per_s']:,.0f} tasks/s ({r['speedup']:,.0f}x NumPy)")
            for r in result["rows"]
        ]
    if name == "model":
        rows = []
        for r in result["results"]:
            mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}%"
            rows.append(
                (
                    label,
                    f"{r['shape']} ({r['params'] / 1e6:.1f}M params)",
                    f"train {r['train_step_ms']:.1f} ms/step, "
                    f"{r['train_tokens_per_s']:,.0f} tokens/s{mfu}; decode "
                    f"{r['decode_tasks_per_s']:,.1f} tasks/s",
                )
            )
        return rows
    if name == "train":
        ms = result["seconds_per_step"]
        return [
            (
                label,
                f"batch {result['batch_size']} x {result['seq_len']}",
                f"loop step {1e3 * ms['sampled']:.1f} ms, presampled "
                f"{1e3 * ms['presampled']:.1f} ms (sampling {100 * result['overhead']:+.1f}%)",
            )
        ]
    if name == "sweep":
        ms = result["seconds_per_step"]
        return [
            (
                label,
                f"{result['members']} members, depth {result['num_hidden_layers']}, "
                f"hidden {result['hidden_size']}",
                f"packed {1e3 * ms['packed']:.1f} ms vs one by one "
                f"{1e3 * ms['one_by_one']:.1f} ms per step of all ({result['speedup']:.2f}x)",
            )
        ]
    if name == "size_packing":
        rows = []
        for case, r in result["results"].items():
            if "skipped" in r:
                rows.append((label, case, f"skipped: {r['skipped']}"))
                continue
            step = (
                f"; step {1e3 * r['step_s']['separate']:.1f} ms separate, "
                f"{1e3 * r['step_s']['packed']:.1f} ms packed ({r['step_speedup']:.2f}x)"
                if "step_s" in r
                else ""
            )
            rows.append(
                (
                    label,
                    f"{case}, depths {result['depths']}",
                    f"compile {r['separate_compile_s']:.1f} s separate, "
                    f"{r['packed_compile_s']:.1f} s packed ({r['compile_speedup']:.2f}x){step}",
                )
            )
        return rows
    if name == "quantize":
        return [
            (
                label,
                f"{result['shape']} {r['scheme']}",
                f"{r['bytes']:,d} bytes ({r['bytes_vs_dense']:.2f} of dense), decode "
                f"{r['decode_tasks_per_s']:,.1f} tasks/s ({r['speed_vs_dense']:.2f}x dense)",
            )
            for r in result["results"]
        ]
    return [(label, "", "(no summary)")]


def main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m cotlab_jax.bench all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", default="auto", choices=("auto", *PLANS))
    parser.add_argument("--only", default="", help="comma-separated labels of the plan to run")
    parser.add_argument("--timeout_s", type=positive_int, default=900, help="per benchmark")
    parser.add_argument("--out_dir", default="bench_results")
    args = parser.parse_args(argv[1:])
    devices = probe_devices()
    size = args.size
    if size == "auto":
        size = "cpu" if devices["backend"] == "cpu" else "accelerator"
    plan = PLANS[size]
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(plan))
        if unknown:
            parser.error(f"--only: unknown labels {unknown}; the {size} plan has {sorted(plan)}")
        plan = {label: plan[label] for label in args.only.split(",")}
    os.makedirs(args.out_dir, exist_ok=True)

    results, errors, seconds = {}, {}, {}
    start_all = time.perf_counter()
    for label, (benchmark, flags) in plan.items():
        out = os.path.join(args.out_dir, f"{label}.json")
        command = [sys.executable, "-m", "cotlab_jax.bench", benchmark, *flags, f"--out={out}"]
        print(f"\n=== {label}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        try:
            finished = subprocess.run(command, timeout=args.timeout_s, check=False)
            code = finished.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        seconds[label] = time.perf_counter() - start
        if code == 0 and os.path.exists(out):
            with open(out) as f:
                results[label] = json.load(f)
        else:
            errors[label] = f"exit {code}"

    rows = [row for label, result in results.items() for row in summary_rows(label, result)]
    rows += [(label, "FAILED", error) for label, error in errors.items()]
    print(
        f"\n{devices['device_kind']} x{devices['device_count']} ({devices['backend']}), jax "
        f"{devices['jax_version']}, plan '{size}', {time.perf_counter() - start_all:.0f} s "
        "in all"
    )
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for label, case, numbers in rows:
        print(f"{label:{widths[0]}s}  {case:{widths[1]}s}  {numbers}")
    summary = dict(
        benchmark="all",
        size=size,
        **devices,
        host=platform.node(),
        seconds=seconds,
        errors=errors,
        results=results,
    )
    path = os.path.join(args.out_dir, "all.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")
    if errors:
        sys.exit(f"failed: {', '.join(errors)}")
