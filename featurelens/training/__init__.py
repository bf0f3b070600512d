"""Training SAEs from a stream of activation batches."""

from featurelens.training.trainer import SAEMeta, SAESpec, TrainConfig, Trainer, store_trainer, train_saes

__all__ = ["SAEMeta", "SAESpec", "TrainConfig", "Trainer", "store_trainer", "train_saes"]
