"""Preference triplet data sets (Pick-High pickle, Parquet, JSONL): finding, validating, loading."""

from .convert import convert_pickles
from .triplets import (
    COLUMNS,
    TripletDataset,
    TripletTable,
    collate,
    find_split,
    load_triplets,
)

__all__ = ["COLUMNS", "TripletDataset", "TripletTable", "collate", "convert_pickles", "find_split", "load_triplets"]
