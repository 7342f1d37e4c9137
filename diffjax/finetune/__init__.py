"""Cheap adaptation of a trained model: LoRA deltas over a frozen base (`lora`).

A room below `rundir` (it imports `models` and `pretrained.convert`-free pure code only):
everything here is a pure function of parameter trees, so training, sampling, export
and the reading of other tools' LoRA files all go through the same `merge`.
"""
