// Run-time ISA choice for the CPU kernels (see isa.h).
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace cm_kernels {
namespace {

bool cpu_has(const char* name) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (std::strcmp(name, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  if (std::strcmp(name, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(name, "base") == 0;
}

const IsaKernels* by_name(const char* name) {
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(name, "avx512") == 0) return &isa_avx512::table();
  if (std::strcmp(name, "avx2") == 0) return &isa_avx2::table();
#endif
  if (std::strcmp(name, "base") == 0) return &isa_base::table();
  return nullptr;
}

const IsaKernels* choose() {
  const char* forced = std::getenv("CM_KERNELS_ISA");
  if (forced != nullptr && *forced != '\0' && cpu_has(forced)) {
    if (const IsaKernels* k = by_name(forced)) return k;
  }
  static const char* const kOrder[] = {"avx512", "avx2", "base"};
  for (const char* name : kOrder)
    if (cpu_has(name))
      if (const IsaKernels* k = by_name(name)) return k;
  return &isa_base::table();
}

}  // namespace

const IsaKernels* isa_kernels_named(const char* name) { return cpu_has(name) ? by_name(name) : nullptr; }

namespace {
std::atomic<const IsaKernels*> current{nullptr};
}

const IsaKernels& isa_kernels() {
  const IsaKernels* k = current.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = choose();
    current.store(k, std::memory_order_release);
  }
  return *k;
}

const IsaKernels* set_isa_kernels(const char* name) {
  const IsaKernels* k = std::strcmp(name, "auto") == 0 ? choose() : isa_kernels_named(name);
  if (k != nullptr) current.store(k, std::memory_order_release);
  return k;
}

}  // namespace cm_kernels
