"""Labels as data: tables of images and labels joined to a cache on the content id or path
(labelling.py), read from CSV, Parquet or a dataframe (pipeline/data/table.py). Nothing here touches a backbone."""

from pipeline.data.table import Table, is_dataframe
from pipeline.labelling.labelling import (
    LABELLING_FILE,
    Labelling,
    LabelSpec,
    label_cache,
    labelling_from_table,
    recorded_labelling,
)

__all__ = ["LABELLING_FILE", "LabelSpec", "Labelling", "Table", "is_dataframe", "label_cache",
           "labelling_from_table", "recorded_labelling"]
