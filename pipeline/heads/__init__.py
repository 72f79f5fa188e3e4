"""Heads: the learners that stage two fits on cached features (logistic regression, dense)."""
