// The IsaKernels table of one ISA build of isa_core.h (included at the end of isa_<name>.cpp).
namespace cm_kernels {
namespace CM_ISA_NS {

const IsaKernels& table() {
  static const IsaKernels t{CM_ISA_NAME,     W,           TC,          kGroup,         kKeyChunk,
                            attn_fwd_rows,   attn_bwd_keys,    normalize_rows, normalize_bwd_rows, bf16_to_f32,
                            f32_to_bf16,     sumsq_diff_f32, sumsq_diff_bf16, scaled_diff_f32, scaled_diff_bf16};
  return t;
}

}  // namespace CM_ISA_NS
}  // namespace cm_kernels
