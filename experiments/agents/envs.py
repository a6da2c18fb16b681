"""Memory environments in JAX: POPGym's card games and gymnax's MemoryChain.

RepeatPrevious, CountRecall and Autoencode follow ``popgym`` 1.0.7 step for step
(tests/test_envs.py plays both with the same deck and the same actions); only the
observation differs in form: POPGym's integer (or tuple of integers) observation
becomes the concatenation of one one-hot vector per component, which is what a
network reads anyway.

POPGym deals from the end of a shuffled deck; here ``cards`` lists the card indices
in the order they are dealt (POPGym's ``deck.idx[::-1]``), so ``start(cards)`` starts
the same game POPGym would and ``reset(key)`` = ``start(deal(key))``.

Every environment is a frozen dataclass (hashable, a static ``jit`` argument) with

* ``reset(key) -> (obs, state)`` and
* ``step(key, state, action) -> (obs, state, reward, done)``, which does *not* reset:
  after ``done`` the state is spent. ``auto_reset_step`` starts a new episode in its
  place, as a vmapped rollout needs.

States are small pytrees of arrays; nothing has a data-dependent shape, so every
function here composes with ``jit``, ``vmap`` and ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

DECK_SIZE = 52
NUM_SUITS = 4
NUM_RANKS = 13
NUM_COLORS = 2

# How POPGym's Deck names a card index's colour, suit and rank.
_CARD_FEATURES = {
    "colors": (NUM_COLORS, lambda card: card % NUM_COLORS),
    "suits": (NUM_SUITS, lambda card: card % NUM_SUITS),
    "ranks": (NUM_RANKS, lambda card: (card % DECK_SIZE) // NUM_SUITS),
}


def _one_hot(index, size):
    return jax.nn.one_hot(index, size, dtype=jnp.float32)


def _shuffled_deck(key, num_cards):
    return jax.random.permutation(key, num_cards).astype(jnp.int32)


class Environment:
    """What agents need of an environment (see the module docstring)."""

    name: str
    num_actions: int
    observation_size: int
    max_episode_length: int

    def reset(self, key: jax.Array) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def step(self, key: jax.Array, state: Any, action: jax.Array):
        raise NotImplementedError


def auto_reset_step(env: Environment, key: jax.Array, state: Any, action: jax.Array):
    """``env.step``, but a finished episode is replaced by a fresh one.

    The reward and ``done`` are the finished step's; the observation and state are
    the new episode's first, as PureJaxRL's auto-reset wrappers return them.
    """
    step_key, reset_key = jax.random.split(key)
    obs, state, reward, done = env.step(step_key, state, action)
    fresh_obs, fresh_state = env.reset(reset_key)
    state = jax.tree_util.tree_map(lambda new, old: jnp.where(done, new, old), fresh_state, state)
    return jnp.where(done, fresh_obs, obs), state, reward, done


class _CardGame(Environment):
    """A game dealt from ``num_decks`` shuffled 52-card decks."""

    num_decks: int

    @property
    def num_cards(self) -> int:
        return DECK_SIZE * self.num_decks


class CardState(NamedTuple):
    cards: jax.Array  # (num_cards,) int32 card indices in dealing order
    t: jax.Array  # () int32 steps taken


@dataclasses.dataclass(frozen=True)
class RepeatPrevious(_CardGame):
    """Output the suit of the card dealt ``k`` steps ago (``k - 1`` cards back).

    Reward ±1/(cards − k) once ``k`` cards have been dealt; one episode deals the
    whole deck, ``cards − 1`` steps, so a perfect agent scores 1 and chance −0.5.
    """

    name: str = "RepeatPreviousEasy"
    num_decks: int = 1
    k: int = 4

    def __post_init__(self):
        if not 1 <= self.k < self.num_cards:
            raise ValueError(f"k={self.k} must be in [1, {self.num_cards}).")

    @property
    def num_actions(self) -> int:
        return NUM_SUITS

    @property
    def observation_size(self) -> int:
        return NUM_SUITS

    @property
    def max_episode_length(self) -> int:
        return self.num_cards - 1

    def deal(self, key):
        return _shuffled_deck(key, self.num_cards)

    def start(self, cards):
        cards = jnp.asarray(cards, jnp.int32)
        return _one_hot(cards[0] % NUM_SUITS, NUM_SUITS), CardState(cards, jnp.int32(0))

    def reset(self, key):
        return self.start(self.deal(key))

    def step(self, key, state, action):
        del key  # deterministic once dealt
        cards, t = state
        held = t + 1  # cards in the player's hand before this step's deal
        target = cards[jnp.clip(held - self.k, 0, self.num_cards - 1)] % NUM_SUITS
        scale = 1.0 / (self.num_cards - self.k)
        reward = jnp.where(held >= self.k, jnp.where(action == target, scale, -scale), 0.0)
        done = t == self.num_cards - 2  # POPGym: one card left in the deck
        dealt = cards[jnp.minimum(held, self.num_cards - 1)] % NUM_SUITS
        return (
            _one_hot(dealt, NUM_SUITS),
            CardState(cards, t + 1),
            reward.astype(jnp.float32),
            done,
        )


class CountRecallState(NamedTuple):
    values: jax.Array  # (num_cards,) value-deck card indices in dealing order
    queries: jax.Array  # (num_cards,) query-deck card indices in dealing order
    counts: jax.Array  # (num_kinds,) int32 values seen so far, per kind
    t: jax.Array


@dataclasses.dataclass(frozen=True)
class CountRecall(_CardGame):
    """Each step deals a value card and a query card; the next action must be how many
    value cards of the query's kind have been dealt so far (this one included).

    Reward ±1/(cards − 1) every step, ``cards − 1`` steps an episode. Cards are told
    apart by colour (Easy), suit (Medium) or rank (Hard).
    """

    name: str = "CountRecallEasy"
    num_decks: int = 1
    deck_type: str = "colors"

    def __post_init__(self):
        if self.deck_type not in _CARD_FEATURES:
            raise ValueError(
                f"deck_type={self.deck_type!r}; expected one of {sorted(_CARD_FEATURES)}."
            )

    @property
    def num_kinds(self) -> int:
        return _CARD_FEATURES[self.deck_type][0]

    @property
    def num_actions(self) -> int:
        return self.num_cards // self.num_kinds + 1

    @property
    def observation_size(self) -> int:
        return 2 * self.num_kinds

    @property
    def max_episode_length(self) -> int:
        return self.num_cards - 1

    def _kind(self, card):
        return _CARD_FEATURES[self.deck_type][1](card)

    def _observe(self, value, query):
        return jnp.concatenate([_one_hot(value, self.num_kinds), _one_hot(query, self.num_kinds)])

    def deal(self, key):
        value_key, query_key = jax.random.split(key)
        return jnp.stack(
            [_shuffled_deck(value_key, self.num_cards), _shuffled_deck(query_key, self.num_cards)]
        )

    def start(self, cards):
        """``cards``: (2, num_cards), the value deck then the query deck."""
        cards = jnp.asarray(cards, jnp.int32)
        values, queries = self._kind(cards[0]), self._kind(cards[1])
        counts = jnp.zeros((self.num_kinds,), jnp.int32).at[values[0]].add(1)
        state = CountRecallState(values, queries, counts, jnp.int32(0))
        return self._observe(values[0], queries[0]), state

    def reset(self, key):
        return self.start(self.deal(key))

    def step(self, key, state, action):
        del key
        values, queries, counts, t = state
        answer = counts[queries[t]]
        dealt = jnp.minimum(t + 1, self.num_cards - 1)
        value, query = values[dealt], queries[dealt]
        scale = 1.0 / self.max_episode_length
        reward = jnp.where(action == answer, scale, -scale).astype(jnp.float32)
        done = t == self.num_cards - 2  # POPGym: the value deck is empty
        state = CountRecallState(values, queries, counts.at[value].add(1), t + 1)
        return self._observe(value, query), state, reward, done


@dataclasses.dataclass(frozen=True)
class Autoencode(_CardGame):
    """Watch the deck's suits dealt one by one, then play them back in reverse.

    The observation is (mode, suit): mode 1 while watching, 0 from the step that
    deals the last card on; while playing the suit shown is 0. Reward ±1/cards per
    played card; ``2·cards − 1`` steps an episode.
    """

    name: str = "AutoencodeEasy"
    num_decks: int = 1

    @property
    def num_actions(self) -> int:
        return NUM_SUITS

    @property
    def observation_size(self) -> int:
        return 2 + NUM_SUITS

    @property
    def max_episode_length(self) -> int:
        return 2 * self.num_cards - 1

    @staticmethod
    def _observe(watching, suit):
        return jnp.concatenate([_one_hot(watching, 2), _one_hot(suit, NUM_SUITS)])

    def deal(self, key):
        return _shuffled_deck(key, self.num_cards)

    def start(self, cards):
        cards = jnp.asarray(cards, jnp.int32)
        return self._observe(1, cards[0] % NUM_SUITS), CardState(cards, jnp.int32(0))

    def reset(self, key):
        return self.start(self.deal(key))

    def step(self, key, state, action):
        del key
        cards, t = state
        last = self.num_cards - 1
        watching = t < last
        # Watching: deal card t + 1; its step switches to playing when it is the last.
        dealt = jnp.minimum(t + 1, last)
        watch_obs = self._observe(jnp.where(dealt == last, 0, 1), cards[dealt] % NUM_SUITS)
        # Playing: the p-th played card must be the p-th from the end.
        played = jnp.clip(t - last, 0, last)
        correct = action == cards[last - played] % NUM_SUITS
        scale = 1.0 / self.num_cards
        reward = jnp.where(watching, 0.0, jnp.where(correct, scale, -scale))
        obs = jnp.where(watching, watch_obs, self._observe(0, 0))
        done = t == 2 * last
        return obs, CardState(cards, t + 1), reward.astype(jnp.float32), done


@functools.cache
def _gymnax_memory_chain(num_bits: int):
    try:
        from gymnax.environments.bsuite import memory_chain
    except ImportError as e:
        raise ImportError(
            "MemoryChain needs gymnax (and six, which `import gymnax` needs): "
            f"pip install -e '.[agents]' ({e})."
        ) from None
    return memory_chain.MemoryChain(num_bits=num_bits)


@dataclasses.dataclass(frozen=True)
class MemoryChain(Environment):
    """gymnax's bsuite MemoryChain (the external control): a context bit shown at the
    first step must be recalled when the query arrives ``memory_length`` steps later."""

    name: str = "MemoryChain"
    memory_length: int = 5
    num_bits: int = 1

    @property
    def num_actions(self) -> int:
        return 2

    @property
    def observation_size(self) -> int:
        return self.num_bits + 2

    @property
    def max_episode_length(self) -> int:
        return self.memory_length + 1

    def _params(self):
        env = _gymnax_memory_chain(self.num_bits)
        return env, env.default_params.replace(memory_length=self.memory_length)

    def reset(self, key):
        env, params = self._params()
        return env.reset_env(key, params)

    def step(self, key, state, action):
        env, params = self._params()
        obs, state, reward, done, _ = env.step_env(key, state, action, params)
        return obs, state, jnp.asarray(reward, jnp.float32), jnp.asarray(done, bool)


_ENVIRONMENTS = {
    "RepeatPreviousEasy": lambda: RepeatPrevious("RepeatPreviousEasy", 1, 4),
    "RepeatPreviousMedium": lambda: RepeatPrevious("RepeatPreviousMedium", 2, 32),
    "RepeatPreviousHard": lambda: RepeatPrevious("RepeatPreviousHard", 3, 64),
    "CountRecallEasy": lambda: CountRecall("CountRecallEasy", 1, "colors"),
    "CountRecallMedium": lambda: CountRecall("CountRecallMedium", 2, "suits"),
    "CountRecallHard": lambda: CountRecall("CountRecallHard", 4, "ranks"),
    "AutoencodeEasy": lambda: Autoencode("AutoencodeEasy", 1),
    "AutoencodeMedium": lambda: Autoencode("AutoencodeMedium", 2),
    "AutoencodeHard": lambda: Autoencode("AutoencodeHard", 3),
    "MemoryChain": MemoryChain,
}
ENVIRONMENT_NAMES = tuple(_ENVIRONMENTS)


def make(name: str) -> Environment:
    """The environment called ``name`` (one of ``ENVIRONMENT_NAMES``)."""
    if name not in _ENVIRONMENTS:
        raise ValueError(
            f"unknown environment {name!r}; expected one of {list(ENVIRONMENT_NAMES)}."
        )
    return _ENVIRONMENTS[name]()
