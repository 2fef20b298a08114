// Calls every op of the installed library once through csrc/visionops.h on tiny CPU inputs: a typed signature that
// does not match the registered kernels fails at its first call, and each result is checked against a value worked
// out by hand.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <visionops.h>

namespace {
int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%-32s %s\n", what, ok ? "ok" : "WRONG");
  failures += ok ? 0 : 1;
}

bool near(const at::Tensor& t, double v) { return std::abs(t.item<double>() - v) < 1e-5; }
}  // namespace

int main() {
  // Box 1 overlaps box 0 (IoU 0.81) and goes; box 2 is apart.
  const at::Tensor boxes =
      at::tensor({0.f, 0.f, 10.f, 10.f, 1.f, 1.f, 10.f, 10.f, 20.f, 20.f, 30.f, 30.f}).view({3, 4});
  const at::Tensor scores = at::tensor({0.9f, 0.8f, 0.7f});
  const at::Tensor keep = visionops::nms(boxes, scores, 0.5);
  check(keep.size(0) == 2 && keep[0].item<int64_t>() == 0 && keep[1].item<int64_t>() == 2, "nms");
  const at::Tensor classes = at::tensor({int64_t{0}, int64_t{1}, int64_t{0}});
  check(visionops::batched_nms(boxes, scores, classes, 0.5).size(0) == 3, "batched_nms");
  check(visionops::box_iou(boxes, boxes)[0][1].item<float>() > 0.8f, "box_iou");
  const auto [g1, g2] = visionops::_box_iou_backward(at::ones({3, 3}), boxes, boxes);
  check(g1.sizes() == boxes.sizes() && g2.sizes() == boxes.sizes(), "_box_iou_backward");

  // Soft-NMS, linear (mmcv's test boxes): box 2 overlaps the kept box 1 with IoU 24/41 > 0.3, so its 0.7 decays to
  // 0.7 * 17/41; boxes 0 and 3 overlap the kept boxes by less than 0.3 and keep their scores.
  const at::Tensor sb =
      at::tensor({6.f, 3.f, 8.f, 7.f, 3.f, 6.f, 9.f, 11.f, 3.f, 7.f, 10.f, 12.f, 1.f, 4.f, 13.f, 7.f}).view({4, 4});
  const at::Tensor ss = at::tensor({0.6f, 0.9f, 0.7f, 0.2f});
  const auto [sk, sv] = visionops::soft_nms(sb, ss, 0.3, 0.5, 0.01, 1);
  check(sk.size(0) == 4 && sk[0].item<int64_t>() == 1 && sk[2].item<int64_t>() == 2 && near(sv[2], 0.7 * 17 / 41),
        "soft_nms");
  const at::Tensor sc = at::tensor({int64_t{0}, int64_t{1}, int64_t{1}, int64_t{0}});
  const auto [bk, bv] = visionops::batched_soft_nms(sb, ss, sc, 0.3, 0.5, 0.01, 1);
  check(bk.size(0) == 4 && bk[2].item<int64_t>() == 2 && near(bv[2], 0.7 * 17 / 41), "batched_soft_nms");

  // Fixed-shape multiclass NMS on a batch of one image, one class: box 1 goes, as in nms; two padding rows.
  const auto [mb, ms_, mc, mn] =
      visionops::multiclass_nms(boxes.unsqueeze(0), scores.view({1, 3, 1}), 0.5, 0.05, 10, 4, false);
  check(mb.size(1) == 4 && mn[0].item<int64_t>() == 2 && near(ms_[0][1], 0.7) && mc[0][2].item<int64_t>() == -1,
        "multiclass_nms");
  // Matrix NMS: the top box keeps its score; box 1 decays by exp(-2 * 0.81^2) and falls behind box 2 (IoU 0).
  const auto [xk, xs] = visionops::matrix_nms(boxes, scores, at::zeros({3}, at::kLong), "gaussian", 2.0, 0.0, -1);
  check(xk.size(0) == 3 && xk[1].item<int64_t>() == 2 && near(xs[1], 0.7) && near(xs[2], 0.8 * std::exp(-2 * 0.6561)),
        "matrix_nms");

  // RoIs inside constant feature maps: every bin averages ones, and each bin's weights sum to 1.
  const at::Tensor x = at::ones({1, 1, 4, 4}), rois = at::tensor({0.f, 0.f, 0.f, 3.f, 3.f}).view({1, 5});
  check(near(visionops::roi_align(x, rois, 1.0, 2, 2, 2, false).sum(), 4.0), "roi_align");
  check(near(visionops::_roi_align_backward(at::ones({1, 1, 2, 2}), rois, 1.0, 2, 2, 1, 1, 4, 4, 2, false).sum(), 4.0),
        "_roi_align_backward");
  const std::vector<at::Tensor> features{x, at::ones({1, 1, 2, 2})};
  const std::vector<double> scales{1.0, 0.5};
  const at::Tensor rois2 = at::cat({rois, rois}), levels = at::tensor({int64_t{0}, int64_t{1}});
  const at::Tensor ms = visionops::multi_scale_roi_align(features, rois2, levels, scales, 2, 2, 2, false);
  check(ms.size(0) == 2 && near(ms.sum(), 8.0), "multi_scale_roi_align");
  const std::vector<int64_t> shapes{1, 1, 4, 4, 1, 1, 2, 2};
  const std::vector<at::Tensor> ms_grads =
      visionops::_multi_scale_roi_align_backward(at::ones({2, 1, 2, 2}), rois2, levels, scales, 2, 2, shapes, 2, false);
  check(ms_grads.size() == 2 && near(ms_grads[0].sum(), 4.0) && near(ms_grads[1].sum(), 4.0),
        "_multi_scale_roi_align_backward");
  const at::Tensor ramp = at::arange(16, at::kFloat).view({1, 1, 4, 4});
  check(near(visionops::roi_pool(ramp, rois, 1.0, 1, 1), 15.0), "roi_pool");
  const at::Tensor gin = visionops::_roi_pool_backward(at::ones({1, 1, 1, 1}), ramp, rois, 1.0, 1, 1);
  check(near(gin[0][0][3][3], 1.0) && near(gin.sum(), 1.0), "_roi_pool_backward");

  // One cell anchor on a 2x2 grid of stride 4: the last anchor is centred on (4, 4).
  const at::Tensor cell = at::tensor({-1.f, -1.f, 1.f, 1.f}).view({1, 4});
  const at::Tensor anchors = visionops::grid_anchors(cell, {1}, {2, 2}, {4.0, 4.0}, 0.0, 1, at::kFloat);
  check(anchors.sizes() == at::IntArrayRef({1, 4, 4}) && near(anchors[0][3][0], 3.0) && near(anchors[0][3][3], 5.0),
        "grid_anchors");
  const std::vector<double> weights{1.0, 1.0, 1.0, 1.0};
  const double clip = std::log(1000.0 / 16);
  const at::Tensor deltas = at::zeros({3, 4});
  check(near(visionops::decode_boxes(deltas, boxes, weights, clip, {}).sub(boxes).abs().max(), 0.0), "decode_boxes");
  const auto [gd, ga] = visionops::_decode_boxes_backward(at::ones({3, 4}), deltas, boxes, weights, clip, {});
  check(gd.sizes() == deltas.sizes() && ga.sizes() == boxes.sizes(), "_decode_boxes_backward");
  check(near(visionops::encode_boxes(boxes, boxes, weights).abs().sum(), 0.0), "encode_boxes");
  const at::Tensor kept = visionops::filter_boxes(boxes, at::tensor({0.9f, 0.1f, 0.8f}), 0.5, 1.0);
  check(kept.size(0) == 2 && kept[1].item<int64_t>() == 2, "filter_boxes");
  // z = ones [1, 2, 2, 2] over x = the 3x3 plane 0..8 in both channels: the 2x2 window sums are 8, 12, 20, 24, and
  // xcorr adds the 2 channels then halves. With grad = ones, grad_z[i, j] sums the x cells tap (i, j) reads and
  // grad_x[y, w] counts the taps that reach (y, w): 4 at the centre, 1 at a corner.
  const at::Tensor zx = at::ones({1, 2, 2, 2}), xx = at::arange(9, at::kFloat).view({1, 1, 3, 3}).repeat({1, 2, 1, 1});
  const at::Tensor xc = visionops::xcorr(zx, xx, 0.5);
  check(xc.sizes() == at::IntArrayRef({1, 1, 2, 2}) && near(xc[0][0][0][0], 8.0) && near(xc[0][0][1][1], 24.0),
        "xcorr");
  const auto [xgz, xgx] = visionops::_xcorr_backward(at::ones({1, 1, 2, 2}), zx, xx, 0.5);
  check(near(xgz[0][1][0][0], 0.5 * (0 + 1 + 3 + 4)) && near(xgx[0][0][1][1], 0.5 * 4) && near(xgx.sum(), 0.5 * 32),
        "_xcorr_backward");
  const at::Tensor dw = visionops::depthwise_xcorr(zx, xx);
  check(dw.sizes() == at::IntArrayRef({1, 2, 2, 2}) && near(dw[0][1][1][0], 3 + 4 + 6 + 7), "depthwise_xcorr");
  const auto [dgz, dgx] = visionops::_depthwise_xcorr_backward(at::ones({1, 2, 2, 2}), zx, xx);
  check(near(dgz[0][0][1][1], 4 + 5 + 7 + 8) && near(dgx[0][1][1][1], 4.0) && near(dgx[0][1][0][0], 1.0),
        "_depthwise_xcorr_backward");
  // conv2d of the same plane with a 2x2 kernel of ones and bias 1: the window sums plus 1. With grad = ones,
  // grad_input counts the taps reaching each cell, grad_weight[i, j] sums the cells tap (i, j) reads, grad_bias the 4
  // outputs. conv3d sees the plane as depth 1.
  const at::Tensor cx = at::arange(9, at::kFloat).view({1, 1, 3, 3}), cw = at::ones({1, 1, 2, 2});
  const at::Tensor cy = visionops::conv2d(cx, cw, at::ones({1}), {1, 1}, {0, 0}, {1, 1}, 1);
  check(cy.sizes() == at::IntArrayRef({1, 1, 2, 2}) && near(cy[0][0][0][0], 9.0) && near(cy[0][0][1][1], 25.0),
        "conv2d");
  const auto [cgi, cgw, cgb] =
      visionops::_conv2d_backward(at::ones({1, 1, 2, 2}), cx, cw, {1, 1}, {0, 0}, {1, 1}, 1, {true, true, true});
  check(near(cgi[0][0][1][1], 4.0) && near(cgi[0][0][0][0], 1.0) && near(cgw[0][0][0][0], 0 + 1 + 3 + 4) &&
            near(cgb[0], 4.0),
        "_conv2d_backward");
  const at::Tensor c3 = visionops::conv3d(cx.unsqueeze(2), cw.unsqueeze(2), {}, {1, 1, 1}, {0, 0, 0}, {1, 1, 1}, 1);
  check(c3.sizes() == at::IntArrayRef({1, 1, 1, 2, 2}) && near(c3[0][0][0][1][1], 24.0), "conv3d");
  const auto [c3gi, c3gw, c3gb] =
      visionops::_conv3d_backward(at::ones({1, 1, 1, 2, 2}), cx.unsqueeze(2), cw.unsqueeze(2), {1, 1, 1}, {0, 0, 0},
                                  {1, 1, 1}, 1, {false, true, false});
  check(c3gi.sizes() == at::IntArrayRef({0}) && near(c3gw[0][0][0][1][1], 4 + 5 + 7 + 8) &&
            c3gb.sizes() == at::IntArrayRef({0}),
        "_conv3d_backward");
  const std::string info = visionops::build_info();
  check(info.find(";roi_align_max_levels=8;roi_align_max_grid=65536") != std::string::npos, "build_info");

  std::printf("%s\n", failures ? "FAILED" : "all ops ok");
  return failures ? 1 : 0;
}
