// Host-side helpers shared by every fastvae operator: input checks that name both sides,
// reductions, and the dtype losses are accumulated and returned in.
#pragma once

#include <string_view>

#include <ATen/core/Tensor.h>

namespace fastvae {

enum class Reduction { None, Sum, BatchMean, Mean, PerSample };

// `allow_none`: only the KL alone has a meaningful "none" (elementwise) or "per_sample" (the
// totals over every dim but the first); both are allowed with it.
Reduction parse_reduction(std::string_view reduction, bool allow_none);

// The number a reduced sum over `t` is divided by: 1, t.size(0) or t.numel().
double reduction_divisor(Reduction reduction, const at::Tensor& t);

// float32, or float64 for float64 inputs.
at::ScalarType accumulate_type(at::ScalarType input);

// float16, bfloat16, float32 or float64.
void check_float(const char* name, const at::Tensor& t);

// Two tensors combined elementwise: floating, same shape, dtype and device.
void check_pair(const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b);

// Called by a backward: the backward ops have no derivative of their own, so a gradient asked
// for with create_graph=True (grad mode on in the backward) would be silently wrong. It raises.
void check_first_order_backward(const char* op);

}  // namespace fastvae
