"""Know your data from the cache: embeddings out with their ids (embeddings.py), label suspects
(labels.py: out-of-fold probabilities ranked by cleanlab), exact and near duplicates
(duplicates.py), the pictures (pictures.py), and the audit that writes them all (audit.py)."""


def require(module: str, what: str) -> None:
    """A one-line error where an optional dependency of the audit is missing."""
    import importlib.util

    from pipeline.errors import PipelineError

    if importlib.util.find_spec(module) is None:
        raise PipelineError(f"{what} needs {module}: pip install 'bottleneck-pipeline[audit]' (make setup installs it)")
