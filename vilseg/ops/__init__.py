"""Sequence kernels shared by every vilseg model."""
from .mlstm import (MLSTM_KERNELS, ChunkwiseRecord, chunkwise_mlstm, mlstm, parallel_mlstm, recurrent_mlstm,
                    resolve_kernel)

__all__ = ["parallel_mlstm", "chunkwise_mlstm", "ChunkwiseRecord", "recurrent_mlstm", "mlstm", "resolve_kernel",
           "MLSTM_KERNELS"]
