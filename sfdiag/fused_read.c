/* sfdiag's fused read of large grads on the CPU (see sfdiag/fused.py): in one pass over each
 * row of `block` elements, the sum of the squares of its values, the wrapping sum of its
 * elements' bits, and the sampled elements that fall in it (of its param's too).
 *
 * Plain C with GCC/Clang vector extensions, no -ffast-math: every sum runs in a fixed order,
 * so the same input gives the same bits on the same machine, whatever the thread count (a
 * row is one thread's, and the rows' totals are added by the caller). The squares are taken
 * in float32 (exact for 16-bit types) and summed 16 to a lane before each lane's sum goes
 * into a double: within 1e-7 of a float64 sum (torch's own float32 norm of a million
 * elements is off by 1e-5 and more), at the speed of reading the memory, where a loop in
 * float64 costs ~10 % more.
 */
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef uint32_t v8u __attribute__((vector_size(32)));  /* 32 bytes of bits: 8 of 32 */
typedef uint16_t v16h __attribute__((vector_size(32))); /* ... or 16 of 16 */
typedef uint16_t v8h __attribute__((vector_size(16)));

#define STEP 32   /* elements a vector iteration reads */
#define FLUSH 16  /* iterations summed in float32 before their sums go into doubles */

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

/* Rows [first_row, last_row) of `count` contiguous tensors cut into rows of `block`
 * elements (a tensor's last row may be short), numbered across the tensors in order.
 * Writes each row's sum of squares (0 where want[t] is 0) and bit-sum, and the elements
 * t * sample_size + k (k < sample_size) at flat index k * (numel / sample_size) that fall
 * in these rows: of the tensor into samples, of params[t] (where not NULL: a tensor of the
 * same size and type) into param_samples. Every tensor holds at least sample_size
 * elements. */
#define DEFINE_READ(NAME, ELEM, BITS, VBITS, SQUARES, SCALAR)                                  \
    void NAME(int64_t count, const void *const *data, const int64_t *numel,                     \
              const uint8_t *want, int64_t block, int64_t sample_size, int64_t first_row,       \
              int64_t last_row, const void *const *params, double *row_squares,                 \
              BITS *row_sums, ELEM *samples, ELEM *param_samples) {                             \
        int64_t row = 0; /* the first row of tensor t */                                        \
        for (int64_t t = 0; t < count && row < last_row; t++) {                                 \
            const int64_t n = numel[t], rows = (n + block - 1) / block;                         \
            const ELEM *x = (const ELEM *)data[t];                                              \
            const ELEM *param = (const ELEM *)params[t];                                        \
            const int64_t stride = n / sample_size;                                             \
            for (int64_t r = first_row > row ? first_row - row : 0;                             \
                 r < rows && row + r < last_row; r++) {                                         \
                const int64_t start = r * block, end = start + block < n ? start + block : n;   \
                const int64_t first = (start + stride - 1) / stride; /* the row's 1st sample */ \
                for (int64_t k = first; param && k < sample_size && k * stride < end; k++)      \
                    param_samples[t * sample_size + k] = param[k * stride];                     \
                v8d acc[4] = {{0}};                                                             \
                VBITS bits[sizeof(ELEM)] = {{0}};                                               \
                int64_t i = start;                                                              \
                while (i + STEP <= end) {                                                       \
                    const int64_t stop = i + STEP * FLUSH < end ? i + STEP * FLUSH : end;       \
                    v8f f[4] = {{0}};                                                           \
                    for (; i + STEP <= stop; i += STEP) {                                       \
                        if (want[t])                                                            \
                            for (int k = 0; k < 4; k++) f[k] += SQUARES(x + i + 8 * k);         \
                        for (size_t k = 0; k < sizeof(ELEM); k++) {                             \
                            VBITS b;                                                            \
                            memcpy(&b, (const char *)(x + i) + 32 * k, sizeof b);               \
                            bits[k] += b;                                                       \
                        }                                                                       \
                    }                                                                           \
                    for (int k = 0; k < 4; k++) acc[k] += __builtin_convertvector(f[k], v8d);   \
                }                                                                               \
                v8d s = (acc[0] + acc[1]) + (acc[2] + acc[3]);                                  \
                double squares = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); \
                VBITS lanes = bits[0];                                                          \
                for (size_t k = 1; k < sizeof(ELEM); k++) lanes += bits[k];                     \
                BITS sum = 0;                                                                   \
                for (size_t k = 0; k < sizeof(VBITS) / sizeof(BITS); k++) sum += lanes[k];      \
                for (; i < end; i++) {                                                          \
                    BITS b;                                                                     \
                    memcpy(&b, x + i, sizeof b);                                                \
                    sum += b;                                                                   \
                    squares += SCALAR(x + i);                                                   \
                }                                                                               \
                row_squares[row + r] = want[t] ? squares : 0.0;                                 \
                row_sums[row + r] = sum;                                                        \
                for (int64_t k = first; k < sample_size && k * stride < end; k++)               \
                    samples[t * sample_size + k] = x[k * stride];                               \
            }                                                                                   \
            row += rows;                                                                        \
        }                                                                                       \
    }

DEFINE_READ(sfdiag_read_f32, float, uint32_t, v8u, squares_f32, scalar_f32)
DEFINE_READ(sfdiag_read_bf16, uint16_t, uint16_t, v16h, squares_bf16, scalar_bf16)
#ifdef __FLT16_MAX__
DEFINE_READ(sfdiag_read_f16, uint16_t, uint16_t, v16h, squares_f16, scalar_f16)
#endif
