"""Feeds NaN, infinities and out-of-range integers to every numeric field of one
command, in one process (a JAX import costs seconds: one per command, not per case).

    python tests/cli_fault_driver.py MODULE SCRATCH_DIR

The fields are found, not listed: every integer or float flag the module defines (absl
or argparse), and every int or float leaf of its configuration file's preset (walked by
``experiments.study.config_checks.numeric_leaves``), so a field added later is covered too.
Each case parses the command line as the command does and calls its ``main``, with the
command's compute replaced by a function that records that it was reached. Prints one
JSON object: {"fields": [...], "cases": [{"field", "value", "code", "computed",
"message", "left"}]}, where ``left`` lists what the case left in the scratch folder.
Used by tests/test_cli_numeric_fields.py.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# What a refused value is, per kind of field.
BAD_INTEGERS = ("nan", "inf", "-1", str(2**64))
BAD_REALS = ("nan", "inf", "-inf")


class Computed(Exception):
    """The command reached its compute."""


def _compute(*args, **kwargs):
    raise Computed


# Per command: the arguments it needs besides the field, the compute to replace
# (module, attribute), and for commands with a configuration file, its preset.
def _commands(scratch: Path) -> dict:
    workdir = str(scratch / "out")
    return {
        "experiments.run": {
            "args": ["--config=configs/noisy_ar.py:smoke", f"--workdir={workdir}"],
            "compute": [("experiments.study.train", "_train_in_workdir")],
            "config": ("experiments.configs.noisy_ar", "smoke"),
        },
        "experiments.agents.ppo_main": {
            "args": ["--config=configs/popgym_ppo.py:smoke", f"--workdir={workdir}"],
            "compute": [("experiments.agents.train", "_train_in_workdir")],
            "config": ("experiments.configs.popgym_ppo", "smoke"),
        },
        "experiments.agents.world_model_main": {
            "args": [f"--out={workdir}", "--steps=1"],
            "compute": [("experiments.agents.world_model", "make_functions")],
        },
        "experiments.probes.probe": {
            "args": ["--probe=decode", "--checkpoint=missing.pt", f"--out={workdir}/p.json"],
            "compute": [
                ("experiments.probes.sources", "from_checkpoints"),
                ("experiments.probes.probe", "run"),
            ],
        },
        "experiments.study.evaluate_reference": {
            "args": ["--checkpoint=missing.pt"],
            "compute": [("experiments.study.evaluate_reference", "evaluate_checkpoint")],
        },
        "experiments.replication.importer": {
            "args": [f"--out={workdir}"],
            "compute": [("experiments.replication.importer", "import_records")],
            "define": True,
        },
        "experiments.replication.analyze": {
            "args": [f"--runs={scratch}"],
            "compute": [("experiments.replication.analyze", "compare_runs")],
            "define": True,
        },
        "experiments.benchmarks.model": {
            "args": [],
            "compute": [("experiments.benchmarks.model", "run_benchmark")],
        },
        "experiments.benchmarks.agents": {
            "args": ["--cores=gru"],
            "compute": [("experiments.benchmarks.agents", "measure")],
        },
        "experiments.benchmarks.data": {
            "args": [],
            "compute": [("experiments.benchmarks.data", "benchmark_generators")],
            "argparse": True,
        },
        "experiments.benchmarks.reference": {
            "args": [f"--reference_dir={scratch}"],
            "compute": [("experiments.benchmarks.reference", "run")],
            "argparse": True,
        },
    }


def _absl_fields(module, before: set, spec) -> list[tuple[str, str]]:
    from absl import flags

    fields = []
    for name in sorted(set(flags.FLAGS) - before):
        flag = flags.FLAGS[name]
        if name != flag.name:  # a short name
            continue
        if not flags.FLAGS.find_module_defining_flag(name, "").startswith("experiments"):
            continue  # absl's own (--verbosity, ...)
        kind = type(flag.parser).__name__
        if kind == "IntegerParser":
            fields.append((f"--{name}", "int"))
        elif kind == "FloatParser":
            fields.append((f"--{name}", "float"))
    if "config" in spec:
        from experiments.study.config_checks import numeric_leaves

        config_module, preset = spec["config"]
        config = importlib.import_module(config_module).get_config(preset)
        for field, value in numeric_leaves(config):
            kind = "int" if isinstance(value, int) else "float"
            fields.append((f"--config.{field}", kind))
    return fields


def _argparse_fields(module) -> list[tuple[str, str]]:
    fields = []
    for action in module.build_parser()._actions:
        if action.type in (int, float) and action.option_strings:
            fields.append((action.option_strings[-1], "int" if action.type is int else "float"))
    return fields


def main() -> None:
    module_name, scratch = sys.argv[1], Path(sys.argv[2])
    spec = _commands(scratch)[module_name]
    os.chdir(REPO_ROOT)
    from absl import flags

    before = set(flags.FLAGS)
    module = importlib.import_module(module_name)
    if spec.get("define"):
        module._FLAGS = module._define_flags()
    for target, attribute in spec["compute"]:
        setattr(importlib.import_module(target), attribute, _compute)
    if spec.get("argparse"):
        fields = _argparse_fields(module)
    else:
        fields = _absl_fields(module, before, spec)
        parse = getattr(module, "parse_flags", None)
        if parse is None:
            from experiments.study.cli import config_flag_parser

            parse = config_flag_parser(module_name.rsplit(".", 1)[1])
    program = module_name.rsplit(".", 1)[1]
    cases = []
    for field, kind in fields:
        for value in BAD_INTEGERS if kind == "int" else BAD_REALS:
            argv = [*spec["args"], f"{field}={value}"]
            stderr, code, computed = io.StringIO(), 0, False
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                try:
                    if spec.get("argparse"):
                        module.main(argv)
                    else:
                        flags.FLAGS.unparse_flags()
                        # The field flags a parse registers are registered again by the
                        # next one: drop them first.
                        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                            delattr(flags.FLAGS, name)
                        # ml_collections reads --config.FIELD overrides from sys.argv.
                        sys.argv = [program, *argv]
                        remaining = parse([program, *argv])
                        module.main(remaining)
                except SystemExit as e:
                    code = e.code
                except Computed:
                    computed = True
                except Exception as e:  # a traceback: reported as such
                    code = f"{type(e).__name__}: {e}"
            left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
            for path in scratch.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            cases.append(
                {
                    "field": field,
                    "value": value,
                    "code": code,
                    "computed": computed,
                    "message": stderr.getvalue().strip()[-600:],
                    "left": left,
                }
            )
    print(json.dumps({"fields": [f for f, _ in fields], "cases": cases}))


if __name__ == "__main__":
    main()
