"""Probes of trained models (``python -m experiments.probes.probe``): the models and their
validation data (sources), one record per model and the table (records)."""
