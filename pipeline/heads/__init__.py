"""Heads: the learners that stage two fits on cached features, behind one interface (pipeline/heads/base.py).

Importing the package registers every head: the logistic regression (logreg.py), the dense head
(dense.py), the support-vector machine (svm.py), nearest neighbours (knn.py) and any scikit-learn
classifier by name (estimator.py).
"""

from pipeline.heads.base import HEADS, ArrayFeatures, Features, Head, class_weights, head_parameters, make_head
from pipeline.heads.dense import DenseHead, training_statistics
from pipeline.heads.estimator import EstimatorHead
from pipeline.heads.knn import KNNHead
from pipeline.heads.logreg import LogRegHead, log_grid
from pipeline.heads.svm import SVMHead

__all__ = ["HEADS", "ArrayFeatures", "DenseHead", "EstimatorHead", "Features", "Head", "KNNHead", "LogRegHead",
           "SVMHead", "class_weights", "head_parameters", "log_grid", "make_head", "training_statistics"]
