"""Know your data from the cache: embeddings out with their ids (embeddings.py), label suspects
(labels.py: out-of-fold probabilities ranked by cleanlab), exact and near duplicates
(duplicates.py), the pictures (pictures.py), and the audit that writes them all (audit.py)."""



def require(module: str, what: str) -> None:
    """A one-line error where an optional dependency of the audit is missing."""
    from pipeline.errors import require_module

    require_module(module, what, "audit")
