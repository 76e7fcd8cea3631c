"""Medical Segmentation Decathlon ``dataset.json`` reading (MONAI's ``load_decathlon_datalist``) and loaders.

Any MSD task (e.g. Task09_Spleen) or BTCV-style ``dataset.json`` works: ``training`` entries are dicts with
``image`` and ``label`` paths relative to the json's folder (or ``base_dir``). The validation cases come from the
``validation`` list when the file has one; otherwise the last ``val_fraction`` of the training list is held out
(deterministic, no shuffling), so an MSD download can be used as is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from monai.data import load_decathlon_datalist

__all__ = ["load_datalist", "split_datalist", "infinite_loader"]


def load_datalist(dataset_json: Union[str, Path], key: str = "training",
                  base_dir: Optional[Union[str, Path]] = None, check_files: bool = True) -> List[Dict[str, str]]:
    """Entries of one list of an MSD ``dataset.json`` with absolute paths.

    Returns: list of {'image': path, 'label': path} (test lists of plain paths give {'image': path}).
    Raises: FileNotFoundError (json or a listed file missing), ValueError (not a json / no such list / empty).
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"dataset description not found: {path} (expected an MSD-style dataset.json)")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid JSON file: {err}") from None
    if key not in content:
        raise ValueError(f"{path} has no '{key}' list (keys: {sorted(content)})")
    if not content[key]:
        return []
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key,
                                    base_dir=None if base_dir is None else str(base_dir))
    if check_files:
        for item in items:
            for k in ("image", "label"):
                if k in item and not os.path.isfile(item[k]):
                    raise FileNotFoundError(f"{path}: '{key}' lists {k} {item[k]}, which does not exist")
    return items


def split_datalist(dataset_json: Union[str, Path], base_dir: Optional[Union[str, Path]] = None,
                   train_key: str = "training", val_key: str = "validation",
                   val_fraction: float = 0.2) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """(train, val) lists: ``val_key`` if the json has a non-empty one, else the last ``val_fraction`` of training.

    Raises ValueError when there is no training case.
    """
    train = load_datalist(dataset_json, train_key, base_dir)
    if not train:
        raise ValueError(f"{dataset_json}: the '{train_key}' list is empty")
    content = json.loads(Path(dataset_json).read_text())
    if content.get(val_key):
        return train, load_datalist(dataset_json, val_key, base_dir)
    n_val = int(round(len(train) * float(val_fraction)))
    if n_val == 0 or n_val >= len(train):
        return train, []
    return train[:-n_val], train[-n_val:]


def infinite_loader(loader) -> Iterator[dict]:
    """Yield batches from ``loader`` forever (a new epoch, with new random crops, each time it ends)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data loader yields no batch")
