"""Speed and memory: the model and its reads (``model``), the data generator (``data``),
an agent's recurrent core (``agents``), and the reference PyTorch code timed the same way
(``reference``, run from the reference's own environment)."""
