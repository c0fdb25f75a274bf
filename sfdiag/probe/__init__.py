"""``sfdiag probe`` / ``compare``: config to batches to probes.

- ``config``: the YAML config, read through a safe loader and checked key by key.
- ``registry``: the tables of optimizers, models, data and losses, keyed by the CLI name
  (``models``, ``data``, ``losses`` hold the built-in ones).
- ``build``: a config made into a model, its data and one optimizer per spec, all seeded.
- ``runner``: the seeded probe of each optimizer (``run_probe``), audited by
  ``sfdiag.step_audit``; ``distributed``: the same across ranks (DDP / FSDP2).

This package's ``__init__`` imports nothing: ``sfdiag.probe.config`` stays free of torch.
"""
