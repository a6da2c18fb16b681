"""orthorecall: mLSTM matrix memories read through Newton–Schulz orthogonalization.

Modules: ``data`` (MAD noisy recall), ``newton_schulz`` (the reads),
``mlstm`` (the memory recurrence), ``cell`` (the mLSTM layer), ``model`` (the
reference language model), ``evaluation``, ``torch_format`` and
``reference_checkpoint`` (PyTorch checkpoint import/export).
"""

__version__ = "0.1.0"
