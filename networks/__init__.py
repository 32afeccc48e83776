"""LiteMed Bundles networks: LiteNeXt, LTMedNeXt, LTMedNeXtClassifier, Marginal Weight Loss and SERP."""

from networks import classification, data, inferers, training, transforms
from networks.litenext import LiteNeXt
from networks.losses import MarginalWeightLoss, marginal_weight_map
from networks.ltmednext import LTMedNeXt, LTMedNeXtClassifier
from networks.serp import SERP

__all__ = ["LiteNeXt", "LTMedNeXt", "LTMedNeXtClassifier", "MarginalWeightLoss", "marginal_weight_map", "SERP",
           "classification", "data", "inferers", "training", "transforms"]
