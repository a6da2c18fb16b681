"""Speed and memory of the reference model, the reads and the seed vmap.

    python -m experiments.benchmark [--quick] [--json PATH]

Times (after compilation and a warm-up, medians over repeats):

* ``train_step``: forward, backward and AdamW of the reference model at
  v80/s512, batch 16 (and 64 unless --quick), one seed, raw and NS5 reads;
  and 24 seeds vmapped against one seed at the same shape (length 128);
* ``eval_forward``: the model's forward pass at v80/s512, batch 16;
* ``read``: NS5 alone over a batch of 48x48 matrices, in GFLOP/s, next to
  ``gemm``: one large float32 matrix product in the same process;
* ``train_step_memory``: peak resident memory of a process that runs one NS5
  training step at batch 64, length 1024 (measured in a child process).

Prints a table and, with --json, writes the figures with the device kind,
the JAX version and the configuration, so runs on other machines compare.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_QUICK = flags.DEFINE_bool("quick", False, "Fewer shapes and repeats (under 5 minutes on 2 cores).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_MEMORY_CHILD = flags.DEFINE_bool("memory_child", False, "Internal: run one step, print peak RSS.")

VOCAB, SEQ_LEN, NOISE, FRAC_NOISE = 80, 512, 16, 0.8


def _median_seconds(fn, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn())  # Compilation and warm-up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step_runner(read_name: str, batch: int, seq_len: int, seeds: int):
    """A closure running one training step of ``seeds`` seeds."""
    import jax
    import numpy as np
    from orthorecall import data, model, training
    from orthorecall.newton_schulz import read_from_name

    config = model.ModelConfig(vocab_size=VOCAB, read=read_from_name(read_name))
    optimizer = training.make_optimizer()
    seed_ids = np.arange(seeds)
    states = {read_name: training.init_seed_states(seed_ids, config, optimizer)}
    keys = jax.vmap(jax.random.PRNGKey)(jax.numpy.asarray(seed_ids, jax.numpy.uint32))
    sample = lambda key: data.sample_noisy_recall(
        key, batch_size=batch, vocab_size=VOCAB, seq_len=seq_len, noise_vocab_size=NOISE,
        frac_noise=FRAC_NOISE)
    step = training.make_train_step({read_name: config}, optimizer, sample)
    carry = {"states": states, "keys": keys}

    def run():
        carry["states"], carry["keys"], metrics = step(carry["states"], carry["keys"], None)
        return metrics
    return run


def bench_train_step(read_name, batch, seq_len, seeds, repeats):
    seconds = _median_seconds(_train_step_runner(read_name, batch, seq_len, seeds), repeats)
    tokens = seeds * batch * (seq_len - 1)
    return {"name": "train_step", "read": read_name, "batch": batch, "seq_len": seq_len,
            "seeds": seeds, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_seed": tokens / seconds / seeds}


def bench_eval_forward(read_name, batch, repeats):
    import jax
    from orthorecall import data, model
    from orthorecall.newton_schulz import read_from_name

    config = model.ModelConfig(vocab_size=VOCAB, read=read_from_name(read_name))
    params = model.init_params(jax.random.PRNGKey(0), config)
    tokens, _ = data.sample_noisy_recall(
        jax.random.PRNGKey(1), batch_size=batch, vocab_size=VOCAB, seq_len=SEQ_LEN,
        noise_vocab_size=NOISE, frac_noise=FRAC_NOISE, is_training=False)
    forward = jax.jit(model.apply, static_argnames="config")
    seconds = _median_seconds(lambda: forward(params, tokens, config=config), repeats)
    count = batch * (SEQ_LEN - 1)
    return {"name": "eval_forward", "read": read_name, "batch": batch, "seq_len": SEQ_LEN,
            "seeds": 1, "seconds": seconds, "tokens_per_s": count / seconds}


def bench_read_and_gemm(repeats, num_matrices=8192, dim=48, gemm_dim=2048):
    import jax
    import jax.numpy as jnp
    from orthorecall.newton_schulz import newton_schulz

    x = jax.random.normal(jax.random.PRNGKey(0), (num_matrices, dim, dim))
    ns5 = jax.jit(lambda m: newton_schulz(m, 5))
    read_seconds = _median_seconds(lambda: ns5(x), repeats)
    read_flops = 5 * 2 * 2 * dim**3 * num_matrices  # two d x d products per iteration
    a = jax.random.normal(jax.random.PRNGKey(1), (gemm_dim, gemm_dim))
    gemm = jax.jit(lambda m: m @ m)
    gemm_seconds = _median_seconds(lambda: gemm(a), repeats)
    gemm_gflops = 2 * gemm_dim**3 / gemm_seconds / 1e9
    read_gflops = read_flops / read_seconds / 1e9
    return [
        {"name": "read", "read": "ns5", "batch": num_matrices, "seq_len": None, "seeds": None,
         "matrix_dim": dim, "seconds": read_seconds, "gflops": read_gflops,
         "fraction_of_gemm": read_gflops / gemm_gflops},
        {"name": "gemm", "read": None, "batch": None, "seq_len": None, "seeds": None,
         "matrix_dim": gemm_dim, "seconds": gemm_seconds, "gflops": gemm_gflops},
    ]


def bench_memory(batch=64, seq_len=1024):
    """Peak RSS of a fresh process running one NS5 training step."""
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--memory_child",
         f"--json=/dev/null"], capture_output=True, text=True, check=True,
        env=None, timeout=3600)
    peak = int(done.stdout.strip().splitlines()[-1])
    return {"name": "train_step_memory", "read": "ns5", "batch": batch, "seq_len": seq_len,
            "seeds": 1, "peak_rss_bytes": peak}


def _memory_child():
    import jax
    run = _train_step_runner("ns5", 64, 1024, 1)
    jax.block_until_ready(run())
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _format(records) -> str:
    lines = [f"{'name':<18}{'read':<6}{'batch':>7}{'len':>6}{'seeds':>6}  figure"]
    for r in records:
        if "tokens_per_s" in r:
            figure = f"{r['tokens_per_s']:,.0f} tokens/s ({r['seconds']:.3f} s)"
        elif "gflops" in r:
            figure = f"{r['gflops']:.1f} GFLOP/s"
            if "fraction_of_gemm" in r:
                figure += f" = {100 * r['fraction_of_gemm']:.0f}% of gemm"
        else:
            figure = f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
        cells = [r["name"], r["read"] or "", r["batch"] or "", r["seq_len"] or "", r["seeds"] or ""]
        lines.append(f"{cells[0]:<18}{cells[1]:<6}{str(cells[2]):>7}{str(cells[3]):>6}"
                     f"{str(cells[4]):>6}  {figure}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MEMORY_CHILD.value:
        _memory_child()
        return
    import jax

    quick = _QUICK.value
    repeats = 2 if quick else 5
    records = []
    for read in ("raw", "ns5"):
        for batch in ((16,) if quick else (16, 64)):
            records.append(bench_train_step(read, batch, SEQ_LEN, 1, repeats))
        records.append(bench_eval_forward(read, 16, repeats))
    # The seed-vmap pair at a short length so --quick stays short.
    seed_batch = 2 if quick else 16
    for seeds in (1, 24):
        records.append(bench_train_step("ns5", seed_batch, 128, seeds, repeats))
    records.extend(bench_read_and_gemm(repeats))
    records.append(bench_memory())
    device = jax.devices()[0]
    out = {"device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
           "jax_version": jax.__version__, "quick": quick, "machine": platform.machine(),
           "records": records}
    print(f"{out['device']} x{out['num_devices']}, jax {out['jax_version']}")
    print(_format(records))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
