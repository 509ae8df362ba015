// Included first by each *_avx2.cpp file: switches the rest of the translation unit to AVX2.
//
// setuptools compiles every source with the same flags, so instead of -mavx2 -mf16c the target
// is switched with a pragma, and the macros those flags would define are defined here, before
// torch's vector headers (and sleef.h) choose their AVX2 code by them. FMA is on for the explicit
// FMA intrinsics of cpu_vec_math.h only: fp-contract=off forbids the compiler to fuse a
// multiply and an add of its own, so every other expression rounds exactly like the baseline build.
// setup.py and CMakeLists.txt link the *_avx2.cpp files last, so the inline functions of torch
// and of the standard library that they compile for AVX2 lose to the baseline copies of earlier
// files.
#pragma once

#include "cpu_utils.h"  // for FASTVAE_AVX2_BUILD; it includes no vector code

#if FASTVAE_AVX2_BUILD
#pragma GCC target("avx2,f16c,fma")
#pragma GCC optimize("fp-contract=off")
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __F16C__ 1
#define __FMA__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
