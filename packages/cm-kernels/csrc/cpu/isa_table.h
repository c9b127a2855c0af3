// The IsaKernels table of one ISA build of isa_core.h (included at the end of isa_<name>.cpp).
namespace cm_kernels {
namespace CM_ISA_NS {

const IsaKernels& table() {
  static const IsaKernels t = [] {
    IsaKernels k{};
    k.name = CM_ISA_NAME;
    k.lanes = W;
    k.tile_cols = TC;
    k.group_rows = kGroup;
    k.strip_pad = kStripPad;
    k.key_chunk = kKeyChunk;
    k.attn_fwd_rows = attn_fwd_rows;
    k.attn_bwd_keys = attn_bwd_keys;
    k.attn_jvp_rows = attn_jvp_rows;
    k.normalize_rows = normalize_rows;
    k.normalize_jvp_rows = normalize_jvp_rows;
    k.normalize_bwd_rows = normalize_bwd_rows;
    k.bf16_to_f32 = bf16_to_f32;
    k.f32_to_bf16 = f32_to_bf16;
    k.sumsq_diff_f32 = sumsq_diff_f32;
    k.sumsq_diff_bf16 = sumsq_diff_bf16;
    k.scaled_diff_f32 = scaled_diff_f32;
    k.scaled_diff_bf16 = scaled_diff_bf16;
    k.sumsq_diff_f16 = sumsq_diff_f16;
    k.scaled_diff_f16 = scaled_diff_f16;
    return k;
  }();
  return t;
}

}  // namespace CM_ISA_NS
}  // namespace cm_kernels
