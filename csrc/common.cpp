#include "common.h"

#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

namespace fastvae {

Reduction parse_reduction(std::string_view reduction, bool allow_none) {
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "batchmean") return Reduction::BatchMean;
  if (reduction == "mean") return Reduction::Mean;
  if (allow_none && reduction == "per_sample") return Reduction::PerSample;
  TORCH_CHECK(allow_none && reduction == "none", "reduction must be one of 'sum', 'batchmean', 'mean'",
              allow_none ? ", 'none', 'per_sample'" : "", ", got '", reduction, "'");
  return Reduction::None;
}

double reduction_divisor(Reduction reduction, const at::Tensor& t) {
  switch (reduction) {
    case Reduction::BatchMean:
      TORCH_CHECK(t.dim() > 0, "reduction 'batchmean' needs a batch dimension, got a 0-dim tensor");
      return static_cast<double>(t.size(0));
    case Reduction::Mean:
      return static_cast<double>(t.numel());
    default:
      return 1.0;
  }
}

at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float(const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_pair(const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b) {
  check_float(name_a, a);
  TORCH_CHECK(a.sizes() == b.sizes(), name_a, " has shape ", a.sizes(), " but ", name_b, " has ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name_a, " is ", a.scalar_type(), " but ", name_b,
              " is ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), name_a, " is on ", a.device(), " but ", name_b, " is on ",
              b.device());
}

void check_first_order_backward(const char* op) {
  TORCH_CHECK(!c10::GradMode::is_enabled(), op,
              " has no double backward: its gradient cannot be taken with create_graph=True (nor under "
              "torch.func transforms); use backend=\"reference\" for higher-order gradients");
}

}  // namespace fastvae
