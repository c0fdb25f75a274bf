"""What one ``step()`` did to the grads: the audit core.

- ``snapshot``: a grad's fingerprint (norm, block checksums, a sample) before and after
  ``step()``, in O(1) torch calls per group of like grads; ``fused`` (and ``fused_read.c``)
  reads many CPU grads in one C call.
- ``auditor``: ``StepAuditor``, the two step hooks that take the snapshots and compare them.
- ``verdict``: what kind of in-place change a before/after pair shows (adam-normalized,
  weight decay, scaled, ...) and the advice for it.
- ``monitor``: ``GradMonitor``, the pre-step gradient norm for a training loop to log.
- ``compiling``: the step hooks under ``torch.compile``.

Nothing here imports the probe, the run or the report: they build on it.
"""
