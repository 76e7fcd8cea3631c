"""Building blocks shared by vilseg's 2D and 3D models."""
from .embed import PatchEmbed, resize_pos_embed, to_ntuple
from .vil_block import (DIRECTIONS, BlockDiagonalLinear, GridConv, MatrixLSTMCell, MultiHeadNorm, ViLBlock,
                        ViLBlockPair, ViLLayer)

__all__ = ["PatchEmbed", "resize_pos_embed", "to_ntuple", "DIRECTIONS", "BlockDiagonalLinear", "GridConv",
           "MatrixLSTMCell", "MultiHeadNorm", "ViLBlock", "ViLBlockPair", "ViLLayer"]
