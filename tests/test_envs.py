"""The JAX memory environments against the ``popgym`` package (numpy) and gymnax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import autoencode, count_recall, repeat_previous

from experiments.agents import envs as envs_lib

POPGYM_CLASSES = {
    "RepeatPreviousEasy": repeat_previous.RepeatPreviousEasy,
    "RepeatPreviousMedium": repeat_previous.RepeatPreviousMedium,
    "RepeatPreviousHard": repeat_previous.RepeatPreviousHard,
    "CountRecallEasy": count_recall.CountRecallEasy,
    "CountRecallMedium": count_recall.CountRecallMedium,
    "CountRecallHard": count_recall.CountRecallHard,
    "AutoencodeEasy": autoencode.AutoencodeEasy,
    "AutoencodeMedium": autoencode.AutoencodeMedium,
    "AutoencodeHard": autoencode.AutoencodeHard,
}


def popgym_deck_order(name, game):
    """The card indices popgym will deal, in order (it deals from the end)."""
    if name.startswith("CountRecall"):
        return np.stack([game.value_deck.idx[::-1], game.query_deck.idx[::-1]])
    return game.deck.idx[::-1].copy()


def popgym_rewarded_action(name, game):
    """The action popgym's current state rewards, read from its internals."""
    if name.startswith("RepeatPrevious"):
        hand = game.deck["player"]
        return int(game.deck.suits_idx[hand[-game.k]]) if len(hand) >= game.k else 0
    if name.startswith("CountRecall"):
        return int(game.counts[game.query])
    hand = game.deck["system"]
    return int(game.deck.suits_idx[hand[-1]])


def one_hot_observation(name, obs, env):
    """popgym's integer observation components as our concatenated one-hots."""
    parts = np.atleast_1d(np.asarray(obs, dtype=np.int64))
    if name.startswith("RepeatPrevious"):
        sizes = [envs_lib.NUM_SUITS]
    elif name.startswith("CountRecall"):
        sizes = [env.num_kinds, env.num_kinds]
    else:
        sizes = [2, envs_lib.NUM_SUITS]
    assert parts.shape == (len(sizes),)
    return np.concatenate([np.eye(size)[part] for part, size in zip(parts, sizes, strict=True)])


@pytest.mark.parametrize("name", list(POPGYM_CLASSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_card_game_matches_popgym_step_for_step(name, seed):
    env = envs_lib.make(name)
    game = POPGYM_CLASSES[name]()
    assert env.max_episode_length == game.max_episode_length
    assert env.num_actions == game.action_space.n
    obs_ref, _ = game.reset(seed=seed)
    obs, state = env.start(popgym_deck_order(name, game))
    np.testing.assert_array_equal(obs, one_hot_observation(name, obs_ref, env))
    assert obs.shape == (env.observation_size,)

    step = jax.jit(env.step)
    rng = np.random.default_rng(seed)
    rewards = []
    for t in range(env.max_episode_length):
        # Half the actions are the rewarded one, so both reward branches are played.
        if rng.random() < 0.5:
            action = popgym_rewarded_action(name, game)
        else:
            action = int(rng.integers(env.num_actions))
        obs_ref, reward_ref, terminated, truncated, _ = game.step(action)
        obs, state, reward, done = step(jax.random.PRNGKey(t), state, jnp.int32(action))
        expected = one_hot_observation(name, obs_ref, env)
        np.testing.assert_array_equal(obs, expected, err_msg=f"t={t}")
        np.testing.assert_allclose(reward, reward_ref, rtol=1e-6, atol=1e-9, err_msg=f"t={t}")
        assert bool(done) == terminated, t
        assert not truncated
        rewards.append(float(reward_ref))
    assert terminated, "popgym's episode ends at max_episode_length"
    assert max(rewards) > 0 > min(rewards)


@pytest.mark.parametrize("name", ["RepeatPreviousEasy", "CountRecallEasy", "AutoencodeEasy"])
def test_perfect_play_scores_one_and_deals_a_permutation(name):
    env = envs_lib.make(name)
    cards = env.deal(jax.random.PRNGKey(3))
    for deck in np.atleast_2d(cards):
        np.testing.assert_array_equal(np.sort(deck), np.arange(env.num_cards))

    def rewarded(state):
        if name.startswith("RepeatPrevious"):
            return state.cards[jnp.maximum(state.t + 1 - env.k, 0)] % 4
        if name.startswith("CountRecall"):
            return state.counts[state.queries[state.t]]
        last = env.num_cards - 1
        return state.cards[jnp.clip(2 * last - state.t, 0, last)] % 4

    def play(state, key):
        _, state, reward, done = env.step(key, state, rewarded(state))
        return state, (reward, done)

    _, state = env.start(cards)
    keys = jax.random.split(jax.random.PRNGKey(0), env.max_episode_length)
    _, (rewards, dones) = jax.lax.scan(play, state, keys)
    np.testing.assert_allclose(rewards.sum(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.flatnonzero(dones), [env.max_episode_length - 1])


def test_auto_reset_under_jit_and_vmap_starts_the_next_episode():
    env = envs_lib.make("RepeatPreviousEasy")
    num_envs = 3
    obs, state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), num_envs))
    step = jax.jit(jax.vmap(lambda k, s, a: envs_lib.auto_reset_step(env, k, s, a)))
    first_deck = state.cards
    for t in range(env.max_episode_length):
        key = jax.random.fold_in(jax.random.PRNGKey(1), t)
        keys = jax.random.split(key, num_envs)
        obs, state, _, done = step(keys, state, jnp.zeros(num_envs, jnp.int32))
        if t < env.max_episode_length - 1:
            assert not done.any()
            np.testing.assert_array_equal(state.t, t + 1)
    assert done.all()
    # The episode that follows: step 0, a new deck, and the new deck's first card.
    np.testing.assert_array_equal(state.t, 0)
    assert not np.array_equal(state.cards, first_deck)
    reset_keys = jax.vmap(lambda k: jax.random.split(k)[1])(keys)
    fresh_obs, fresh_state = jax.vmap(env.reset)(reset_keys)
    np.testing.assert_array_equal(obs, fresh_obs)
    np.testing.assert_array_equal(state.cards, fresh_state.cards)


def test_memory_chain_is_gymnax_without_auto_reset():
    from gymnax.environments.bsuite import memory_chain

    env = envs_lib.make("MemoryChain")
    reference = memory_chain.MemoryChain()
    params = reference.default_params.replace(memory_length=env.memory_length)
    key = jax.random.PRNGKey(7)
    obs, state = jax.jit(env.reset)(key)
    obs_ref, state_ref = reference.reset_env(key, params)
    step, step_ref = jax.jit(env.step), jax.jit(reference.step_env)
    np.testing.assert_allclose(obs, obs_ref, atol=1e-6)  # jit vs eager rounding
    assert obs.shape == (env.observation_size,)
    for t in range(env.max_episode_length):
        step_key = jax.random.fold_in(key, t)
        action = jnp.int32(t % 2)
        obs, state, reward, done = step(step_key, state, action)
        obs_ref, state_ref, reward_ref, done_ref, _ = step_ref(step_key, state_ref, action, params)
        np.testing.assert_allclose(obs, obs_ref, atol=1e-6)  # jit vs eager rounding
        assert float(reward) == float(reward_ref) and bool(done) == bool(done_ref)
        assert reward.dtype == jnp.float32
    assert bool(done), "the episode ends after memory_length + 1 steps"


def test_make_rejects_unknown_names_and_bad_parameters():
    with pytest.raises(ValueError, match=r"unknown environment 'Pong'.*RepeatPreviousEasy"):
        envs_lib.make("Pong")
    with pytest.raises(ValueError, match="k=60"):
        envs_lib.RepeatPrevious(k=60)
    with pytest.raises(ValueError, match="deck_type"):
        envs_lib.CountRecall(deck_type="jokers")
    assert set(envs_lib.ENVIRONMENT_NAMES) >= set(POPGYM_CLASSES) | {"MemoryChain"}
