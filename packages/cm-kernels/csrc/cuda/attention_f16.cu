// Instantiates the attention kernels for __half (one dtype per file: parallel builds).
#include "attention_kernels.cuh"

CMK_INSTANTIATE_ATTENTION(__half)
