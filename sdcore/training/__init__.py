"""The trainer, one concern per module: ``plan`` (what a run does, the LR schedule), ``state``
(resume state, RNGs, preemption), ``history`` (loss CSV, curve, TensorBoard), ``trainer`` (the
loop, ``main``), ``report`` (the end-of-run summary). Nothing is imported here, so the workflow
can read ``plan`` without loading torch."""
