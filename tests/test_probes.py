"""Probes of trained models (orthorecall.probes, orthorecall.ridge, experiments.probes.probe).

Tiny models (V = 24, D = 16, 2 heads, length 16) keep the library tests fast; the
reference checkpoints and a trained workdir run in the tests marked slow.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import cell, data, evaluation, mlstm, probes, ridge, torch_format
from orthorecall import model as model_lib
from orthorecall import reference_checkpoint as rc
from orthorecall.reads import NS5, RAW, read_from_name
from tests.conftest import REFERENCE_CHECKPOINTS, TINY_TASK, run_module

TASK = data.NoisyRecallTask(**TINY_TASK)
READS = {name: read_from_name(name) for name in ("raw", "ns5", "delta", "rls")}
# model.apply jitted (run eagerly it dispatches op by op, several seconds for a tiny model).
apply = jax.jit(model_lib.apply, static_argnames="config")


def tiny_model(read, num_blocks=1, seed=1):
    cell_config = cell.CellConfig(
        embedding_dim=16, num_heads=2, inner_multiple=8, chunk_size=8, read=read,
        num_blocks=num_blocks,
    )  # fmt: skip
    config = model_lib.ModelConfig(vocab_size=TASK.vocab_size, cell=cell_config)
    return model_lib.init_params(jax.random.PRNGKey(seed), config), config


@pytest.fixture(scope="module")
def validation():
    """Eight tiny recall sequences: (inputs, targets), each (8, 15)."""
    inputs, targets = data.reference_validation_set(TASK, seed=0, num_batches=1, batch_size=8)
    return inputs[0], targets[0]


# ---------------------------------------------------------------- the task's layout

# k0 v0 | noise | k1 v1 | k0 v0 (repeat) | k1 v1 (repeat) | probe k1 v1; keys 0-1,
# values 4-5, noise 8-9. Inputs drop the last token, targets the first.
HAND_TOKENS = [0, 4, 8, 9, 1, 5, 0, 4, 1, 5, 1, 5]
HAND_SCORED = {7: 4, 9: 5, 11: 5}  # full-sequence index of a scored value -> the value


def _hand_sequence():
    full_targets = np.full(len(HAND_TOKENS), -100)
    for index, value in HAND_SCORED.items():
        full_targets[index] = value
    return np.array(HAND_TOKENS[:-1]), full_targets[1:]


def test_stored_positions_of_a_hand_made_sequence():
    inputs, targets = _hand_sequence()
    stored = probes.stored_positions(inputs, targets)
    # k0 queried at 6 was stored at 0; k1 queried at 8 and (the probe) at 10, at 4.
    expected = np.full(len(inputs), -1)
    expected[[6, 8, 10]] = [0, 4, 4]
    np.testing.assert_array_equal(stored, expected)
    other = probes.other_key_positions(inputs, targets, stored, np.random.default_rng(0))
    # The only other key stored before each query: k1 (at 4) for k0, k0 (at 0) for k1.
    expected[[6, 8, 10]] = [4, 0, 0]
    np.testing.assert_array_equal(other, expected)


def test_stored_positions_of_generated_sequences(validation):
    inputs, targets = validation
    stored = probes.stored_positions(inputs, targets)
    assert ((stored >= 0) == (targets != -100)).all()
    rows, times = np.nonzero(stored >= 0)
    u = stored[rows, times]
    assert (u < times).all() and (u % 2 == 0).all()  # key slots start at even positions
    assert (inputs[rows, u] == inputs[rows, times]).all()
    assert (inputs[rows, u + 1] == targets[rows, times]).all()
    for row, t, first in zip(rows, times, u, strict=True):  # the key's first presentation
        assert first == np.flatnonzero(inputs[row, :t] == inputs[row, t])[0]


def test_stored_positions_refuse_what_is_not_a_recall_query():
    inputs, targets = _hand_sequence()
    targets = targets.copy()
    targets[2] = 9  # noise token 8 "scored" without a presentation
    with pytest.raises(ValueError, match="position 2: token 8"):
        probes.stored_positions(inputs, targets)


# ---------------------------------------------------------------- the model re-run


@pytest.mark.parametrize("name", list(READS))
def test_trace_reproduces_model_apply_and_the_recurrent_state(name, validation):
    params, config = tiny_model(READS[name])
    inputs = validation[0][:4]
    positions = np.array([[3, 7, -1], [0, 14, 5], [-1, -1, -1], [2, 4, 6]])
    logits, (trace,) = probes.trace(params, inputs, config, positions)
    native = apply(params, jnp.asarray(inputs), config)
    np.testing.assert_allclose(logits, native, atol=1e-5)
    projections = _projections(params, inputs, config)
    np.testing.assert_allclose(trace.k, projections.k, atol=1e-6)
    assert not np.asarray(trace.memory.c[2]).any()  # unrequested slots stay zero
    # mlstm.recurrent_sequence cut after step t: its steps after t made identities (no
    # write, no erasure, forget gate 1: exactly), so every cut is one batch, one compile.
    rows, slots = np.nonzero(positions >= 0)
    cut_at = positions[rows, slots]
    after = jnp.asarray(np.arange(inputs.shape[1])[None, :] > cut_at[:, None])[..., None]
    q, k, v, i_pre, f_pre = (
        jnp.asarray(a)[rows] for a in (projections.q, projections.k, projections.v,
                                       projections.input_gate, projections.forget_gate)
    )  # fmt: skip
    k = jnp.where(after[..., None], 0.0, k)  # no erasure by the delta write either
    _, state = mlstm.recurrent_sequence(
        q, k, v, jnp.where(after, -jnp.inf, i_pre), jnp.where(after, jnp.inf, f_pre),
        read=config.cell.read,
    )  # fmt: skip
    for got, want in zip(trace.memory[:3], state[:3], strict=True):
        np.testing.assert_allclose(np.asarray(got)[rows, slots], want, rtol=1e-5, atol=1e-7)


def _projections(params, inputs, config):
    """The first block's q, k, v and gates, as the cell computes them."""
    block = params["blocks"][0]
    x = cell.layer_norm(model_lib._embed(params, jnp.asarray(inputs)), block["norm"]["scale"])
    batch, length = inputs.shape
    history = jnp.zeros((batch, config.cell.conv_kernel_size - 1, config.cell.inner_dim))
    reset = jnp.zeros((batch, length), bool)
    return cell.sequence_projections(block["mlstm"], x, config.cell, reset, history)[0]


def test_trace_of_two_blocks_matches_model_apply(validation):
    params, config = tiny_model(RAW, num_blocks=2)
    positions = np.tile(np.arange(3), (8, 1))
    logits, traces = probes.trace(params, validation[0], config, positions)
    np.testing.assert_allclose(logits, apply(params, jnp.asarray(validation[0]), config), atol=1e-5)
    assert len(traces) == 2


@pytest.mark.parametrize(
    "positions, fragment",
    [([[0, 0]] * 4, "twice"), ([[15, -1]] * 4, "[0, 15)"), ([[0]] * 3, "shape (4, P)")],
)
def test_trace_refuses_bad_positions(positions, fragment, validation):
    params, config = tiny_model(RAW)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        probes.trace(params, validation[0][:4], config, np.array(positions))


def test_queries_replaced_by_themselves_change_nothing(validation):
    params, config = tiny_model(NS5)
    inputs, targets = validation
    native = apply(params, jnp.asarray(inputs), config)
    identity = np.tile(np.arange(inputs.shape[1]), (len(inputs), 1))
    for sources, use in ((identity, "query"), (np.full(inputs.shape, -1), "key")):
        logits = probes.apply_with_queries(params, inputs, config, sources, use=use)
        np.testing.assert_allclose(logits, native, atol=1e-5)
        assert evaluation.masked_metrics(logits, targets)[1] == pytest.approx(
            float(evaluation.masked_metrics(native, targets)[1])
        )


def test_oracle_query_changes_its_position_and_no_earlier_one(validation):
    params, config = tiny_model(NS5)
    inputs = validation[0]
    sources = np.full(inputs.shape, -1)
    sources[:, 9] = 4  # q_9 := k_4
    native = apply(params, jnp.asarray(inputs), config)
    oracle = probes.apply_with_queries(params, inputs, config, sources)
    np.testing.assert_allclose(oracle[:, :9], native[:, :9], atol=1e-5)
    assert np.abs(np.asarray(oracle[:, 9] - native[:, 9])).max() > 1e-4
    sources[:, 3] = 5  # from the future
    with pytest.raises(ValueError, match="future"):
        probes.apply_with_queries(params, inputs, config, sources)


def test_swapped_read_keeps_the_models_write():
    assert probes.swapped_read(RAW, "ns5") == NS5
    assert probes.swapped_read(NS5, "raw") == RAW
    delta = read_from_name("delta")
    assert probes.swapped_read(delta, "raw") == delta
    assert probes.swapped_read(delta, "ns5") == read_from_name("delta_ns5")
    with pytest.raises(ValueError, match="rls"):
        probes.swapped_read(delta, "rls")
    with pytest.raises(ValueError, match="not understood"):
        probes.swapped_read(RAW, "ns5x")


# ---------------------------------------------------------------- the ridge decoder


def test_ridge_recovers_a_linear_map_and_not_noise():
    # Features a known linear map of the label (one-hot) plus noise, as k̂ᵀC_t is of the
    # stored value: the decoder finds it; features independent of the label: chance.
    rng = np.random.default_rng(0)
    classes, width = 6, 12
    mapping = rng.standard_normal((classes, width)) * rng.uniform(0.1, 10.0, width)
    labels = 40 + rng.integers(0, classes, 1200)  # labels need not start at 0
    noise = rng.standard_normal((1200, width)) * mapping.std(axis=0)
    features = mapping[labels - 40] + 0.5 * noise + 3.0
    groups = np.repeat(np.arange(120), 10)
    decoded = ridge.decode(features, labels, groups)
    assert decoded.accuracy > 0.95
    assert decoded.ridge in ridge.LAMBDAS
    assert (decoded.num_train, decoded.num_test) == (840, 360)
    control = ridge.decode(noise, labels, groups)
    assert control.accuracy < 0.3  # chance is 1/6
    classifier = ridge.fit(features, labels, 1.0)
    assert set(classifier.predict(features)) <= set(range(40, 46))


def test_ridge_refuses_too_few_sequences():
    with pytest.raises(ValueError, match="cannot be split"):
        ridge.decode(np.ones((4, 2)), np.arange(4), np.array([0, 0, 1, 1]))


# ---------------------------------------------------------------- the command line

TINY_CFG = {
    "variant": "ns5",
    "seed": 3,
    "vocab_size": 24,
    "dim": 16,
    "num_heads": 2,
    "inner_dim": 32,
    "seq_len": 16,
    "noise_vocab_size": 4,
    "frac_noise": 0.5,
    "val_batches": 4,
    "val_batch_size": 8,
}


def _tiny_reference_checkpoint(path, variant):
    cfg = {**TINY_CFG, "variant": variant}
    rng = np.random.default_rng(0)
    state_dict = {
        name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in rc.expected_shapes(rc.reference_dims(cfg)).items()
    }
    torch_format.save_torch_checkpoint(path, {"state_dict": state_dict, "cfg": cfg})
    return path


def _assert_refused(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "probe: " in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--workdir=/no/such/dir"], ["no such directory"]),
        (["--checkpoint=/no/such.pt"], ["no such file"]),
        (["--workdir=.", "--checkpoint=a.pt"], ["either --workdir"]),
        (["--checkpoint=a.pt", "--reads=ns5x"], ["ns5x"]),
        (["--checkpoint=a.pt", "--probe=oracle", "--reads=raw"], ["--reads is for"]),
        (["--workdir=EMPTY"], ["no checkpoints/ folder"]),
        (["--workdir=EMPTY/..", "--probe=sideways"], ["--probe"]),
    ],
)
def test_cli_refusals_exit_2_with_a_message(args, fragments, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [arg.replace("EMPTY", str(tmp_path / "empty")) for arg in args]
    if not any(arg.startswith("--probe") for arg in args):
        args.append("--probe=swap")
    done = run_module("experiments.probes.probe", *args, f"--out={tmp_path / 'out.json'}")
    _assert_refused(done, *fragments)
    assert not (tmp_path / "out.json").exists()


def test_cli_probes_reference_checkpoints(tmp_path):
    paths = [
        _tiny_reference_checkpoint(tmp_path / f"{variant}.pt", variant)
        for variant in ("baseline", "ns5")
    ]
    out = tmp_path / "swap.json"
    done = run_module(
        "experiments.probes.probe",
        "--probe=swap",
        f"--checkpoint={paths[0]},{paths[1]}",
        f"--out={out}",
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == ["baseline", "ns5"]
    assert {r["num_sequences"] for r in records} == {32}
    for record, path in zip(records, paths, strict=True):
        checkpoint = rc.load_reference_checkpoint(path)
        inputs, targets = data.reference_validation_set(TASK, seed=3, num_batches=4, batch_size=8)
        own = evaluation.evaluate(checkpoint.params, checkpoint.config, inputs, targets)
        read = "raw" if record["variant"] == "baseline" else "ns5"
        assert record[f"acc_{read}"] == pytest.approx(own["accuracy"], abs=1e-6)
        assert record[f"loss_{read}"] == pytest.approx(own["loss"], rel=1e-5)
    table = out.with_suffix(".md").read_text()
    assert table.splitlines()[0].startswith("| ckpt | variant | seed |") and table in done.stdout


# ---------------------------------------------------------------- a study's workdir


def _hand_made_workdir(root):
    """A workdir whose one checkpoint holds freshly initialized raw and ns5 models of the
    TINY study, seeds 0 and 1 (seed 1 of ns5 marked diverged): the probe's loader needs
    no training to be tested. Returns the models' configurations."""
    from experiments.study import study_config
    from orthorecall import checkpointing, training
    from tests.test_training import tiny_config

    config = tiny_config(seeds__num_seeds=2, train__val_batches=2)
    configs = study_config.validate_config(config)
    states = {}
    for name, model_config in configs.items():
        per_seed = [model_lib.init_params(jax.random.PRNGKey(s), model_config) for s in (0, 1)]
        states[name] = training.SeedState(
            params=jax.tree.map(lambda *leaves: np.stack(leaves), *per_seed),
            opt_state={"count": np.zeros(2, np.int32)},  # the loader does not read it
            nonfinite=np.array([False, name == "ns5"]),
        )
    checkpointer = checkpointing.RunCheckpointer(root / "checkpoints", save_every=1)
    meta = {"step": 3, "metrics": [], "config": json.loads(config.to_json())}
    checkpointer.save(3, {"states": states, "keys": jnp.zeros((2, 2), jnp.uint32)}, meta)
    checkpointer.close()
    return configs


def test_workdir_models_are_the_checkpoints_and_swap_reproduces_them(tmp_path):
    from experiments.probes import records as probe_records
    from experiments.probes import sources as probe_sources
    from experiments.study.cli import ConfigError

    configs = _hand_made_workdir(tmp_path)
    models = probe_sources.from_workdir(str(tmp_path))
    labels = [(m.label["variant"], m.label["seed"], m.label["diverged"]) for m in models]
    assert labels == [("raw", 0, False), ("raw", 1, False), ("ns5", 0, False), ("ns5", 1, True)]
    assert {m.label["step"] for m in models} == {3} and models[0].num_sequences == 8
    (model,) = probe_sources.from_workdir(str(tmp_path), ["ns5"], [1])
    params = model_lib.init_params(jax.random.PRNGKey(1), configs["ns5"])
    for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)
    (record,) = probe_records.run("swap", [model], reads=("raw", "ns5"))
    inputs, targets = data.reference_validation_set(TASK, seed=1, num_batches=2, batch_size=4)
    own = evaluation.evaluate(params, configs["ns5"], inputs, targets)
    assert record["acc_ns5"] == pytest.approx(own["accuracy"], abs=1e-6)
    assert record["loss_ns5"] == pytest.approx(own["loss"], rel=1e-5)
    raw = evaluation.evaluate(params, configs["raw"], inputs, targets)
    assert record["loss_raw"] == pytest.approx(raw["loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="ns7"):
        probe_sources.from_workdir(str(tmp_path), ["ns7"])
    with pytest.raises(ConfigError, match=r"\[5\]"):
        probe_sources.from_workdir(str(tmp_path), seeds=[5])
    with pytest.raises(ConfigError, match="multiple of the validation batch size 4"):
        probe_records.run("oracle", [model], num_sequences=6)


@pytest.mark.slow  # trains the TINY study (about 25 s), then three probe processes
def test_cli_on_a_trained_workdir(tmp_path):
    from experiments.study import train
    from tests.test_training import tiny_config

    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(train__steps=4, seeds__num_seeds=2), workdir)
    final = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("accuracy") is not None:
            final[(row["read"], row["seed"])] = row  # the last evaluation wins
    out = tmp_path / "swap.json"
    done = run_module(
        "experiments.probes.probe", "--probe=swap", f"--workdir={workdir}", f"--out={out}"
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in records] == sorted(
        final, key=lambda k: k[0] != "raw"
    )
    for record in records:
        own = final[(record["variant"], record["seed"])]
        assert record[f"acc_{record['variant']}"] == pytest.approx(own["accuracy"], abs=1e-6)
        assert record[f"loss_{record['variant']}"] == pytest.approx(own["loss"], rel=1e-5)
    for probe, fields in (("oracle", "oracle+1"), ("decode", "wrongkey_o1")):
        out = tmp_path / f"{probe}.json"
        done = run_module(
            "experiments.probes.probe", f"--probe={probe}", f"--workdir={workdir}", "--models=ns5",
            "--seeds=1", "--num_sequences=64", f"--out={out}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (record,) = json.loads(out.read_text())
        assert (record["variant"], record["seed"], record["num_sequences"]) == ("ns5", 1, 64)
        assert 0 <= record[fields] <= 1


# ---------------------------------------------------------------- the reference checkpoints
# The replication's own probes of these two checkpoints (its runs/swap_probe2k.jsonl,
# oracle_probe2k.jsonl and c_decode_probe2k.jsonl, rounded to 4 places there).
REFERENCE_FILES = {
    "baseline": "v80_s512_baseline_seed11_steps2000.pt",
    "ns5": "v80_s512_ns5_seed11_steps2000.pt",
}


@pytest.fixture(scope="module")
def reference_models():
    from experiments.probes import sources as probe_sources

    paths = [str(REFERENCE_CHECKPOINTS / name) for name in REFERENCE_FILES.values()]
    return dict(zip(REFERENCE_FILES, probe_sources.from_checkpoints(paths), strict=True))


@pytest.mark.slow  # the v80/s512 reference model on 64 sequences, three times each
def test_oracle_of_the_reference_checkpoints_is_the_replications(reference_models):
    from experiments.probes import records as probe_records

    replication = {"baseline": (0.0349, 0.0361, 0.0300), "ns5": (0.9947, 0.1981, 0.8099)}
    for name, model in reference_models.items():
        (record,) = probe_records.run("oracle", [model], num_sequences=64)
        got = (record["native"], record["oracle+0"], record["oracle+1"])
        np.testing.assert_allclose(got, replication[name], atol=6e-5)


@pytest.mark.slow  # the v80/s512 reference model on 256 sequences, twice
def test_swap_of_the_ns5_reference_checkpoint_is_the_replications(reference_models):
    from experiments.probes import records as probe_records

    (record,) = probe_records.run("swap", [reference_models["ns5"]])
    got = (record["acc_raw"], record["loss_raw"], record["acc_ns5"], record["loss_ns5"])
    np.testing.assert_allclose(got, (0.9617, 1.6962, 0.9939, 0.1268), atol=6e-5)


@pytest.mark.slow  # the v80/s512 reference model on 96 sequences
def test_decode_of_the_reference_checkpoints(reference_models):
    from experiments.probes import records as probe_records

    records = {
        name: probe_records.run("decode", [model], num_sequences=96, normalization="stabilized")[0]
        for name, model in reference_models.items()
    }
    # The replication's 96 sequences and scored queries; its decode_o1 was 0.9963 (ns5) and
    # 0.1935 (baseline), with another ridge (no intercept) and wrong-key draw.
    assert {r["n_samples"] for r in records.values()} == {2585}
    assert records["ns5"]["decode_o1"] > 0.98 and records["ns5"]["wrongkey_o1"] < 0.1
    assert 0.1 < records["baseline"]["decode_o1"] < 0.35
    assert records["ns5"]["decode_o0"] < 0.5 and records["baseline"]["wrongkey_o1"] < 0.1
