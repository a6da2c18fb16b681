"""Times the reference PyTorch implementation the way ``experiments.benchmarks.model`` times ours.

Run it with the reference's own environment, not the project's (it imports neither JAX
nor orthorecall), on the machine and in the session where ``experiments.benchmarks.model`` runs,
so that the two sets of figures compare. One-time setup, outside the project:

    # the reference code (no-way-labs/recurrent-memory-scaffold, MIT), anywhere:
    git clone https://github.com/no-way-labs/recurrent-memory-scaffold /tmp/refscratch
    python3 -m venv /tmp/refvenv
    PIP_FIND_LINKS=/opt/wheels /tmp/refvenv/bin/pip install torch==2.13.0 xlstm==2.0.0 numpy

then

    /tmp/refvenv/bin/python experiments/benchmarks/reference.py \\
        --reference_dir=/tmp/refscratch [--quick | --smoke] --json=PATH

and ``python -m experiments.benchmarks.model --quick --reference_json=PATH`` right after, which
prints and records both side by side.

Measured exactly as ours: a training step (forward, cross-entropy, backward, gradient
clipping at 1.0, AdamW, the cosine schedule's step: the reference's ``train_one`` loop
body) and an evaluation forward under ``torch.no_grad``, on batches drawn beforehand by
the reference's own MAD generator, after one warm-up call, the median of repeats;
tokens/s = batch x the example length (511 at s512), as ``experiments.benchmarks.model`` counts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

VOCAB, SEQ_LEN, DIM = 80, 512, 94
VARIANTS = {"raw": "baseline", "ns5": "ns5"}


def _import_reference(reference_dir: pathlib.Path):
    if not (reference_dir / "memrec" / "models.py").is_file():
        raise SystemExit(
            f"benchmark_reference: {reference_dir} is not a checkout of "
            "no-way-labs/recurrent-memory-scaffold (no memrec/models.py); pass its path "
            "with --reference_dir."
        )
    sys.path.insert(0, str(reference_dir))
    try:
        import torch  # noqa: F401
        from memrec import data, models
    except ImportError as error:
        raise SystemExit(
            f"benchmark_reference: cannot import the reference ({error}); run this script "
            "with the reference's environment (torch==2.13.0, xlstm==2.0.0)."
        ) from error
    return data, models


# As experiments/benchmarks/model.py: repeats continue until 3 s are timed (at most 50).
MIN_TIMED_SECONDS = 3.0
_MAX_REPEATS = 50


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    # One repeat (--smoke) means exactly one.
    while len(times) < repeats or (
        repeats > 1 and sum(times) < MIN_TIMED_SECONDS and len(times) < _MAX_REPEATS
    ):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(reference_dir: pathlib.Path, batches, seq_len: int, repeats: int) -> list[dict]:
    data, models = _import_reference(reference_dir)
    import numpy as np
    import torch
    import torch.nn.functional as F

    records = []
    for read, variant in VARIANTS.items():
        for batch in batches:
            torch.manual_seed(0)
            mad = data.MADRecallConfig(VOCAB, seq_len, seq_len, 16, 0.8)
            rng = np.random.default_rng(0)
            x, y = data.make_batch(batch, torch.device("cpu"), mad, rng, is_training=True)
            mad.context_length = x.shape[1]
            model = models.build_model(variant, mad, DIM)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)

            def train_step(model=model, optimizer=optimizer, schedule=schedule, x=x, y=y):
                model.train()
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, VOCAB), y.view(-1), ignore_index=-100)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()

            def eval_forward(model=model, x=x):
                model.eval()
                with torch.no_grad():
                    model(x)

            tokens = batch * x.shape[1]
            for name, fn in (
                ("reference_train_step", train_step),
                ("reference_eval_forward", eval_forward),
            ):
                seconds = _median_seconds(fn, repeats)
                records.append(
                    {
                        "name": name,
                        "read": read,
                        "batch": batch,
                        "seq_len": seq_len,
                        "seconds": seconds,
                        "tokens_per_s": tokens / seconds,
                        "torch_version": torch.__version__,
                        "threads": torch.get_num_threads(),
                    }
                )
                print(
                    f"{name:<24}{read:<5}{batch:>4}  {tokens / seconds:,.0f} tokens/s", flush=True
                )
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference_dir", required=True, type=pathlib.Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="batch 16 only, 2 repeats")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    parser.add_argument("--json", type=pathlib.Path, help="write the records here")
    return parser


def check_json_path(parser: argparse.ArgumentParser, path: pathlib.Path | None) -> None:
    """Refuses (exit code 2, naming --json) a path that is a folder or whose folder does
    not exist, before anything is timed. (This script runs in the reference's
    environment, without the project's shared checks.)"""
    if path is None:
        return
    if path.is_dir():
        parser.error(f"--json: {path} is a folder; give the path of a file to write.")
    if not path.absolute().parent.is_dir():
        parser.error(f"--json: {path.absolute().parent} is not an existing folder.")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_json_path(parser, args.json)
    if args.smoke:
        batches, seq_len, repeats = (2,), 24, 1
    elif args.quick:
        batches, seq_len, repeats = (16,), SEQ_LEN, 2
    else:
        batches, seq_len, repeats = (16, 64), SEQ_LEN, 5
    records = run(args.reference_dir.resolve(), batches, seq_len, repeats)
    if args.json:
        args.json.write_text(json.dumps({"records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
