"""Heads: the learners that stage two fits on cached features, behind one interface (pipeline/heads/base.py).

Importing the package registers every head: the logistic regression (logreg.py) and the dense
head (dense.py).
"""

from pipeline.heads.base import HEADS, ArrayFeatures, Features, Head, class_weights, head_parameters, make_head
from pipeline.heads.dense import DenseHead, training_statistics
from pipeline.heads.logreg import LogRegHead, log_grid

__all__ = ["HEADS", "ArrayFeatures", "DenseHead", "Features", "Head", "LogRegHead", "class_weights",
           "head_parameters", "log_grid", "make_head", "training_statistics"]
