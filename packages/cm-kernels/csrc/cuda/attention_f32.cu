// Instantiates the attention kernels for float (one dtype per file: parallel builds).
#include "attention_kernels.cuh"

CMK_INSTANTIATE_ATTENTION(float)
