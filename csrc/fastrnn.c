/* fastrnn C kernels: dtype-independent helpers, then kernels.inc
 * instantiated for float (suffix _f32) and double (_f64). See fastrnn.h.
 *
 * Built with -O3 -ffp-contract=fast, never -ffast-math: NaN and inf must
 * propagate exactly as in NumPy, so every clamp and select below is written
 * so that a NaN operand falls through (`x > hi ? hi : x` keeps NaN) and
 * nothing assumes finite values.
 *
 * On x86-64 Linux (glibc) with GCC >= 12 the entry points are compiled
 * twice, for x86-64-v3 (AVX2 + FMA) and for the baseline, and the loader
 * picks the clone the CPU supports (target_clones, an ifunc): the module
 * stays portable without -march. Elsewhere (other compilers, other
 * platforms) only the baseline is built. Define FR_NO_CLONES to turn the
 * clones off.
 */
#include "fastrnn.h"

#include <float.h>
#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    !defined(FR_NO_CLONES) && !defined(__clang__) && !defined(__INTEL_COMPILER) && \
    defined(__GNUC__) && __GNUC__ >= 12
#define FR_ENTRY __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FR_CLONES 1
#else
#define FR_ENTRY
#define FR_CLONES 0
#endif

/* helpers are inlined into each clone of an entry point, so that they are
 * compiled for the clone's instruction set */
#if defined(__GNUC__) || defined(__clang__)
#define FR_INLINE static inline __attribute__((always_inline))
#else
#define FR_INLINE static inline
#endif

int fr_has_clones(void) { return FR_CLONES; }

/* ---------------------------------------------------------------------------
 * float32 exponential, written to vectorise (no libm call, no branch, no
 * float-to-int conversion): x = k ln2 + r with k = round(x / ln2) (the
 * 1.5*2^23 shift rounds; ln2 split in two so k*ln2_hi is exact), |r| <= ln2/2;
 * e^r - 1 by its degree-7 Taylor polynomial (error < 1e-8 relative); 2^k from
 * its bit pattern. Valid for x in [-87, 88]; callers clamp first, with
 * comparisons that let NaN through, and a NaN x gives a NaN result (the
 * polynomial is NaN whatever the bits of 2^k are).
 * ------------------------------------------------------------------------- */
FR_INLINE void fr_exp_parts_f32(float x, float *two_k, float *em1_r)
{
    const float shift = 12582912.0f; /* 1.5 * 2^23 */
    float k = x * 1.44269504088896341f + shift;
    k = k - shift;
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    *em1_r = r * (1.0f + r * (0.5f + r * (0.166666667f + r * (0.0416666667f +
             r * (0.00833333333f + r * (0.00138888889f + r * 0.000198412698f))))));
    /* k + 1.5*2^23 + 127 has k + 127 in its low mantissa bits */
    float y = k + (shift + 127.0f);
    uint32_t u;
    memcpy(&u, &y, sizeof u);
    u <<= 23;
    memcpy(two_k, &u, sizeof u);
}

/* e^x - 1 = 2^k (e^r - 1) + (2^k - 1): accurate near 0 (k = 0) */
FR_INLINE float fr_expm1_f32(float x)
{
    float s, p;
    fr_exp_parts_f32(x, &s, &p);
    return s * p + (s - 1.0f);
}

FR_INLINE float fr_exp_f32(float x)
{
    float s, p;
    fr_exp_parts_f32(x, &s, &p);
    return s * p + s;
}

/* ---------------------------------------------------------------------------
 * the kernels, once per floating-point type
 * ------------------------------------------------------------------------- */
#define REAL float
#define SFX(name) name##_f32
#define FR_FAST_ACT 1
#define FR_SQRT sqrtf
#define FR_REAL_MAX FLT_MAX
#include "kernels.inc"
#undef REAL
#undef SFX
#undef FR_FAST_ACT
#undef FR_SQRT
#undef FR_REAL_MAX

#define REAL double
#define SFX(name) name##_f64
#define FR_FAST_ACT 0
#define FR_SQRT sqrt
#define FR_REAL_MAX DBL_MAX
#include "kernels.inc"
#undef REAL
#undef SFX
#undef FR_FAST_ACT
#undef FR_SQRT
#undef FR_REAL_MAX
