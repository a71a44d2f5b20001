"""Progress bars on stderr (tqdm); results go to stdout, so bars never mix with them."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", show: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show, leave=False)
