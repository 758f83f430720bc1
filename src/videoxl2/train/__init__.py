"""Supervised fine-tuning: the release's data format, the inference token layout, the stock HF Trainer.

    from videoxl2.train import load_config, train
    result = train(load_config("stage4.yaml"))

See docs/training.md for the config format and multi-GPU / multi-node launches. Names load on first use,
so the `videoxl2` command stays quick and works without the `train` extra installed.
"""

from importlib import import_module

_EXPORTS = {
    "PRESETS": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "IGNORE_INDEX": "data",
    "Collator": "data",
    "DataSettings": "data",
    "SupervisedDataset": "data",
    "encode_sample": "data",
    "load_samples": "data",
    "TrainResult": "trainer",
    "set_trainable": "trainer",
    "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
