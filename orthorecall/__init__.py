"""orthorecall: mLSTM matrix memories read through Newton–Schulz orthogonalization.

Modules: ``data`` (MAD noisy recall, ``NoisyRecallTask``), ``reads`` (what the cell
reads from its memory: raw, NS_k, exact polar), ``newton_schulz`` (the iteration and
its fused read), ``mlstm`` (the memory recurrence), ``cell`` (the mLSTM layer),
``model`` (the reference language model), ``evaluation``, ``training``,
``checkpointing``, ``torch_format`` and ``reference_checkpoint`` (PyTorch checkpoint
import/export), ``validation`` (argument checks).
"""

__version__ = "0.1.0"
