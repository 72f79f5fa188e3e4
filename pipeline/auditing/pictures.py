"""What a person looks at after an audit: a 2-D map of the embeddings (PCA to 50 dimensions, then
t-SNE, from scikit-learn) coloured by class with suspects and cross-split duplicates marked; a
contact sheet of the top suspects with their given and suggested labels; the closest cross-split
pairs side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.drawing import pyplot, serialised

MAP_POINTS = 5000  # t-SNE on more costs minutes; a sample keeps every marked point
SHEET = 20  # suspects on the contact sheet
PAIRS = 10  # cross-split pairs shown


def _save(figure: Any, path: Path) -> None:
    with atomic.replacing(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    pyplot().close(figure)


@dataclass
class MapLayout:
    """The 2-D map's points: `rows` of the input (every marked one, a sample of the rest) and
    their coordinates `xy`, and how they were made."""

    rows: np.ndarray
    xy: np.ndarray
    how: str


def map_layout(x: np.ndarray, marked: Sequence[int], seed: int = 0) -> MapLayout:
    """PCA to 50 dimensions, then t-SNE, of every row in `marked` and a sample of the others (at most
    MAP_POINTS in all): the picture's points and the report page's."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    marked = np.unique(np.asarray(marked, np.int64))
    rest = np.setdiff1d(np.arange(len(x)), marked)
    room = max(0, MAP_POINTS - len(marked))
    chosen = np.sort(np.concatenate([marked, rng.choice(rest, min(room, len(rest)), replace=False)])).astype(np.int64)
    if not len(chosen):
        return MapLayout(chosen, np.zeros((0, 2), np.float32), "no images")
    points = x[chosen]
    reduced = PCA(n_components=min(50, points.shape[1], len(points)), random_state=seed).fit_transform(points)
    if len(points) > 3:
        flat = TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca",
                    random_state=seed).fit_transform(reduced)
        how = f"PCA to {reduced.shape[1]} dimensions, then t-SNE, of {len(points)} images"
    else:
        flat, how = np.pad(reduced[:, :2], ((0, 0), (0, max(0, 2 - reduced.shape[1])))), "PCA"
    return MapLayout(chosen, np.asarray(flat, np.float32), how)


@serialised
def embedding_map(layout: MapLayout, labels: np.ndarray, class_names: Sequence[str], suspects: Sequence[int],
                  cross_split: Sequence[int], path: Path) -> str:
    """map.png of `layout` (map_layout's points), coloured by class, suspects and cross-split
    duplicates marked; returns how the map was made."""
    plt = pyplot()
    chosen, flat, how = layout.rows, layout.xy, layout.how
    position = {row: i for i, row in enumerate(chosen)}
    figure, axes = plt.subplots(figsize=(9, 7.5))
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for label, name in enumerate(class_names):
        these = labels[chosen] == label
        axes.scatter(flat[these, 0], flat[these, 1], s=8, alpha=0.6, color=colours(label % colours.N), label=name)
    unlabelled = labels[chosen] < 0
    if unlabelled.any():
        axes.scatter(flat[unlabelled, 0], flat[unlabelled, 1], s=8, alpha=0.4, color="lightgray", label="unlabelled")
    for rows, marker, name in ((suspects, "x", "label suspect"), (cross_split, "o", "cross-split duplicate")):
        rows = [position[r] for r in rows if r in position]
        if rows:
            style = {"facecolors": "none", "edgecolors": "black"} if marker == "o" else {"color": "black"}
            axes.scatter(flat[rows, 0], flat[rows, 1], s=40, marker=marker, linewidths=1.0, label=name, **style)
    axes.set_title(f"Embeddings: {how}")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="best", fontsize=8, markerscale=1.5)
    figure.tight_layout()
    _save(figure, path)
    return how


def _thumbnail(file: Path, size: int = 160) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.draft("RGB", (size, size))
            return np.asarray(image.convert("RGB").resize((size, size)))
    except (OSError, ValueError):
        return np.full((size, size, 3), 127, np.uint8)  # an image that has gone since: grey


@serialised
def contact_sheet(files: Sequence[Path], captions: Sequence[str], title: str, path: Path, columns: int = 5) -> None:
    """suspects.png: images in a grid, each with its caption."""
    plt = pyplot()
    shown = max(1, len(files))
    rows = -(-shown // columns)
    # constrained layout sizes each caption's room from its text: two- or three-line captions (long
    # file names wrapped) never run into the images above them, as tight_layout's did
    figure, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 3.3 * rows), squeeze=False,
                                layout="constrained")
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i < len(files):
            axis.imshow(_thumbnail(files[i]))
            axis.set_title(_wrapped(captions[i]), fontsize=7)
    if not files:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _wrapped(caption: str, width: int = 34) -> str:
    """Each line of a caption cut to lines of at most `width` characters (file names included)."""
    import textwrap

    return "\n".join(part for line in caption.splitlines()
                     for part in (textwrap.wrap(line, width, break_long_words=True) or [""]))


@serialised
def pairs_sheet(pairs: Sequence[tuple[Path, Path, str]], title: str, path: Path) -> None:
    """duplicates.png: each pair side by side, with its caption."""
    plt = pyplot()
    rows = max(1, len(pairs))
    figure, axes = plt.subplots(rows, 2, figsize=(5.4, 2.7 * rows), squeeze=False)
    for i, (left, right) in enumerate(axes):
        left.axis("off")
        right.axis("off")
        if i < len(pairs):
            a, b, caption = pairs[i]
            left.imshow(_thumbnail(a))
            right.imshow(_thumbnail(b))
            left.set_title(caption, fontsize=7, loc="left")
    if not pairs:
        axes[0][0].text(0.5, 0.5, "no cross-split pairs", ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.7 * rows)))
    _save(figure, path)
