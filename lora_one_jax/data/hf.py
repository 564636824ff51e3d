"""Reading ``hf:`` data: a folder written by ``Dataset.save_to_disk`` or a ``datasets.load_dataset`` name.

Example:
    >>> load_hf_data.__name__
    'load_hf_data'
"""

from __future__ import annotations

from pathlib import Path

import datasets


def load_hf_data(name: str, config: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    """What an ``hf:NAME`` spec reads: ``load_from_disk`` for a saved folder, else ``load_dataset(name, config)``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> datasets.Dataset.from_list([{"prompt": "p", "answer": "a"}]).save_to_disk(folder)
        >>> len(load_hf_data(folder))
        1
    """
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return datasets.load_from_disk(str(path))
    try:
        return datasets.load_dataset(name, config)
    except Exception as e:
        raise OSError(
            f"datasets.load_dataset({name!r}) failed ({type(e).__name__}: {e}); pass a local data folder "
            "or a folder written by Dataset.save_to_disk"
        ) from e
