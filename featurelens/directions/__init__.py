"""Linear directions: fit (difference in means), intervene (ablate, add, steer), edit weights, export."""

from featurelens.directions.fit import DiffInMeansFitter, DirectionSet
from featurelens.directions.interventions import (
    activation_addition,
    directional_ablation,
    steering,
    writer_ablation,
)
from featurelens.directions.orthogonalize import export_model, orthogonalize_weights

__all__ = [
    "DiffInMeansFitter",
    "DirectionSet",
    "activation_addition",
    "directional_ablation",
    "export_model",
    "orthogonalize_weights",
    "steering",
    "writer_ablation",
]
