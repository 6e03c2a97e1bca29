/* The C ABI from C: every operation on odd shapes in both layouts, compared with values the Rust
 * API computed on the same data (written by the Rust test that compiles and runs this program,
 * capi/tests/c_api.rs, into the file given as argv[1]), plus the error paths, and one f16 case
 * computed by hand. Exits 0 when every check passes; prints the first failure otherwise. */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batchnorm.h"

static int failures = 0;

#define CHECK(cond, ...)                                                                         \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                 \
            fprintf(stderr, __VA_ARGS__);                                                        \
            fprintf(stderr, " (last error: %s)\n", bn_last_error_message());                    \
            failures++;                                                                          \
        }                                                                                        \
    } while (0)

/* The same data as the Rust side, exact in binary: ((37·i + 11·seed) mod 101)/16 − 3. */
static void fill(float *v, size_t n, size_t seed) {
    for (size_t i = 0; i < n; i++) {
        v[i] = (float)((double)((37 * i + 11 * seed) % 101) / 16.0 - 3.0);
    }
}

static BnTensor in(const float *p, size_t n) {
    BnTensor t = {p, n};
    return t;
}

static BnTensorMut out(float *p, size_t n) {
    BnTensorMut t = {p, n};
    return t;
}

/* Reads `n` floats written by the Rust side as text, one per line, after a line `name`. */
static int read_expected(FILE *f, const char *name, float *dst, size_t n) {
    char line[256];
    rewind(f);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (strcmp(line, name) == 0) {
            for (size_t i = 0; i < n; i++) {
                if (!fgets(line, sizeof line, f)) {
                    return 0;
                }
                dst[i] = strtof(line, NULL);
            }
            return 1;
        }
    }
    return 0;
}

/* Bitwise equality (the C and Rust paths run the same kernels on the same data). */
static int same(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* Half data, by hand, as IEEE binary16 bits (the same case is in capi/tests/abi_half.rs).
 * N = 1, C = 2, HW = 2, NCHW, eps = 0.
 * Channel 0: mean 0.5, var 0.25, gamma 1, beta 0.25, so y = (x - 0.5)/0.5 + 0.25 = 2x - 0.75:
 *   1.0 (0x3C00) -> 1.25 (0x3D00);  -1.5 (0xBE00) -> -3.75 (0xC380).
 * Channel 1: mean 0, var 1, gamma 3, beta 0, so y = 3x:
 *   1 + 2^-10 (0x3C01) -> 3 + 3*2^-10, exactly halfway between the f16 values 3 + 2*2^-10
 *   (0x4201) and 3 + 4*2^-10 (0x4202): rounded to the even mantissa, 0x4202;
 *   0.5 (0x3800) -> 1.5 (0x3E00).
 * A half tensor goes through BnTensor's float pointer with a cast; its length counts halves. */
static void half_case(void) {
    const uint16_t x[4] = {0x3C00, 0xBE00, 0x3C01, 0x3800};
    const uint16_t want[4] = {0x3D00, 0xC380, 0x4202, 0x3E00};
    uint16_t y[4] = {0x7E00, 0x7E00, 0x7E00, 0x7E00}; /* NaN: every element must be written */
    uint16_t buf[4];
    float gamma[2] = {1.0f, 3.0f}, beta[2] = {0.25f, 0.0f};
    float mean[2] = {0.5f, 0.0f}, var[2] = {0.25f, 1.0f};
    BnAffine affine = {in(gamma, 2), in(beta, 2)};
    BnRunning running = {in(mean, 2), in(var, 2)};
    BnDesc desc = {1, 2, 2, BN_LAYOUT_NCHW, 0.0, 0, BN_DTYPE_F16};
    BnOp *op = NULL;
    CHECK(bn_create(&desc, &op) == BN_STATUS_OK && op != NULL, "create f16");
    BnTensor xt = {(const float *)x, 4};
    CHECK(bn_inference(op, xt, out((float *)y, 4), &affine, &running, NULL) == BN_STATUS_OK,
          "f16 inference");
    for (int i = 0; i < 4; i++) {
        CHECK(y[i] == want[i], "f16 y[%d] = 0x%04X, want 0x%04X", i, (unsigned)y[i],
              (unsigned)want[i]);
    }
    memcpy(buf, x, sizeof buf);
    CHECK(bn_inference_in_place(op, out((float *)buf, 4), &affine, &running, NULL) ==
                  BN_STATUS_OK &&
              memcmp(buf, want, sizeof buf) == 0,
          "f16 inference in place");
    /* 2, the number of floats in the 8 bytes of x, is a length error: lengths count elements. */
    CHECK(bn_inference(op, in((const float *)x, 2), out((float *)y, 4), &affine, &running, NULL) ==
              BN_STATUS_LENGTH_MISMATCH,
          "f16 length in elements");
    bn_destroy(op);

    /* A zero-initialised descriptor is float data; the same case in f32 is exact. */
    BnDesc zero = {0};
    zero.n = 1;
    zero.c = 2;
    zero.hw = 2;
    const float xf[4] = {1.0f, -1.5f, 1.0009765625f, 0.5f};
    const float wantf[4] = {1.25f, -3.75f, 3.0029296875f, 1.5f};
    float yf[4];
    CHECK(bn_create(&zero, &op) == BN_STATUS_OK && op != NULL, "create zero-initialised");
    CHECK(bn_inference(op, in(xf, 4), out(yf, 4), &affine, &running, NULL) == BN_STATUS_OK &&
              same(yf, wantf, 4),
          "zero-initialised descriptor: f32 inference");
    bn_destroy(op);

    /* 4 names no data type (3 is BN_DTYPE_F64). */
    BnDesc unknown = {1, 2, 2, BN_LAYOUT_NCHW, 0.0, 0, 4};
    op = NULL;
    CHECK(bn_create(&unknown, &op) == BN_STATUS_INVALID_ARGUMENT && op == NULL, "dtype 4");
    CHECK(strstr(bn_last_error_message(), "`dtype`") != NULL, "message names dtype");
}

static void run_case(FILE *expected, size_t n, size_t c, size_t hw, uint32_t layout) {
    size_t len = n * c * hw;
    char name[64];
    float *x = malloc(len * sizeof(float)), *y = malloc(len * sizeof(float));
    float *z = malloc(len * sizeof(float)), *dy = malloc(len * sizeof(float));
    float *dx = malloc(len * sizeof(float)), *want = malloc(len * sizeof(float));
    float *gamma = malloc(c * sizeof(float)), *beta = malloc(c * sizeof(float));
    float *rmean = malloc(c * sizeof(float)), *rvar = malloc(c * sizeof(float));
    float *smean = malloc(c * sizeof(float)), *sinv = malloc(c * sizeof(float));
    float *dgamma = malloc(c * sizeof(float)), *dbeta = malloc(c * sizeof(float));
    float *wantc = malloc(c * sizeof(float));
    fill(x, len, 1);
    fill(z, len, 2);
    fill(dy, len, 3);
    fill(gamma, c, 4);
    fill(beta, c, 5);
    for (size_t i = 0; i < c; i++) {
        rmean[i] = 0.25f * (float)i;
        rvar[i] = 1.0f + 0.5f * (float)i;
    }
    for (size_t threads = 0; threads <= 2; threads += 2) {
        BnDesc desc = {n, c, hw, layout, 1e-5, threads, BN_DTYPE_F32};
        BnOp *op = NULL;
        CHECK(bn_create(&desc, &op) == BN_STATUS_OK && op != NULL, "create");
        /* With its own pool, the operator also stores its outputs past the caches: the same
           expected bits. */
        if (threads != 0) {
            CHECK(bn_set_residency(op, BN_RESIDENCY_MEMORY) == BN_STATUS_OK, "residency memory");
        }
        BnAffine affine = {in(gamma, c), in(beta, c)};
        BnRunning running = {in(rmean, c), in(rvar, c)};
        const char *lay = layout == BN_LAYOUT_NCHW ? "nchw" : "nhwc";

        /* Inference, plain and fused with add + ReLU, out of place and in place. */
        CHECK(bn_inference(op, in(x, len), out(y, len), &affine, &running, NULL) == BN_STATUS_OK,
              "inference");
        snprintf(name, sizeof name, "%s %zux%zux%zu inference", lay, n, c, hw);
        CHECK(read_expected(expected, name, want, len) && same(y, want, len), "%s", name);
        BnEpilogue epi = {BN_EPILOGUE_ADD_RELU, in(z, len)};
        CHECK(bn_inference(op, in(x, len), out(y, len), &affine, &running, &epi) == BN_STATUS_OK,
              "inference add relu");
        snprintf(name, sizeof name, "%s %zux%zux%zu inference_add_relu", lay, n, c, hw);
        CHECK(read_expected(expected, name, want, len) && same(y, want, len), "%s", name);
        memcpy(dx, x, len * sizeof(float));
        CHECK(bn_inference_in_place(op, out(dx, len), &affine, &running, &epi) == BN_STATUS_OK &&
                  same(dx, y, len),
              "inference in place");

        /* Training with the saved statistics and PyTorch's running update. */
        float rm[64], rv[64];
        memcpy(rm, rmean, c * sizeof(float));
        memcpy(rv, rvar, c * sizeof(float));
        BnSavedMut saved = {out(smean, c), out(sinv, c)};
        BnUpdate update = {out(rm, c), out(rv, c), BN_CONVENTION_PYTORCH, 0, 0.0, 0, 0};
        CHECK(bn_training(op, in(x, len), out(y, len), &affine, &saved, &update, NULL) ==
                  BN_STATUS_OK,
              "training");
        snprintf(name, sizeof name, "%s %zux%zux%zu training", lay, n, c, hw);
        CHECK(read_expected(expected, name, want, len) && same(y, want, len), "%s", name);
        snprintf(name, sizeof name, "%s %zux%zux%zu running_var", lay, n, c, hw);
        CHECK(read_expected(expected, name, wantc, c) && same(rv, wantc, c), "%s", name);

        /* Backward with the saved statistics, dγ and dβ overwritten. */
        BnBackwardStats stats = {BN_BACKWARD_TRAINING, in(smean, c), in(sinv, c)};
        BnGrads grads = {out(dgamma, c), out(dbeta, c), 0};
        CHECK(bn_backward(op, in(x, len), in(dy, len), out(dx, len), &affine, &stats, &grads,
                          NULL) == BN_STATUS_OK,
              "backward");
        snprintf(name, sizeof name, "%s %zux%zux%zu dx", lay, n, c, hw);
        CHECK(read_expected(expected, name, want, len) && same(dx, want, len), "%s", name);
        snprintf(name, sizeof name, "%s %zux%zux%zu dgamma", lay, n, c, hw);
        CHECK(read_expected(expected, name, wantc, c) && same(dgamma, wantc, c), "%s", name);

        /* Backward of add + ReLU, the mask from the forward's output y (here z as a stand-in). */
        BnBackwardEpilogue bepi = {BN_EPILOGUE_ADD_RELU, in(z, len), out(y, len)};
        CHECK(bn_backward(op, in(x, len), in(dy, len), out(dx, len), &affine, &stats, NULL,
                          &bepi) == BN_STATUS_OK,
              "backward add relu");
        snprintf(name, sizeof name, "%s %zux%zux%zu dx_add_relu", lay, n, c, hw);
        CHECK(read_expected(expected, name, want, len) && same(dx, want, len), "%s", name);
        for (size_t i = 0; i < len; i++) {
            CHECK(y[i] == (z[i] > 0.0f ? dy[i] : 0.0f), "dz[%zu]", i);
        }

        /* Statistics. */
        uint64_t count[64];
        double mean[64], m2[64];
        BnStatsOut so = {count, mean, m2, c};
        CHECK(bn_statistics(op, in(x, len), &so) == BN_STATUS_OK && count[0] == n * hw,
              "statistics");

        /* Errors: a wrong length, a null pointer, overlapping buffers; nothing written. */
        for (size_t i = 0; i < len; i++) {
            y[i] = 7.0f;
        }
        CHECK(bn_inference(op, in(x, len - 1), out(y, len), &affine, &running, NULL) ==
                  BN_STATUS_LENGTH_MISMATCH,
              "short x");
        CHECK(strstr(bn_last_error_message(), "`x`") != NULL, "message names x");
        CHECK(bn_inference(op, in(NULL, len), out(y, len), &affine, &running, NULL) ==
                  BN_STATUS_NULL_POINTER,
              "null x");
        CHECK(bn_inference(op, in(y, len), out(y, len), &affine, &running, NULL) ==
                  BN_STATUS_INVALID_ARGUMENT,
              "x overlaps y");
        BnEpilogue bad = {99, in(NULL, 0)};
        CHECK(bn_inference(op, in(x, len), out(y, len), &affine, &running, &bad) ==
                  BN_STATUS_INVALID_ARGUMENT,
              "unknown epilogue");
        BnUpdate bad_update = {out(rm, c), out(rv, c), BN_CONVENTION_CUSTOM,
                               BN_MOMENTUM_NEW_WEIGHT, 1.5, 0, 1};
        CHECK(bn_training(op, in(x, len), out(y, len), NULL, NULL, &bad_update, NULL) ==
                  BN_STATUS_INVALID_MOMENTUM,
              "momentum 1.5");
        int untouched = 1;
        for (size_t i = 0; i < len; i++) {
            untouched &= y[i] == 7.0f;
        }
        CHECK(untouched, "nothing written on error");
        bn_destroy(op);
    }
    free(x), free(y), free(z), free(dy), free(dx), free(want), free(gamma), free(beta);
    free(rmean), free(rvar), free(smean), free(sinv), free(dgamma), free(dbeta), free(wantc);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s EXPECTED_FILE\n", argv[0]);
        return 2;
    }
    FILE *expected = fopen(argv[1], "r");
    if (!expected) {
        perror(argv[1]);
        return 2;
    }
    const size_t shapes[][3] = {{3, 5, 7}, {2, 17, 1}, {1, 3, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        run_case(expected, shapes[s][0], shapes[s][1], shapes[s][2], BN_LAYOUT_NCHW);
        run_case(expected, shapes[s][0], shapes[s][1], shapes[s][2], BN_LAYOUT_NHWC);
    }
    half_case();
    /* A bad descriptor: unknown layout, zero channel count, null output. */
    BnDesc bad = {2, 3, 4, 7, 1e-5, 0, BN_DTYPE_F32};
    BnOp *op = NULL;
    CHECK(bn_create(&bad, &op) == BN_STATUS_INVALID_ARGUMENT && op == NULL, "unknown layout");
    BnDesc zero = {2, 0, 4, BN_LAYOUT_NCHW, 1e-5, 0, BN_DTYPE_F32};
    CHECK(bn_create(&zero, &op) == BN_STATUS_ZERO_DIMENSION, "zero channels");
    CHECK(bn_create(&zero, NULL) == BN_STATUS_NULL_POINTER, "null out");
    BnDesc nan_eps = {2, 3, 4, BN_LAYOUT_NCHW, NAN, 0, BN_DTYPE_F32};
    CHECK(bn_create(&nan_eps, &op) == BN_STATUS_INVALID_EPSILON, "NaN eps");
    CHECK(bn_set_residency(NULL, BN_RESIDENCY_CACHE) == BN_STATUS_NULL_POINTER, "residency null");
    BnDesc ok = {2, 3, 4, BN_LAYOUT_NCHW, 1e-5, 0, BN_DTYPE_F32};
    CHECK(bn_create(&ok, &op) == BN_STATUS_OK, "create for residency");
    CHECK(bn_set_residency(op, 3) == BN_STATUS_INVALID_ARGUMENT, "unknown residency");
    bn_destroy(op);
    bn_destroy(NULL);
    fclose(expected);
    if (failures == 0) {
        printf("C API: all checks passed\n");
    }
    return failures == 0 ? 0 : 1;
}
