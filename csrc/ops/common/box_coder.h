#pragma once
// Box coding math shared by the CPU and CUDA kernels; the formulas are documented in visionops/reference/box_coder.py
// and follow torchvision's detection BoxCoder operation by operation (same order, divisions kept as divisions), so
// that float32/float64 results match torchvision to the last bit on the CPU (up to exp's last ulp).
#include <cmath>
#include <cstdint>
#include <cstring>

#include <ATen/core/Tensor.h>

#include "ops/common/macros.h"

namespace visionops {

template <typename T>
struct BoxCoderParams {
  T wx, wy, ww, wh;  // weights
  T clip;            // bbox_xform_clip: dw, dh are clamped to at most this before exp
  bool clip_to_image;
  T img_h, img_w;
};

#if !defined(__CUDA_ARCH__)
template <typename To, typename From>
inline To bits_as(From v) {  // std::bit_cast without needing C++20 in every compiler pass
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// Branch-free exp for the CPU kernels (Cephes' expf polynomial; Taylor to degree 13 for double), written so that
// the compiler vectorises a loop calling it: libm's scalar exp made the fused decode slower than torch's SIMD exp.
// Error <= 1 ulp, like torch's SLEEF exp (the two may differ in the last bit); NaN and +/-inf handled.
inline float exp_poly(float x) {
  const float xc0 = x > -104.0f ? x : -104.0f;  // also maps NaN to a finite value; restored below
  const float xc = xc0 < 89.0f ? xc0 : 89.0f;   // exp(89) overflows to inf through the scaling, as it should
  const float magic = 12582912.0f;              // 1.5 * 2^23: adding it rounds to the nearest integer
  const float nf = (xc * 1.44269504088896341f + magic) - magic;
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(nf), n1 = n >> 1, n2 = n - n1;  // 2^n in two factors: no overflow
  const float s1 = bits_as<float>((n1 + 127) << 23), s2 = bits_as<float>((n2 + 127) << 23);
  const float out = p * s1 * s2;
  return x != x ? x : out;
}

inline double exp_poly(double x) {
  const double xc0 = x > -746.0 ? x : -746.0;
  const double xc = xc0 < 710.0 ? xc0 : 710.0;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double nf = (xc * 1.4426950408889634 + magic) - magic;
  const double r = (xc - nf * 6.93145751953125e-1) - nf * 1.42860682030941723212e-6;
  double p = 1.0 / 6227020800.0;  // 1/13!, then Horner down to 1/0!
  // clang-format off: a table
  const double inv_fact[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                               1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,     1.0 / 120.0,
                               1.0 / 24.0,        1.0 / 6.0,        0.5,             1.0, 1.0};
  // clang-format on
  for (int i = 0; i < 13; ++i) p = p * r + inv_fact[i];
  const int64_t n = static_cast<int64_t>(nf), n1 = n >> 1, n2 = n - n1;
  const double s1 = bits_as<double>((n1 + 1023) << 52), s2 = bits_as<double>((n2 + 1023) << 52);
  const double out = p * s1 * s2;
  return x != x ? x : out;
}
#endif

template <typename T>
VISIONOPS_HOST_DEVICE inline T exp_of(T v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return expf(v);
  else return ::exp(v);
#else
  return exp_poly(v);
#endif
}

#if !defined(__CUDA_ARCH__)
// Branch-free logf for the CPU encode loop (Cephes' logf polynomial), <= 1 ulp like torch's SLEEF log. Exponent and
// mantissa come from the bits, and special values are decided on the bits too (integer compares keep the selects
// branch-free): 0 -> -inf, negatives and NaN -> NaN, +inf -> +inf; denormals are scaled into the normal range.
inline float log_poly(float x) {
  const int32_t raw = bits_as<int32_t>(x);
  const bool denormal = raw > 0 && raw < 0x00800000;
  const int32_t i = denormal ? bits_as<int32_t>(x * 8388608.0f) : raw;  // * 2^23
  const bool small = (i & 0x007fffff) < 0x003504f3;  // mantissa below sqrt(1/2): use 2m - 1 and e - 1
  const int32_t e = ((i >> 23) & 0xff) - 126 - (small ? 1 : 0) - (denormal ? 23 : 0);
  const float m0 = bits_as<float>((i & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const float m = small ? m0 + m0 - 1.0f : m0 - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float out = (m + y) + 0.693359375f * fe;
  const int32_t zero = (raw & 0x7fffffff) == 0, negative = raw < 0, inf_or_nan = raw >= 0x7f800000;
  const int32_t special = zero ? int32_t(0xff800000u) : (negative ? int32_t(0x7fc00000) : raw);
  return (zero | negative | inf_or_nan) ? bits_as<float>(special) : out;
}
#endif

template <typename T>
VISIONOPS_HOST_DEVICE inline T log_of(T v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return logf(v);
  else return ::log(v);
#else
  if constexpr (sizeof(T) == 4) return log_poly(v);
  else return std::log(v);
#endif
}

// torch.clamp(v, lo, hi) semantics: NaN stays NaN.
template <typename T>
VISIONOPS_HOST_DEVICE inline T clamp_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Decodes delta d[4] = (dx, dy, dw, dh) against anchor a[4] = (x1, y1, x2, y2) into out[4] (x1, y1, x2, y2);
// kClip: clamp to the image. (A compile-time flag keeps the CPU loop free of branches, so that it vectorises.)
template <typename T, bool kClip>
VISIONOPS_HOST_DEVICE inline void decode_box_impl(const T* a, const T* d, const BoxCoderParams<T>& p, T* out) {
  const T w = sub_rn(a[2], a[0]);
  const T h = sub_rn(a[3], a[1]);
  const T cx = add_rn(a[0], mul_rn(T(0.5), w));
  const T cy = add_rn(a[1], mul_rn(T(0.5), h));
  const T dx = d[0] / p.wx, dy = d[1] / p.wy;
  const T dw = min_first(d[2] / p.ww, p.clip), dh = min_first(d[3] / p.wh, p.clip);
  const T pcx = add_rn(mul_rn(dx, w), cx);
  const T pcy = add_rn(mul_rn(dy, h), cy);
  const T hw = mul_rn(T(0.5), mul_rn(exp_of(dw), w));
  const T hh = mul_rn(T(0.5), mul_rn(exp_of(dh), h));
  out[0] = sub_rn(pcx, hw);
  out[1] = sub_rn(pcy, hh);
  out[2] = add_rn(pcx, hw);
  out[3] = add_rn(pcy, hh);
  if (kClip) {
    out[0] = clamp_nan(out[0], T(0), p.img_w);
    out[1] = clamp_nan(out[1], T(0), p.img_h);
    out[2] = clamp_nan(out[2], T(0), p.img_w);
    out[3] = clamp_nan(out[3], T(0), p.img_h);
  }
}

template <typename T>
VISIONOPS_HOST_DEVICE inline void decode_box(const T* a, const T* d, const BoxCoderParams<T>& p, T* out) {
  if (p.clip_to_image) decode_box_impl<T, true>(a, d, p, out);
  else decode_box_impl<T, false>(a, d, p, out);
}

// Backward of decode_box for upstream gradient g[4]: writes gd[4] (w.r.t. the delta) and accumulates into ga[4]
// (w.r.t. the anchor). Gradients pass torch.clamp's way: through where lo <= v <= hi, zero outside.
template <typename T>
VISIONOPS_HOST_DEVICE inline void decode_box_backward(const T* a, const T* d, const BoxCoderParams<T>& p, const T* g,
                                                      T* gd, T* ga) {
  const T w = a[2] - a[0], h = a[3] - a[1];
  const T dx = d[0] / p.wx, dy = d[1] / p.wy;
  const T dw_raw = d[2] / p.ww, dh_raw = d[3] / p.wh;
  const T ew = exp_of(min_first(dw_raw, p.clip)), eh = exp_of(min_first(dh_raw, p.clip));
  T g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
  if (p.clip_to_image) {
    T out[4];
    decode_box_impl<T, false>(a, d, p, out);
    auto inside = [](T v, T hi) { return v >= T(0) && v <= hi; };
    g0 = inside(out[0], p.img_w) ? g0 : T(0);
    g1 = inside(out[1], p.img_h) ? g1 : T(0);
    g2 = inside(out[2], p.img_w) ? g2 : T(0);
    g3 = inside(out[3], p.img_h) ? g3 : T(0);
  }
  const T g_pcx = g0 + g2, g_pcy = g1 + g3;
  const T g_pw = T(0.5) * (g2 - g0), g_ph = T(0.5) * (g3 - g1);
  gd[0] = g_pcx * w / p.wx;
  gd[1] = g_pcy * h / p.wy;
  gd[2] = dw_raw <= p.clip ? g_pw * ew * w / p.ww : T(0);
  gd[3] = dh_raw <= p.clip ? g_ph * eh * h / p.wh : T(0);
  // cx = x1 + w / 2 and w = x2 - x1, so x1 receives g_cx - g_w and x2 receives g_w.
  const T g_w = g_pcx * dx + g_pw * ew + T(0.5) * g_pcx;
  const T g_h = g_pcy * dy + g_ph * eh + T(0.5) * g_pcy;
  ga[0] += g_pcx - g_w;
  ga[1] += g_pcy - g_h;
  ga[2] += g_w;
  ga[3] += g_h;
}

// Backward for anchor i and its k deltas (rows i*k .. i*k+k-1 of 4 values): writes their delta gradients and the
// anchor's gradient, summed over its k deltas (one owner per anchor: no atomics). S: the stored dtype.
template <typename T, typename S>
VISIONOPS_HOST_DEVICE inline void decode_anchor_backward(int64_t i, int64_t k, const S* anchors, const S* deltas,
                                                         const S* grad, const BoxCoderParams<T>& p, S* grad_deltas,
                                                         S* grad_anchors) {
  const T a[4] = {T(anchors[4 * i]), T(anchors[4 * i + 1]), T(anchors[4 * i + 2]), T(anchors[4 * i + 3])};
  T acc[4] = {0, 0, 0, 0};
  for (int64_t j = 0; j < k; ++j) {
    const int64_t o = 4 * (i * k + j);
    const T d[4] = {T(deltas[o]), T(deltas[o + 1]), T(deltas[o + 2]), T(deltas[o + 3])};
    const T g[4] = {T(grad[o]), T(grad[o + 1]), T(grad[o + 2]), T(grad[o + 3])};
    T gd[4];
    decode_box_backward(a, d, p, g, gd, acc);
    for (int c = 0; c < 4; ++c) grad_deltas[o + c] = static_cast<S>(gd[c]);
  }
  for (int c = 0; c < 4; ++c) grad_anchors[4 * i + c] = static_cast<S>(acc[c]);
}

// Encodes reference (ground-truth) box r[4] against proposal q[4] into out[4] = (dx, dy, dw, dh).
template <typename T>
VISIONOPS_HOST_DEVICE inline void encode_box(const T* r, const T* q, const BoxCoderParams<T>& p, T* out) {
  const T ew = sub_rn(q[2], q[0]), eh = sub_rn(q[3], q[1]);
  const T ecx = add_rn(q[0], mul_rn(T(0.5), ew)), ecy = add_rn(q[1], mul_rn(T(0.5), eh));
  const T gw = sub_rn(r[2], r[0]), gh = sub_rn(r[3], r[1]);
  const T gcx = add_rn(r[0], mul_rn(T(0.5), gw)), gcy = add_rn(r[1], mul_rn(T(0.5), gh));
  out[0] = mul_rn(p.wx, sub_rn(gcx, ecx)) / ew;
  out[1] = mul_rn(p.wy, sub_rn(gcy, ecy)) / eh;
  out[2] = mul_rn(p.ww, log_of(gw / ew));
  out[3] = mul_rn(p.wh, log_of(gh / eh));
}

// ---- host side: argument checks shared by the CPU and CUDA entries ----

inline void check_decode_args(const at::Tensor& deltas, const at::Tensor& anchors, at::ArrayRef<double> weights,
                              at::ArrayRef<double> image_size) {
  TORCH_CHECK(deltas.dim() == 2 && deltas.size(1) % 4 == 0, "decode_boxes: deltas must have shape [N, 4*K], got ",
              deltas.sizes());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 4 && anchors.size(0) == deltas.size(0),
              "decode_boxes: anchors must have shape [N, 4] with N = deltas.size(0), got ", anchors.sizes());
  TORCH_CHECK(anchors.scalar_type() == deltas.scalar_type(), "decode_boxes: anchors must have the dtype of deltas");
  TORCH_CHECK(anchors.device() == deltas.device(), "decode_boxes: anchors must be on the device of deltas");
  TORCH_CHECK(weights.size() == 4, "decode_boxes: weights must have 4 entries, got ", weights.size());
  TORCH_CHECK(image_size.empty() || image_size.size() == 2, "decode_boxes: image_size must be () or (H, W)");
}

inline void check_encode_args(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                              at::ArrayRef<double> weights) {
  TORCH_CHECK(reference_boxes.dim() == 2 && reference_boxes.size(1) == 4,
              "encode_boxes: reference_boxes must have shape [N, 4], got ", reference_boxes.sizes());
  TORCH_CHECK(proposals.sizes() == reference_boxes.sizes(), "encode_boxes: proposals must have shape ",
              reference_boxes.sizes(), ", got ", proposals.sizes());
  TORCH_CHECK(proposals.scalar_type() == reference_boxes.scalar_type(),
              "encode_boxes: proposals must have the dtype of reference_boxes");
  TORCH_CHECK(proposals.device() == reference_boxes.device(), "encode_boxes: inputs must be on one device");
  TORCH_CHECK(weights.size() == 4, "encode_boxes: weights must have 4 entries, got ", weights.size());
}

inline void check_filter_args(const at::Tensor& boxes, const at::Tensor& scores) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "filter_boxes: boxes must have shape [N, 4], got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "filter_boxes: scores must have shape [N]");
  TORCH_CHECK(scores.device() == boxes.device(), "filter_boxes: scores must be on the device of boxes");
}

template <typename T>
inline BoxCoderParams<T> make_coder_params(at::ArrayRef<double> weights, double clip, at::ArrayRef<double> image_size) {
  const bool c = image_size.size() == 2;
  return BoxCoderParams<T>{T(weights[0]),
                           T(weights[1]),
                           T(weights[2]),
                           T(weights[3]),
                           T(clip),
                           c,
                           c ? T(image_size[0]) : T(0),
                           c ? T(image_size[1]) : T(0)};
}

}  // namespace visionops
