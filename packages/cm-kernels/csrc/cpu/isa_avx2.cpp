// The avx2 build of isa_core.h (see there). Standard headers come before the target pragma so
// their inline functions stay baseline code.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC target("avx2,fma,f16c")
#define CM_ISA_NS isa_avx2
#define CM_ISA_NAME "avx2"
#define CM_VEC_BYTES 32
#include "isa_core.h"
#include "isa_table.h"
#endif  // x86-64
