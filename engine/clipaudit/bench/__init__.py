"""``clipaudit bench``: speed and memory figures, each beside a baseline measured in the same run.

- :mod:`.map_step` — the map step beside a model-only baseline (any model, any device);
- :mod:`.quick` — every speed figure of the map step on a small model (``--quick``);
- :mod:`.reduce_scale` — the reduce step's memory and time at 10⁶–10⁷ rows (``--reduce``);
- :mod:`.reduce_load` — the reduce step alone and beside busy processes (``--under-load``).
"""
