// Runs NMS through the installed library on three boxes: the middle one overlaps the first (IoU 0.81) and goes.
#include <cstdio>

#include <ATen/ops/tensor.h>
#include <visionops.h>

int main() {
  const at::Tensor boxes = at::tensor({0.f, 0.f, 10.f, 10.f, 1.f, 1.f, 10.f, 10.f, 20.f, 20.f, 30.f, 30.f}).view({3, 4});
  const at::Tensor scores = at::tensor({0.9f, 0.8f, 0.7f});
  const at::Tensor keep = visionops::nms(boxes, scores, 0.5);
  const at::Tensor iou = visionops::box_iou(boxes, boxes);
  const bool ok = keep.size(0) == 2 && keep[0].item<int64_t>() == 0 && keep[1].item<int64_t>() == 2 &&
                  iou[0][1].item<float>() > 0.8f;
  std::printf("keep = [%lld, %lld] -> %s\n", static_cast<long long>(keep[0].item<int64_t>()),
              static_cast<long long>(keep[keep.size(0) - 1].item<int64_t>()), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
