"""Recurrent PPO on memory tasks: the GRU against the mLSTM cell's reads.

    python -m experiments.agents.ppo_main --config=configs/popgym_ppo.py[:PRESET] [--workdir=DIR]

Presets:

* ``repeat_previous`` (default): POPGym RepeatPrevious-Easy (output the suit shown 4
  cards ago): whether the agent learns at all.
* ``repeat_previous_no_conv``: the same with the mLSTM cell's conv window at 1, so that
  only its matrix memory can carry the card (a window of 4 spans the 3 steps back).
* ``count_recall``, ``autoencode``: CountRecall-Easy / Autoencode-Easy, recall among
  distractors.
* ``memory_chain``: gymnax's MemoryChain (bsuite memory length), the external control.
* ``smoke``: a few tiny updates of every core, to exercise the whole pipeline (well
  under two minutes on a 2-core CPU).

The result presets are sized for about 20 minutes of a 2-core CPU each (3 cores x 3
seeds). Override any field, e.g. ``--config.cores=gru,ns5`` or
``--config.ppo.num_updates=500``; unknown fields fail.
"""

import ml_collections


def _base() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "popgym_ppo_repeat_previous"
    # experiments.agents.envs.ENVIRONMENT_NAMES
    config.env = "RepeatPreviousEasy"
    # Comma-separated recurrent cores: "gru", or any read name of the study ("raw",
    # "ns5", "polar", "ns3_muon", ...) for the mLSTM cell read that way.
    config.cores = "gru,raw,ns5"

    config.seeds = ml_collections.ConfigDict()
    config.seeds.num_seeds = 3
    config.seeds.first_seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.width = 64  # encoder, core and heads
    config.model.num_heads = 4  # mLSTM heads (memory 4 x 32 x 32 at width 64)
    # The mLSTM cell's causal conv window. It alone recalls RepeatPrevious-Easy's card
    # (3 steps back); 1 leaves the matrix memory as the only way back in time.
    config.model.conv_kernel_size = 4

    # PureJaxRL's PPO-RNN defaults, but for the number of environments and updates.
    config.ppo = ml_collections.ConfigDict()
    config.ppo.num_envs = 32
    config.ppo.num_steps = 128
    config.ppo.num_updates = 200
    config.ppo.update_epochs = 4
    config.ppo.num_minibatches = 4
    config.ppo.gamma = 0.99
    config.ppo.gae_lambda = 0.95
    config.ppo.clip_eps = 0.2
    config.ppo.ent_coef = 0.01
    config.ppo.vf_coef = 0.5
    config.ppo.max_grad_norm = 0.5
    config.ppo.learning_rate = 2.5e-4
    config.ppo.anneal_lr = True

    config.run = ml_collections.ConfigDict()
    # Updates per compiled call: the progress line, metrics and checkpoints come
    # between calls. num_updates must be a multiple of it.
    config.run.log_every = 10
    config.run.checkpoint_every = 50  # updates; a multiple of log_every
    config.run.keep_checkpoints = 2
    return config


def _smoke(config):
    config.name = "popgym_ppo_smoke"
    config.seeds.num_seeds = 2
    config.model.width = 16
    config.ppo.num_envs = 8
    config.ppo.num_steps = 16
    config.ppo.num_updates = 4
    config.ppo.num_minibatches = 2
    config.ppo.update_epochs = 2
    config.run.log_every = 2
    config.run.checkpoint_every = 2


def _repeat_previous_no_conv(config):
    config.name = "popgym_ppo_repeat_previous_no_conv"
    config.cores = "raw,ns5"  # the GRU has no conv: its run is repeat_previous's
    config.model.conv_kernel_size = 1


def _count_recall(config):
    config.name = "popgym_ppo_count_recall"
    config.env = "CountRecallEasy"


def _autoencode(config):
    config.name = "popgym_ppo_autoencode"
    config.env = "AutoencodeEasy"


def _memory_chain(config):
    config.name = "popgym_ppo_memory_chain"
    config.env = "MemoryChain"


PRESETS = {
    "repeat_previous": lambda config: None,
    "repeat_previous_no_conv": _repeat_previous_no_conv,
    "count_recall": _count_recall,
    "autoencode": _autoencode,
    "memory_chain": _memory_chain,
    "smoke": _smoke,
}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    config = _base()
    preset = preset or "repeat_previous"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    PRESETS[preset](config)
    config.lock()  # Overrides of fields that do not exist fail loudly.
    return config
