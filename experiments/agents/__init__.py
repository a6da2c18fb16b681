"""Agents built on the cell: JAX memory environments, a recurrent PPO agent and a
Dreamer-style world model (``python -m experiments.agents.ppo_main``)."""
