"""The one progress-bar switch of the library.

Every long loop (gradient estimate, evaluation, training) shows a tqdm bar through ``progress_bar``.
Turn a single bar off with the function's ``progress=False`` argument, or every bar with the
environment variable ``LORA_ONE_PROGRESS=0`` (for logs and CI).

Example:
    >>> list(progress_bar(range(3), desc="demo", enabled=False))
    [0, 1, 2]
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def progress_enabled(enabled: bool = True) -> bool:
    """``enabled``, unless ``LORA_ONE_PROGRESS=0`` turns every bar off.

    Example:
        >>> progress_enabled(False)
        False
    """
    return bool(enabled) and os.environ.get("LORA_ONE_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    leave: bool = True,
    unit: str = "it",
    **kwargs,
):
    """A tqdm bar over ``iterable`` (or a manual one when ``iterable`` is None); a silent stand-in when disabled.

    The stand-in has tqdm's ``update``, ``set_postfix``, ``set_description``, ``write`` and ``close``.

    Example:
        >>> bar = progress_bar(desc="demo", total=2, enabled=False)
        >>> bar.update(1); bar.set_postfix(loss=0.5); bar.close()
    """
    if progress_enabled(enabled):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit, dynamic_ncols=True, **kwargs)
    return _Silent(iterable)


class _Silent:
    def __init__(self, iterable):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def write(self, text, *args, **kwargs):
        print(text)

    def close(self):
        pass
