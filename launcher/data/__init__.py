"""Data pipeline: files -> rows in one `messages` form -> chat template -> masked labels -> packing.

Nothing here imports torch at import time: the login node checks data files through this package.
"""

from launcher.data.collate import collate
from launcher.data.errors import DataError
from launcher.data.pipeline import PreparedData, prepare_data

__all__ = ["DataError", "PreparedData", "collate", "prepare_data"]
