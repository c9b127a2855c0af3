// The base build of isa_core.h (see there). Standard headers come before the target pragma so
// their inline functions stay baseline code.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

// no target pragma: the build baseline (SSE2 on x86-64, NEON on aarch64)
#define CM_ISA_NS isa_base
#define CM_ISA_NAME "base"
#define CM_VEC_BYTES 16
#include "isa_core.h"
#include "isa_table.h"
