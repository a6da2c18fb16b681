"""The best CountRecall-Easy policy that remembers no card, only the step number.

After t + 1 value cards of a 26/26 two-colour deck, the count of either colour is
hypergeometric(52, 26, t + 1); answering its mode earns 2 P(mode) - 1 in units of 1/51.
Checked by playing the policy in experiments.agents.envs (4000 episodes).

    python results/agents/count_recall/time_only_baseline.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import hypergeom

from experiments.agents import envs

env = envs.make("CountRecallEasy")
steps = env.max_episode_length
counts = np.arange(env.num_actions)
laws = [hypergeom(env.num_cards, env.num_cards // 2, t + 1) for t in range(steps)]
modes = np.array([np.argmax(law.pmf(counts)) for law in laws])
expected = sum(2 * law.pmf(mode) - 1 for law, mode in zip(laws, modes, strict=True)) / steps


def play(key):
    _, state = env.reset(key)

    def step(state, t):
        _, state, reward, _ = env.step(None, state, jnp.asarray(modes)[t])
        return state, reward

    return jax.lax.scan(step, state, jnp.arange(steps))[1].sum()


simulated = jax.vmap(play)(jax.random.split(jax.random.PRNGKey(0), 4000))
print(f"expected return {expected:+.4f}; simulated over 4000 episodes {simulated.mean():+.4f}")
print(f"uniformly random answers: {2 / env.num_actions - 1:+.4f}")
