"""Training: the train state and optimizer (`state`), the pure train step (`step`), the
loop (`loop.train_and_evaluate`) and its periodic actions (`hooks`).

`train_and_evaluate` is this room's face: code outside diffjax/train/ imports it from
here, never the loop module itself. It is resolved lazily because the run-directory room
(`diffjax.rundir`), which the loop imports, itself imports `train.state` and `train.step`.
"""


def __getattr__(name: str):
    if name == "train_and_evaluate":
        from diffjax.train.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module 'diffjax.train' has no attribute {name!r}")
