// Instantiates the attention kernels for __nv_bfloat16 (one dtype per file: parallel builds).
#include "attention_kernels.cuh"

CMK_INSTANTIATE_ATTENTION(__nv_bfloat16)
