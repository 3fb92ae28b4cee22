"""Grouped matmul over rows sorted by group (the experts of a mixture-of-experts layer)."""

from pallas_kernels.grouped_matmul.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul.reference import GroupTiles, group_tiles, grouped_matmul_reference

__all__ = ["GroupTiles", "group_tiles", "grouped_matmul", "grouped_matmul_reference"]
