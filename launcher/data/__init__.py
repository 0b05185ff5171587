"""Data pipeline: files -> rows in one `messages` form -> chat template -> masked labels -> packing."""
