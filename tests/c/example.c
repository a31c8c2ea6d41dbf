/*
 * Using the generated kernels from C, without Python.
 *
 *   cc -std=c99 -O2 -I generated tests/c/example.c path/to/libderive_focal_*.so -lm -o example
 *   (or compile generated/focal_kernels.c into the program directly)
 *
 * Checks a few values that hold exactly by symmetry or by definition and exits non-zero
 * if one is off; prints one line per check.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "focal_kernels.h"

static int failures = 0;

static void check(const char *what, double got, double want, double tol)
{
    const double err = fabs(got - want) / (fabs(want) > 1e-300 ? fabs(want) : 1.0);
    const int ok = err <= tol && isfinite(got);
    printf("%-48s %+.17g  (want %+.17g) %s\n", what, got, want, ok ? "ok" : "FAIL");
    if (!ok) {
        failures++;
    }
}

int main(void)
{
    /* sigmoid cross-entropy at x = 0: loss log 2, gradient -1/2 for label 1 and +1/2 for 0 */
    const double x[4] = {0.0, 0.0, 40.0, -1e300};
    const double t[4] = {1.0, 0.0, 1.0, 1.0};
    double loss[4], grad[4];
    if (derive_sigmoid_ce_f64(4, x, t, loss, grad) != DERIVE_OK) {
        return 2;
    }
    check("sigmoid_ce loss(0, 1) = log 2", loss[0], log(2.0), 1e-15);
    check("sigmoid_ce grad(0, 1) = -1/2", grad[0], -0.5, 1e-15);
    check("sigmoid_ce grad(0, 0) = +1/2", grad[1], 0.5, 1e-15);
    check("sigmoid_ce loss(40, 1) = log1p(e^-40)", loss[2], log1p(exp(-40.0)), 1e-15);
    check("sigmoid_ce loss(-1e300, 1) = 1e300", loss[3], 1e300, 1e-15);

    /* focal loss, gamma = 2, x = 0: (1/2)^2 log 2; gradient -(1/4)(2 (1/2) log 2 + 1/2) */
    float xf[2] = {0.0f, 0.0f}, tf[2] = {1.0f, 0.0f}, lf[2], gf[2];
    if (derive_sigmoid_focal_f32(2, xf, tf, 2.0f, lf, gf) != DERIVE_OK) {
        return 2;
    }
    check("sigmoid_focal_f32 loss(0, 1; gamma 2)", lf[0], 0.25 * log(2.0), 2e-7);
    check("sigmoid_focal_f32 grad(0, 1; gamma 2)", gf[0], -0.25 * (log(2.0) + 0.5), 2e-7);
    check("sigmoid_focal_f32 grad(0, 0; gamma 2)", gf[1], 0.25 * (log(2.0) + 0.5), 2e-7);

    /* torchvision's alpha: alpha_t = alpha for label 1, 1 - alpha for label 0; alpha < 0: none */
    double la[2], ga[2];
    const double x0[2] = {0.0, 0.0}, t10[2] = {1.0, 0.0};
    derive_sigmoid_focal_alpha_f64(2, x0, t10, 0.25, 2.0, la, ga);
    check("sigmoid_focal_alpha loss(0, 1; 0.25, 2)", la[0], 0.25 * 0.25 * log(2.0), 1e-15);
    check("sigmoid_focal_alpha loss(0, 0; 0.25, 2)", la[1], 0.75 * 0.25 * log(2.0), 1e-15);
    derive_sigmoid_focal_alpha_f64(2, x0, t10, -1.0, 2.0, la, ga);
    check("sigmoid_focal_alpha loss(0, 1; off, 2)", la[0], 0.25 * log(2.0), 1e-15);

    /* softmax over equal logits: p = 1/K; CE = log K; grad = 1/K - [k == t] */
    enum { N = 3, K = 4 };
    double xs[N * K];
    int64_t tgt[N] = {2, -100, 0};
    double ls[N], gs[N * K];
    memset(xs, 0, sizeof xs);
    if (derive_softmax_ce_f64(N, K, xs, tgt, -100, ls, gs) != DERIVE_OK) {
        return 2;
    }
    check("softmax_ce loss(equal logits, K = 4) = log 4", ls[0], log(4.0), 1e-15);
    check("softmax_ce grad[t] = 1/4 - 1", gs[2], -0.75, 1e-15);
    check("softmax_ce grad[j] = 1/4", gs[0], 0.25, 1e-15);
    check("softmax_ce ignored row: loss 0", ls[1], 0.0, 0.0);
    check("softmax_ce ignored row: grad 0", gs[K + 1], 0.0, 0.0);

    /* softmax focal with per-class alpha: loss = alpha_t (3/4)^gamma log 4 */
    const double alpha[K] = {0.1, 0.2, 0.3, 0.4};
    derive_softmax_focal_f64(N, K, xs, tgt, alpha, 0.0, 2.0, -100, ls, gs);
    check("softmax_focal loss(equal, alpha_t 0.3, gamma 2)", ls[0], 0.3 * 0.5625 * log(4.0), 1e-15);

    /* invalid arguments are refused, not computed */
    if (derive_sigmoid_focal_f64(4, x, t, -1.0, loss, grad) != DERIVE_EINVAL) {
        printf("gamma < 0 was accepted: FAIL\n");
        failures++;
    }
    tgt[0] = 7;
    if (derive_softmax_ce_f64(N, K, xs, tgt, -100, ls, gs) != DERIVE_EINVAL) {
        printf("target 7 with K = 4 was accepted: FAIL\n");
        failures++;
    }
    printf("%s (source %s)\n", failures ? "FAILED" : "all checks passed", derive_focal_kernels_source());
    return failures ? 1 : 0;
}
