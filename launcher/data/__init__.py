"""Data pipeline: files -> rows in one `messages` form -> chat template -> masked labels -> packing."""

from launcher.data.errors import DataError

__all__ = ["DataError", "PreparedData", "collate", "prepare_data"]


def __getattr__(name: str):
    # Loaded on first use: the login node checks data files (launcher.data.check) without torch.
    if name == "collate":
        from launcher.data.collate import collate

        return collate
    if name in ("PreparedData", "prepare_data"):
        from launcher.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
