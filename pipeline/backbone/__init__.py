"""The frozen networks: which backbones exist (registry), their weights and where they come
from (weights), how a Keras model is built and fed (network), and the precision it computes in
(precision)."""
