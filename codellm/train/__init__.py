"""Training: one loop (loop.py), the Code Llama stages as config presets (config.py), batch sources
per stage (batches.py), fed by a thread or packing processes (feeders.py).
`codellm.train.loop.train(TrainConfig.for_stage("pretrain", ...))` runs one."""

from codellm.train.config import STAGE_PRESETS, STAGES, DataConfig, OptimConfig, TrainConfig

__all__ = ["STAGES", "STAGE_PRESETS", "DataConfig", "OptimConfig", "TrainConfig"]
