/* sfdiag's fused read of large grads on the CPU (see sfdiag/step_audit/fused.py): in one pass over each
 * row of `block` elements, the sum of the squares of its values, the wrapping sum of its
 * elements' bits, and the sampled elements that fall in it (of its param's too).
 *
 * Plain C with GCC/Clang vector extensions, no -ffast-math, no contraction into fused
 * multiply-adds (sfdiag/step_audit/fused.py compiles it with -ffp-contract=off): every sum runs in a
 * fixed order, so the same input gives the same bits on the same machine, however the rows
 * are grouped and split among threads (the rows' totals are added by the caller). Whole rows
 * are read four side by side: four streams of memory keep more reads in flight than one
 * (a read of 400 MB: 14.4-14.8 ms against 15.8-16.6, torch's own norm 14.6-16.0). The
 * squares are taken in float32 (exact for 16-bit types) and summed 16 to a lane before each
 * lane's sum goes into a double: within 1e-7 of a float64 sum (torch's own float32 norm of a
 * million elements is off by 1e-5 and more), where a loop in float64 costs ~10 % more.
 */
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef uint32_t v8u __attribute__((vector_size(32))); /* the bits of 8 elements: of 32 */
typedef uint16_t v8h __attribute__((vector_size(16))); /* ... or of 16 */

#define GROUP 4  /* whole rows read side by side: four streams of memory, ~12 % faster than one */
#define FLUSH 16 /* 8-element steps summed in float32 before their sums go into doubles */

/* the squares of 8 elements, in float32 */
static inline v8f squares_f32(const void *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v * v;
}
static inline double scalar_f32(const void *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return (double)v * (double)v;
}

static inline v8f squares_bf16(const void *p) { /* bfloat16 is a float32's top half */
    v8h h;
    memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    memcpy(&f, &u, sizeof f);
    return f * f;
}
static inline double scalar_bf16(const void *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return (double)f * (double)f;
}

#ifdef __FLT16_MAX__ /* a compiler with _Float16: float16 too */
typedef _Float16 v8f16 __attribute__((vector_size(16)));
static inline v8f squares_f16(const void *p) {
    v8f16 h;
    memcpy(&h, p, sizeof h);
    v8f f = __builtin_convertvector(h, v8f);
    return f * f;
}
static inline double scalar_f16(const void *p) {
    _Float16 h;
    memcpy(&h, p, sizeof h);
    return (double)h * (double)h;
}
#endif

/* The sum of squares (0 where not `want`) and the bit-sum of G rows of `len` elements, p[r]
 * their first elements, read side by side. Each row gets the same arithmetic whatever G:
 * 8 lanes, 16 steps of 8 elements summed in float32 before each lane's sum goes into a
 * double, then the lanes in a fixed order and the elements past the last whole step. */
#define DEFINE_ROWS(NAME, ELEM, BITS, VB, SQUARES, SCALAR, G)                                  \
    static inline void NAME(const ELEM *const *p, int64_t len, int want, double *squares,       \
                            BITS *sums) {                                                       \
        v8d acc[G];                                                                             \
        VB bits[G];                                                                             \
        for (int r = 0; r < G; r++) {                                                           \
            acc[r] = (v8d){0};                                                                  \
            bits[r] = (VB){0};                                                                  \
        }                                                                                       \
        int64_t j = 0;                                                                          \
        while (j + 8 <= len) {                                                                  \
            const int64_t stop = j + 8 * FLUSH < len ? j + 8 * FLUSH : len;                     \
            v8f f[G];                                                                           \
            for (int r = 0; r < G; r++) f[r] = (v8f){0};                                        \
            for (; j + 8 <= stop; j += 8)                                                       \
                for (int r = 0; r < G; r++) {                                                   \
                    VB b;                                                                       \
                    memcpy(&b, p[r] + j, sizeof b);                                             \
                    bits[r] += b;                                                               \
                    if (want) f[r] += SQUARES(p[r] + j);                                        \
                }                                                                               \
            for (int r = 0; r < G; r++) acc[r] += __builtin_convertvector(f[r], v8d);           \
        }                                                                                       \
        for (int r = 0; r < G; r++) {                                                           \
            v8d s = acc[r];                                                                     \
            double sq = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));      \
            BITS sum = 0;                                                                       \
            for (int k = 0; k < 8; k++) sum += bits[r][k];                                      \
            for (int64_t i = j; i < len; i++) {                                                 \
                BITS b;                                                                         \
                memcpy(&b, p[r] + i, sizeof b);                                                 \
                sum += b;                                                                       \
                sq += SCALAR(p[r] + i);                                                         \
            }                                                                                   \
            squares[r] = want ? sq : 0.0;                                                       \
            sums[r] = sum;                                                                      \
        }                                                                                       \
    }

/* Rows [first_row, last_row) of `count` contiguous tensors cut into rows of `block`
 * elements (a tensor's last row may be short), numbered across the tensors in order.
 * Writes each row's sum of squares (0 where want[t] is 0) and bit-sum, and the elements
 * t * sample_size + k (k < sample_size) at flat index k * (numel / sample_size) that fall
 * in these rows: of the tensor into samples, of params[t] (where not NULL: a tensor of the
 * same size and type) into param_samples. Every tensor holds at least sample_size
 * elements. Whole rows of one tensor are read GROUP at a time, the others one by one. */
#define DEFINE_READ(NAME, ELEM, BITS, ROWS_GROUP, ROWS_ONE)                                    \
    void NAME(int64_t count, const void *const *data, const int64_t *numel,                     \
              const uint8_t *want, int64_t block, int64_t sample_size, int64_t first_row,       \
              int64_t last_row, const void *const *params, double *row_squares,                 \
              BITS *row_sums, ELEM *samples, ELEM *param_samples) {                             \
        int64_t row = 0; /* the first row of tensor t */                                        \
        for (int64_t t = 0; t < count && row < last_row; t++) {                                 \
            const int64_t n = numel[t], rows = (n + block - 1) / block;                         \
            const int64_t stop = rows < last_row - row ? rows : last_row - row;                 \
            const ELEM *x = (const ELEM *)data[t];                                              \
            const ELEM *param = (const ELEM *)params[t];                                        \
            const int64_t stride = n / sample_size;                                             \
            int64_t r = first_row > row ? first_row - row : 0;                                  \
            while (r < stop) {                                                                  \
                const int group = r + GROUP <= stop && (r + GROUP) * block <= n ? GROUP : 1;    \
                const int64_t start = r * block;                                                \
                const int64_t end = start + group * block < n ? start + group * block : n;      \
                const int64_t first = (start + stride - 1) / stride; /* the 1st sample here */  \
                for (int64_t k = first; param && k < sample_size && k * stride < end; k++)      \
                    param_samples[t * sample_size + k] = param[k * stride];                     \
                if (group == GROUP) {                                                           \
                    const ELEM *p[GROUP];                                                       \
                    for (int g = 0; g < GROUP; g++) p[g] = x + start + g * block;               \
                    ROWS_GROUP(p, block, want[t], row_squares + row + r, row_sums + row + r);   \
                } else {                                                                        \
                    const ELEM *p[1] = {x + start};                                             \
                    ROWS_ONE(p, end - start, want[t], row_squares + row + r, row_sums + row + r); \
                }                                                                               \
                for (int64_t k = first; k < sample_size && k * stride < end; k++)               \
                    samples[t * sample_size + k] = x[k * stride];                               \
                r += group;                                                                     \
            }                                                                                   \
            row += rows;                                                                        \
        }                                                                                       \
    }

DEFINE_ROWS(rows4_f32, float, uint32_t, v8u, squares_f32, scalar_f32, GROUP)
DEFINE_ROWS(rows1_f32, float, uint32_t, v8u, squares_f32, scalar_f32, 1)
DEFINE_READ(sfdiag_read_f32, float, uint32_t, rows4_f32, rows1_f32)
DEFINE_ROWS(rows4_bf16, uint16_t, uint16_t, v8h, squares_bf16, scalar_bf16, GROUP)
DEFINE_ROWS(rows1_bf16, uint16_t, uint16_t, v8h, squares_bf16, scalar_bf16, 1)
DEFINE_READ(sfdiag_read_bf16, uint16_t, uint16_t, rows4_bf16, rows1_bf16)
#ifdef __FLT16_MAX__
DEFINE_ROWS(rows4_f16, uint16_t, uint16_t, v8h, squares_f16, scalar_f16, GROUP)
DEFINE_ROWS(rows1_f16, uint16_t, uint16_t, v8h, squares_f16, scalar_f16, 1)
DEFINE_READ(sfdiag_read_f16, uint16_t, uint16_t, rows4_f16, rows1_f16)
#endif

/* Each of `count` contiguous tensors' sum of squares into squares[t], a tensor read as one
 * row of its whole length (the arithmetic of a row above): the per-step norms of
 * `sfdiag run`, where torch's norm costs the host about a microsecond a tensor and this
 * costs nanoseconds for a small one. */
#define DEFINE_SQUARES(NAME, ELEM, BITS, ROWS_ONE)                                              \
    void NAME(int64_t count, const void *const *data, const int64_t *numel, double *squares) {  \
        for (int64_t t = 0; t < count; t++) {                                                   \
            const ELEM *p[1] = {(const ELEM *)data[t]};                                         \
            BITS bits;                                                                          \
            ROWS_ONE(p, numel[t], 1, squares + t, &bits);                                       \
        }                                                                                       \
    }

DEFINE_SQUARES(sfdiag_squares_f32, float, uint32_t, rows1_f32)
DEFINE_SQUARES(sfdiag_squares_bf16, uint16_t, uint16_t, rows1_bf16)
#ifdef __FLT16_MAX__
DEFINE_SQUARES(sfdiag_squares_f16, uint16_t, uint16_t, rows1_f16)
#endif
