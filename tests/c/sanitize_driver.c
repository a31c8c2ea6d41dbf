/*
 * Calls every kernel of focal_kernels.h with edge inputs, for AddressSanitizer and
 * UndefinedBehaviorSanitizer (tests/test_sanitizers.py builds it with
 * -fsanitize=address,undefined -fno-sanitize-recover=all).
 *
 * Every array is malloc'ed with its exact size, so a read or write past an end is caught.
 * Sizes cover 0, 1 and odd lengths (vector loop tails); values cover 0, +-1, +-30, +-1e4,
 * the largest finite values, infinities, NaN and subnormals; labels 0/1; gamma from 0 to 5;
 * softmax with k = 1, 2, 3, 80, ignored rows and invalid targets (which must be refused
 * without writing).  Checks: finite output for finite input, NaN confined to its own
 * element (sigmoid) or row (softmax).  Also: derive_focal_kernels_first_bad_label around the block size
 * and DERIVE_ELABEL from every elementwise kernel for the same bad labels,
 * the thread-count calls, and calls above DERIVE_PARALLEL_MIN with 2 threads, which must give
 * the bytes of the serial call.  Prints "sanitize driver: N calls, 0 problems".
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "focal_kernels.h"

static long calls = 0;
static long problems = 0;

static void problem(const char *what, size_t i)
{
    if (problems < 20) {
        fprintf(stderr, "problem: %s at %zu\n", what, i);
    }
    problems++;
}

static const double VALUES[] = {0.0, 1.0, -1.0, 0.5, -0.5, 17.0, -17.0, 30.0, -30.0, 88.0, -88.0, 710.0, -710.0,
                                1e4, -1e4, 1e-40, -1e-40, 1e-310, -1e-310, DBL_MAX, -DBL_MAX, FLT_MAX, -FLT_MAX};
#define NVALUES (sizeof(VALUES) / sizeof(VALUES[0]))
static const double GAMMAS[] = {0.0, 0.25, 0.5, 1.0, 2.0, 5.0};
#define NGAMMAS (sizeof(GAMMAS) / sizeof(GAMMAS[0]))
static const size_t SIZES[] = {0, 1, 2, 3, 7, 8, 9, 15, 17, 33, 64, 100};
#define NSIZES (sizeof(SIZES) / sizeof(SIZES[0]))

/* Elementwise kernels, one macro for both precisions: T is the type, S the suffix. */
#define ELEMENTWISE(T, S, BIG)                                                                  \
    static void elementwise_##S(void)                                                          \
    {                                                                                          \
        for (size_t si = 0; si < NSIZES; si++) {                                               \
            const size_t n = SIZES[si];                                                        \
            T *x = malloc((n ? n : 1) * sizeof(T)), *t = malloc((n ? n : 1) * sizeof(T));      \
            T *loss = malloc((n ? n : 1) * sizeof(T)), *grad = malloc((n ? n : 1) * sizeof(T)); \
            for (int pass = 0; pass < 2; pass++) {                                             \
                for (size_t i = 0; i < n; i++) {                                               \
                    double v = VALUES[(i * 7 + si + pass) % NVALUES];                          \
                    if (fabs(v) > BIG) {                                                       \
                        v = v > 0 ? BIG : -BIG;                                                \
                    }                                                                          \
                    x[i] = (T)v;                                                               \
                    t[i] = (T)((i + pass) % 2);                                                \
                }                                                                              \
                const size_t nan_at = n / 2;                                                   \
                if (pass == 1 && n > 2) {                                                      \
                    x[nan_at] = (T)NAN;                                                        \
                }                                                                              \
                for (size_t gi = 0; gi < NGAMMAS; gi++) {                                      \
                    const T g = (T)GAMMAS[gi];                                                 \
                    for (int k = 0; k < 4; k++) {                                              \
                        int rc;                                                                \
                        if (k == 0) {                                                          \
                            rc = derive_sigmoid_ce_##S(n, x, t, loss, grad);                   \
                        } else if (k == 1) {                                                   \
                            rc = derive_sigmoid_focal_##S(n, x, t, g, loss, grad);             \
                        } else if (k == 2) {                                                   \
                            rc = derive_sigmoid_focal_alpha_##S(n, x, t, (T)(gi % 2 ? 0.25 : -1.0), g, loss, grad); \
                        } else {                                                               \
                            if (g == 0) {                                                      \
                                continue;                                                      \
                            }                                                                  \
                            rc = derive_focal_star_##S(n, x, t, g, (T)(gi % 3) - 1, loss, grad); \
                        }                                                                      \
                        calls++;                                                               \
                        if (rc != DERIVE_OK) {                                                 \
                            problem(#S " elementwise kernel refused valid input", (size_t)k);  \
                            continue;                                                          \
                        }                                                                      \
                        for (size_t i = 0; i < n; i++) {                                       \
                            const int is_nan = pass == 1 && n > 2 && i == nan_at;              \
                            if (!is_nan && (!isfinite(loss[i]) || !isfinite(grad[i]))) {       \
                                problem(#S " non-finite output for finite input", i);          \
                            }                                                                  \
                            if (is_nan && (!isnan(loss[i]) || !isnan(grad[i]))) {              \
                                problem(#S " NaN input did not give NaN", i);                  \
                            }                                                                  \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
                /* outputs may be NULL */                                                      \
                calls += 2;                                                                    \
                if (derive_sigmoid_focal_##S(n, x, t, 2, NULL, grad) != DERIVE_OK ||           \
                    derive_sigmoid_focal_##S(n, x, t, 2, loss, NULL) != DERIVE_OK) {           \
                    problem(#S " NULL output refused", n);                                     \
                }                                                                              \
            }                                                                                  \
            /* invalid gamma must be refused */                                                \
            calls++;                                                                           \
            if (derive_sigmoid_focal_##S(n, x, t, (T)-1, loss, grad) != DERIVE_EINVAL) {       \
                problem(#S " gamma < 0 accepted", n);                                          \
            }                                                                                  \
            free(x);                                                                           \
            free(t);                                                                           \
            free(loss);                                                                        \
            free(grad);                                                                        \
        }                                                                                      \
    }

#define SOFTMAX(T, S, BIG)                                                                     \
    static void softmax_##S(void)                                                              \
    {                                                                                          \
        static const size_t KS[] = {1, 2, 3, 80};                                              \
        static const size_t NS[] = {0, 1, 3, 5};                                               \
        for (size_t ki = 0; ki < 4; ki++) {                                                    \
            for (size_t ni = 0; ni < 4; ni++) {                                                \
                const size_t k = KS[ki], n = NS[ni];                                           \
                T *x = malloc((n * k > 0 ? n * k : 1) * sizeof(T));                                \
                T *grad = malloc((n * k > 0 ? n * k : 1) * sizeof(T));                             \
                T *loss = malloc((n ? n : 1) * sizeof(T));                                     \
                T *avec = malloc(k * sizeof(T));                                               \
                int64_t *target = malloc((n ? n : 1) * sizeof(int64_t));                       \
                for (size_t c = 0; c < k; c++) {                                               \
                    avec[c] = (T)(0.1 + 0.8 * (double)c / (double)k);                          \
                }                                                                              \
                for (int pass = 0; pass < 3; pass++) {                                         \
                    for (size_t i = 0; i < n * k; i++) {                                       \
                        double v = VALUES[(i * 5 + ki + pass) % NVALUES];                      \
                        if (fabs(v) > BIG) {                                                   \
                            v = v > 0 ? BIG : -BIG;                                            \
                        }                                                                      \
                        x[i] = (T)v;                                                           \
                    }                                                                          \
                    for (size_t r = 0; r < n; r++) {                                           \
                        target[r] = (int64_t)((r * 3 + (size_t)pass) % k);                     \
                    }                                                                          \
                    if (n > 1) {                                                               \
                        target[n - 1] = -100; /* ignored row */                                \
                    }                                                                          \
                    const size_t nan_row = 0;                                                  \
                    if (pass == 2 && n > 2) {                                                  \
                        x[nan_row * k] = (T)NAN;                                               \
                    }                                                                          \
                    for (size_t gi = 0; gi < NGAMMAS; gi++) {                                  \
                        for (int which = 0; which < 3; which++) {                              \
                            int rc;                                                            \
                            if (which == 0) {                                                  \
                                rc = derive_softmax_ce_##S(n, k, x, target, -100, loss, grad); \
                            } else {                                                           \
                                rc = derive_softmax_focal_##S(n, k, x, target, which == 1 ? avec : NULL, \
                                                              (T)0.25, (T)GAMMAS[gi], -100, loss, grad); \
                            }                                                                  \
                            calls++;                                                           \
                            if (rc != DERIVE_OK) {                                             \
                                problem(#S " softmax refused valid input", k);                 \
                                continue;                                                      \
                            }                                                                  \
                            for (size_t r = 0; r < n; r++) {                                   \
                                const int nan_here = pass == 2 && n > 2 && r == nan_row;       \
                                if (!nan_here && !isfinite(loss[r])) {                         \
                                    problem(#S " softmax non-finite loss", r);                 \
                                }                                                              \
                                if (target[r] == -100 && loss[r] != 0) {                       \
                                    problem(#S " ignored row has a loss", r);                  \
                                }                                                              \
                                for (size_t c = 0; c < k; c++) {                               \
                                    const T g = grad[r * k + c];                               \
                                    if (!nan_here && !isfinite(g)) {                           \
                                        problem(#S " softmax non-finite gradient", r);         \
                                    }                                                          \
                                    if (target[r] == -100 && g != 0) {                         \
                                        problem(#S " ignored row has a gradient", r);          \
                                    }                                                          \
                                }                                                              \
                            }                                                                  \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
                /* a target outside [0, k) that is not the ignore label is refused, nothing written */ \
                if (n > 0) {                                                                   \
                    target[0] = (int64_t)k;                                                    \
                    memset(loss, 0x7f, (n ? n : 1) * sizeof(T));                               \
                    const T before = loss[0];                                                  \
                    calls++;                                                                   \
                    if (derive_softmax_focal_##S(n, k, x, target, NULL, (T)0.25, 2, -100, loss, grad) \
                        != DERIVE_EINVAL) {                                                    \
                        problem(#S " out-of-range target accepted", k);                        \
                    }                                                                          \
                    if (memcmp(&before, &loss[0], sizeof(T)) != 0) {                           \
                        problem(#S " refused call wrote its output", k);                       \
                    }                                                                          \
                }                                                                              \
                free(x);                                                                       \
                free(grad);                                                                    \
                free(loss);                                                                    \
                free(avec);                                                                    \
                free(target);                                                                  \
            }                                                                                  \
        }                                                                                      \
    }

ELEMENTWISE(float, f32, FLT_MAX)
ELEMENTWISE(double, f64, DBL_MAX)
SOFTMAX(float, f32, FLT_MAX)
SOFTMAX(double, f64, DBL_MAX)

/* derive_focal_kernels_first_bad_label on sizes around the block size, a bad label (2, -1, 0.5, NaN) at
 * the first, a middle or the last position, or none; every elementwise kernel returns
 * DERIVE_ELABEL for the same arrays (and DERIVE_OK without the bad label) */
#define LABELS(T, S)                                                                           \
    static void labels_kernels_##S(size_t n, const T *x, const T *t, T *l, T *g, int want)    \
    {                                                                                          \
        calls += 4;                                                                            \
        if (derive_sigmoid_ce_##S(n, x, t, l, g) != want ||                                    \
            derive_sigmoid_focal_##S(n, x, t, (T)0.5, l, g) != want ||                         \
            derive_sigmoid_focal_alpha_##S(n, x, t, (T)0.25, (T)2, l, g) != want ||            \
            derive_focal_star_##S(n, x, t, (T)2, (T)1, l, g) != want) {                        \
            problem(want == DERIVE_OK ? "kernel refused good labels" : "kernel missed a bad label", n); \
        }                                                                                      \
    }                                                                                          \
    static void labels_##S(void)                                                               \
    {                                                                                          \
        static const size_t sizes[] = {0, 1, 2, 1023, 1024, 1025, 3001};                       \
        const T bad[] = {(T)2, (T)-1, (T)0.5, (T)NAN};                                         \
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {                     \
            const size_t n = sizes[si];                                                        \
            T *t = malloc((n ? n : 1) * sizeof(T));                                            \
            T *x = malloc((n ? n : 1) * sizeof(T));                                            \
            T *l = malloc((n ? n : 1) * sizeof(T));                                            \
            T *g = malloc((n ? n : 1) * sizeof(T));                                            \
            for (size_t i = 0; i < n; i++) {                                                   \
                t[i] = (T)(i % 3 == 0);                                                        \
                x[i] = (T)((double)(i % 7) - 3.0);                                             \
            }                                                                                  \
            labels_kernels_##S(n, x, t, l, g, DERIVE_OK);                                      \
            calls++;                                                                           \
            if (derive_focal_kernels_first_bad_label_##S(n, t) != n) {                                       \
                problem("first_bad_label: a good array reported bad", n);                      \
            }                                                                                  \
            const size_t where[] = {0, n / 2, n ? n - 1 : 0};                                   \
            for (size_t w = 0; n && w < 3; w++) {                                              \
                for (size_t b = 0; b < 4; b++) {                                               \
                    const T keep = t[where[w]];                                                \
                    t[where[w]] = bad[b];                                                      \
                    calls++;                                                                   \
                    if (derive_focal_kernels_first_bad_label_##S(n, t) != where[w]) {                        \
                        problem("first_bad_label: wrong index", where[w]);                     \
                    }                                                                          \
                    labels_kernels_##S(n, x, t, l, g, DERIVE_ELABEL);                          \
                    t[where[w]] = keep;                                                        \
                }                                                                              \
            }                                                                                  \
            free(t);                                                                           \
            free(x);                                                                           \
            free(l);                                                                           \
            free(g);                                                                           \
        }                                                                                      \
    }

/* calls above DERIVE_PARALLEL_MIN with 2 threads: the same bytes as 1 thread, a NaN still
 * confined to its element / row, every array exactly sized */
#define THREADED(T, S)                                                                         \
    static void threaded_##S(void)                                                             \
    {                                                                                          \
        const size_t n = DERIVE_PARALLEL_MIN + 37;                                             \
        T *x = malloc(n * sizeof(T)), *t = malloc(n * sizeof(T));                              \
        T *l1 = malloc(n * sizeof(T)), *g1 = malloc(n * sizeof(T));                            \
        T *l2 = malloc(n * sizeof(T)), *g2 = malloc(n * sizeof(T));                            \
        for (size_t i = 0; i < n; i++) {                                                       \
            x[i] = (T)(((double)(i % 2001) - 1000.0) / 25.0);                                  \
            t[i] = (T)(i % 5 == 0);                                                            \
        }                                                                                      \
        x[n - 5] = (T)NAN;                                                                     \
        for (size_t gi = 0; gi < NGAMMAS; gi++) {                                              \
            derive_focal_kernels_set_num_threads(1);                                                         \
            int rc = derive_sigmoid_focal_##S(n, x, t, (T)GAMMAS[gi], l1, g1);                  \
            derive_focal_kernels_set_num_threads(2);                                                         \
            rc |= derive_sigmoid_focal_##S(n, x, t, (T)GAMMAS[gi], l2, g2);                     \
            calls += 2;                                                                        \
            if (rc != DERIVE_OK || memcmp(l1, l2, n * sizeof(T)) || memcmp(g1, g2, n * sizeof(T))) { \
                problem("threaded sigmoid differs from serial", gi);                          \
            }                                                                                  \
            for (size_t i = 0; i < n; i++) {                                                   \
                if ((i == n - 5) != (isnan(l2[i]) || isnan(g2[i]))) {                          \
                    problem("threaded sigmoid: NaN not confined", i);                          \
                    break;                                                                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        /* a bad label in the last block, seen by whichever thread computes it */            \
        t[n - 3] = (T)2;                                                                       \
        derive_focal_kernels_set_num_threads(2);                                                             \
        calls++;                                                                               \
        if (derive_sigmoid_focal_##S(n, x, t, (T)0.5, l2, g2) != DERIVE_ELABEL) {              \
            problem("threaded sigmoid missed a bad label", n - 3);                             \
        }                                                                                      \
        t[n - 3] = (T)1;                                                                       \
        /* softmax: n rows of k = 41 classes (not a multiple of the lanes), n*k >= the threshold */ \
        const size_t k = 41, rows = DERIVE_PARALLEL_MIN / 41 + 3;                              \
        T *xs = malloc(rows * k * sizeof(T)), *gs1 = malloc(rows * k * sizeof(T));             \
        T *gs2 = malloc(rows * k * sizeof(T)), *ls1 = malloc(rows * sizeof(T));                \
        T *ls2 = malloc(rows * sizeof(T));                                                     \
        int64_t *target = malloc(rows * sizeof(int64_t));                                      \
        for (size_t i = 0; i < rows * k; i++) {                                                \
            xs[i] = (T)(((double)(i % 997) - 498.0) / 7.0);                                    \
        }                                                                                      \
        for (size_t r = 0; r < rows; r++) {                                                    \
            target[r] = r % 11 == 0 ? -100 : (int64_t)(r % k);                                 \
        }                                                                                      \
        xs[7 * k + 3] = (T)NAN;                                                                \
        derive_focal_kernels_set_num_threads(1);                                                             \
        int rc = derive_softmax_focal_##S(rows, k, xs, target, NULL, (T)0.25, (T)0.5, -100, ls1, gs1); \
        derive_focal_kernels_set_num_threads(2);                                                             \
        rc |= derive_softmax_focal_##S(rows, k, xs, target, NULL, (T)0.25, (T)0.5, -100, ls2, gs2); \
        calls += 2;                                                                            \
        if (rc != DERIVE_OK || memcmp(ls1, ls2, rows * sizeof(T)) || memcmp(gs1, gs2, rows * k * sizeof(T))) { \
            problem("threaded softmax differs from serial", rows);                            \
        }                                                                                      \
        for (size_t r = 0; r < rows; r++) {                                                    \
            if ((r == 7) != (isnan(ls2[r]) != 0)) {                                            \
                problem("threaded softmax: NaN not confined to its row", r);                   \
                break;                                                                         \
            }                                                                                  \
        }                                                                                      \
        derive_focal_kernels_set_num_threads(0);                                                             \
        free(x); free(t); free(l1); free(g1); free(l2); free(g2);                              \
        free(xs); free(gs1); free(gs2); free(ls1); free(ls2); free(target);                    \
    }

LABELS(float, f32)
LABELS(double, f64)
THREADED(float, f32)
THREADED(double, f64)

int main(void)
{
    const int vm = derive_focal_kernels_vector_math();
    if (vm != 0 && vm != 1) {
        problem("derive_focal_kernels_vector_math is neither 0 nor 1", (size_t)vm);
    }
    derive_focal_kernels_set_num_threads(3);
    if (derive_focal_kernels_set_num_threads(0) != 3) {
        problem("derive_focal_kernels_set_num_threads does not return the previous request", 3);
    }
    if (derive_focal_kernels_get_num_threads() < 1) {
        problem("derive_focal_kernels_get_num_threads below 1", 0);
    }
    elementwise_f32();
    elementwise_f64();
    softmax_f32();
    softmax_f64();
    labels_f32();
    labels_f64();
    threaded_f32();
    threaded_f64();
    printf("sanitize driver: %ld calls, %ld problems\n", calls, problems);
    return problems ? 1 : 0;
}
