"""Records the reference trainer's initial weights and first steps, the data behind the
parity tests and the ``parity`` preset (``data/reference_parity/``).

Run it with the reference's own environment, not the project's (it imports neither JAX
nor orthorecall). One-time setup, outside the project:

    # the reference code (no-way-labs/recurrent-memory-scaffold, MIT), anywhere:
    git clone https://github.com/no-way-labs/recurrent-memory-scaffold /tmp/refscratch
    python3 -m venv /tmp/refvenv
    PIP_FIND_LINKS=/opt/wheels /tmp/refvenv/bin/pip install torch==2.13.0 xlstm==2.0.0 numpy

then

    /tmp/refvenv/bin/python experiments/parity/record_reference.py \\
        --reference_dir=/tmp/refscratch --out=data/reference_parity

What it records, for the reference's main protocol (v80/s512, batch 16, lr 3e-3, cosine
over 2,000 steps, dim 94) and the reference's own functions (``memrec.train``'s seeding,
model construction, optimizer, batches and evaluation, in ``train_one``'s order):

* ``init/v80_s512_seed{seed}_init.pt``: every seed's initial state dict, as
  ``train_one`` builds it, in the ``{"state_dict", "cfg"}`` format the reference's
  checkpoints use. ``init_identical`` in the summary says whether the two variants
  (``baseline``, ``ns5``) start from the same weights: when they do, one file holds them
  (with the baseline's cfg); otherwise each variant gets its own,
  ``v80_s512_{variant}_seed{seed}_init.pt``;
* ``first_steps.json``: for ``--step_seeds``, both variants, every step of the first
  ``--steps``: the training loss, the gradient norm before clipping and the learning rate
  the step used; then the validation loss and accuracy after the last of them, as
  ``train_one``'s ``evaluate`` computes them;
* ``after_steps/v80_s512_{variant}_seed{seed}_step{steps}.pt``: the parameters then.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

VOCAB, SEQ_LEN, DIM, BATCH, LR, TOTAL_STEPS = 80, 512, 94, 16, 3e-3, 2000
VARIANTS = ("baseline", "ns5")


def _import_reference(reference_dir: pathlib.Path):
    if not (reference_dir / "memrec" / "train.py").is_file():
        raise SystemExit(
            f"record_reference_parity: {reference_dir} is not a checkout of "
            "no-way-labs/recurrent-memory-scaffold (no memrec/train.py); pass its path "
            "with --reference_dir."
        )
    sys.path.insert(0, str(reference_dir))
    try:
        from memrec import train
    except ImportError as error:
        raise SystemExit(
            f"record_reference_parity: cannot import the reference ({error}); run this "
            "script with the reference's environment (torch==2.13.0, xlstm==2.0.0)."
        ) from error
    return train


def _config(train, variant: str, seed: int) -> dict:
    """``train_one``'s merged configuration for the main protocol."""
    return {
        **train.DEFAULTS,
        "variant": variant,
        "seed": seed,
        "vocab_size": VOCAB,
        "seq_len": SEQ_LEN,
        "dim": DIM,
        "batch_size": BATCH,
        "lr": LR,
        "steps": TOTAL_STEPS,
    }


def _build(train, c: dict):
    """``train_one``'s set-up, in its order: seeding, the task, the model, the optimizer,
    the training stream and the validation batches."""
    import numpy as np

    train.set_seed(c["seed"])
    mad = train.MADRecallConfig(
        c["vocab_size"], c["seq_len"], c["seq_len"], c["noise_vocab_size"], c["frac_noise"]
    )
    sample_x, _ = train.make_instance(mad, np.random.default_rng(c["seed"]), is_training=True)
    mad.context_length = len(sample_x)
    model = train.build_model(c["variant"], mad, c["dim"]).to("cpu")
    optimizers, sched, pre_step_hook = train._build_optimizers(
        c["variant"],
        model,
        c["lr"],
        c["weight_decay"],
        c["steps"],
        c["pogo_targets"],
        lr_schedule=c["lr_schedule"],
        qk_lr_mult=c["qk_lr_mult"],
    )
    return mad, model, optimizers, sched, pre_step_hook


def _save(torch, path: pathlib.Path, model, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "cfg": cfg}, path)


def _first_steps(train, torch, c: dict, steps: int, out: pathlib.Path) -> dict:
    """``train_one``'s loop body for ``steps`` steps, recording each step."""
    import numpy as np
    import torch.nn.functional as F

    mad, model, optimizers, sched, pre_step_hook = _build(train, c)
    train_rng = np.random.default_rng(c["seed"])
    val_batches = train.make_val_batches(
        mad, c["batch_size"], c["val_batches"], "cpu", seed=10_000 + c["seed"]
    )
    rows = []
    for step in range(1, steps + 1):
        model.train()
        x, y = train.make_batch(c["batch_size"], "cpu", mad, train_rng, is_training=True)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, mad.vocab_size), y.view(-1), ignore_index=-100)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        learning_rate = optimizers[0].param_groups[0]["lr"]
        pre_step_hook()
        for opt in optimizers:
            opt.step()
        sched.step()
        rows.append(
            {
                "step": step,
                "loss": float(loss.item()),
                "grad_norm": float(grad_norm.item()),
                "learning_rate": float(learning_rate),
            }
        )
        print(f"  {c['variant']} seed {c['seed']} step {step}: {rows[-1]}", flush=True)
    val_loss, val_accuracy = train.evaluate(model, val_batches, mad.vocab_size)
    cfg = {k: v for k, v in c.items() if k not in ("ckpt_dir", "device")}
    name = f"v{VOCAB}_s{SEQ_LEN}_{c['variant']}_seed{c['seed']}_step{steps}.pt"
    _save(torch, out / "after_steps" / name, model, cfg)
    return {
        "steps": rows,
        "val_loss": float(val_loss),
        "val_accuracy": float(val_accuracy),
        "parameters": f"after_steps/{name}",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference_dir", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--seeds", default="11-26", help="first-last seed of the init files")
    parser.add_argument("--step_seeds", default="11,12", help="seeds whose first steps are run")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    first, last = (int(s) for s in args.seeds.split("-"))
    step_seeds = [int(s) for s in args.step_seeds.split(",")]

    train = _import_reference(args.reference_dir)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    identical = {}
    for seed in range(first, last + 1):
        models, cfgs = {}, {}
        for variant in VARIANTS:
            c = _config(train, variant, seed)
            _, models[variant], *_ = _build(train, c)
            cfgs[variant] = {k: v for k, v in c.items() if k not in ("ckpt_dir", "device")}
        a, b = (models[v].state_dict() for v in VARIANTS)
        identical[seed] = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        print(f"seed {seed}: baseline and ns5 initial weights identical: {identical[seed]}")
        # One file when the variants start alike (the baseline's cfg), else one each.
        for variant in VARIANTS[:1] if identical[seed] else VARIANTS:
            tag = "" if identical[seed] else f"_{variant}"
            name = f"v{VOCAB}_s{SEQ_LEN}{tag}_seed{seed}_init.pt"
            _save(torch, args.out / "init" / name, models[variant], cfgs[variant])

    records = {}
    for seed in step_seeds:
        for variant in VARIANTS:
            start = time.perf_counter()
            record = _first_steps(train, torch, _config(train, variant, seed), args.steps, args.out)
            record["seconds"] = round(time.perf_counter() - start, 1)
            records[f"{variant}_seed{seed}"] = record

    commit = subprocess.run(
        ["git", "-C", str(args.reference_dir), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    summary = {
        "source": "no-way-labs/recurrent-memory-scaffold",
        "commit": commit,
        "protocol": {
            "vocab_size": VOCAB,
            "seq_len": SEQ_LEN,
            "dim": DIM,
            "batch_size": BATCH,
            "lr": LR,
            "schedule": "cosine",
            "total_steps": TOTAL_STEPS,
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "init_identical": {str(k): v for k, v in identical.items()},
        "first_steps": records,
    }
    (args.out / "first_steps.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
