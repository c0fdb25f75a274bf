/* sfdiag's fits of many mutated grads at once (see sfdiag/step_audit/verdict.py,
 * fingerprint_rows, which this follows fit for fit): each row of samples [n] (float64,
 * C-contiguous) is fitted in a few passes over its own elements, where numpy makes a few
 * dozen calls over every row and copies between them.
 *
 * The elementwise arithmetic is numpy's, operation for operation (sfdiag/step_audit/fused.py
 * compiles it with -ffp-contract=off: no fused multiply-adds), so a residual differs from
 * numpy's only by the order of a row's sums; the tolerances it is compared with are many
 * orders of magnitude above that. Every sum runs in a fixed order: the same rows give the
 * same kinds on the same machine.
 *
 * A row's kind is a code in `kinds` (int8), 0 while no fit has named it:
 * 1 zeroed, 2 scaled, 3 weight-decay, 4 adam-normalized, 5 sign, 6 unknown, and -1 where an
 * element is not finite (the caller names those rows by the one-grad fits).
 */
#include <stdint.h>
#include <string.h>

enum { OPEN = 0, NOT_FINITE = -1, ZEROED = 1, SCALED = 2, WEIGHT_DECAY = 3, ADAM = 4,
       SIGN = 5, UNKNOWN = 6 };

/* squared row norms in this range decide a fit from dot products (verdict._SAFE_SQUARES) */
#define SAFE_LOW 1e-150
#define SAFE_HIGH 1e150

/* a.b over n elements: eight sums side by side (a vector's lanes), added in a fixed order */
static double dot(const double *a, const double *b, int64_t n) {
    double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            s[j] += a[i + j] * b[i + j];
    for (; i < n; i++)
        s[0] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static int any_nonzero(const double *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (a[i] != 0.0) /* (a NaN is nonzero, as numpy's any() has it) */
            return 1;
    return 0;
}

static int all_finite(const double *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!__builtin_isfinite(a[i]))
            return 0;
    return 1;
}

/* verdict._row_fit of one row: the least-squares coefficient of `f` for `t` (into *coef),
 * and whether ||t - coef f|| / ||t|| < tol. A fit far off is told from the dot products
 * (energy = f.f, cross = f.t, scale2 = t.t) where their squares neither under- nor
 * overflow; the others' residual is computed element by element, through `scratch`. */
static int row_fit(const double *f, const double *t, int64_t n, double tol, double energy,
                   double cross, double scale2, double *scratch, double *coef) {
    double c = energy > 0 ? cross / energy : 0.0;
    *coef = c;
    if (energy >= SAFE_LOW && energy <= SAFE_HIGH && scale2 >= SAFE_LOW && scale2 <= SAFE_HIGH) {
        double margin = 4 * tol;
        if ((scale2 - c * (2 * cross - c * energy)) / scale2 > margin * margin)
            return 0;
    }
    for (int64_t i = 0; i < n; i++) {
        double scaled = c * f[i];
        scratch[i] = t[i] - scaled;
    }
    double resid = __builtin_sqrt(dot(scratch, scratch, n));
    double scale = __builtin_sqrt(dot(t, t, n));
    double rel = scale > 0 ? resid / scale : __builtin_inf();
    if (scale == 0 && resid == 0)
        rel = 0.0;
    return rel < tol;
}

/* The zeroed, scaled and weight-decay fits of every row (verdict.fingerprint_rows, up to
 * its second-moment states). `y`: the params' rows, or NULL. `squares` [rows, 3] gets each
 * row's g.g, u.u and y.y, which the Adam fits take again. `scratch`: 2n doubles. */
void sfdiag_fit_rows(int64_t rows, int64_t n, const double *g, const double *u, const double *y,
                     const double *scale_tol, const double *fit_tol, int8_t *kinds,
                     double *squares, double *scratch) {
    for (int64_t r = 0; r < rows; r++) {
        const double *gr = g + r * n, *ur = u + r * n, *yr = y ? y + r * n : 0;
        double gg = dot(gr, gr, n), uu = dot(ur, ur, n), yy = yr ? dot(yr, yr, n) : 0.0;
        squares[3 * r] = gg, squares[3 * r + 1] = uu, squares[3 * r + 2] = yy;
        kinds[r] = OPEN;
        /* a sum of squares is finite only where every element is: else look at each */
        if (!(__builtin_isfinite(gg) && __builtin_isfinite(uu) && __builtin_isfinite(yy)) &&
            !(all_finite(gr, n) && all_finite(ur, n) && (!yr || all_finite(yr, n)))) {
            kinds[r] = NOT_FINITE;
            continue;
        }
        int any_g = any_nonzero(gr, n);
        if (any_g && !any_nonzero(ur, n)) {
            kinds[r] = ZEROED;
            continue;
        }
        double coef;
        if (any_g && row_fit(gr, ur, n, scale_tol[r], gg, dot(gr, ur, n), uu, scratch, &coef)) {
            double size = __builtin_fabs(coef) > 1 ? __builtin_fabs(coef) : 1.0;
            if (__builtin_fabs(coef - 1) > 1e-6 * size) {
                kinds[r] = SCALED;
                continue;
            }
        }
        if (yr && any_nonzero(yr, n)) {
            double *w = scratch + n; /* u - g */
            for (int64_t i = 0; i < n; i++)
                w[i] = ur[i] - gr[i];
            if (row_fit(yr, w, n, fit_tol[r], yy, dot(yr, w, n), dot(w, w, n), scratch, &coef) &&
                coef != 0) {
                kinds[r] = WEIGHT_DECAY;
                continue;
            }
        }
    }
}

/* the k-th smallest of a[0..n) (k < n; no NaN), partly ordering `a` in place: a[k] is it,
 * those before it no larger. Quickselect, its partition without a branch on the data (a
 * sample's ratios are in random order: a branch on each would be mispredicted half the
 * time); the middle of three as the pivot, the last few sorted by insertion. */
static double select_kth(double *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n; /* a[k] is among a[lo..hi), those before lo no larger */
    while (hi - lo > 16) {
        double x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
        double pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t store = lo; /* a[lo..store) < pivot <= a[store..i) */
        for (int64_t i = lo; i < hi; i++) {
            double v = a[i];
            a[i] = a[store];
            a[store] = v;
            store += v < pivot;
        }
        if (store == lo) { /* nothing under the pivot: those equal to it go first */
            for (int64_t i = lo; i < hi; i++) {
                double v = a[i];
                a[i] = a[store];
                a[store] = v;
                store += v <= pivot;
            }
            if (k < store)
                return pivot;
        }
        if (k < store)
            hi = store;
        else
            lo = store;
    }
    for (int64_t i = lo + 1; i < hi; i++) {
        double v = a[i];
        int64_t j = i;
        for (; j > lo && a[j - 1] > v; j--)
            a[j] = a[j - 1];
        a[j] = v;
    }
    return a[k];
}

/* the median of a[0..n), n > 0, as numpy picks it (the middle one, or the two averaged) */
static double median(double *a, int64_t n) {
    int64_t middle = n / 2;
    double high = select_kth(a, n, middle);
    if (n % 2)
        return high;
    double low = a[0]; /* the largest of those before the middle: the one below it */
    for (int64_t i = 1; i < middle; i++)
        if (a[i] > low)
            low = a[i];
    return (low + high) / 2;
}

/* median() for the tests (`a` is reordered) */
double sfdiag_median(int64_t n, double *a) { return median(a, n); }

/* The Adam fit of the rows still open against one second-moment candidate `s` [rows, n]
 * (overwritten with its square root where a row is open): u == g / (k sqrt(s) + eps) + lam y
 * for some k > 0 and lam, alternating three times between k (the median of the usable
 * ratios) and lam (least squares), as verdict.fingerprint_rows does. `usable`: n bytes,
 * `scratch`: 3n doubles. */
void sfdiag_fit_adam(int64_t rows, int64_t n, const double *g, const double *u, const double *y,
                     double *s, const double *eps, const double *fit_tol, const double *squares,
                     int8_t *kinds, uint8_t *usable, double *scratch) {
    double *work = scratch, *ratios = scratch + n, *rest = scratch + 2 * n;
    for (int64_t r = 0; r < rows; r++) {
        if (kinds[r] != OPEN)
            continue;
        const double *gr = g + r * n, *ur = u + r * n, *yr = y ? y + r * n : 0;
        double *root = s + r * n;
        int negative = 0, nonzero = 0;
        for (int64_t i = 0; i < n; i++) {
            negative |= root[i] < 0;
            nonzero |= root[i] != 0;
        }
        if (negative || !nonzero)
            continue;
        for (int64_t i = 0; i < n; i++)
            root[i] = __builtin_sqrt(root[i]);
        int any_usable = 0;
        double floor = 100 * eps[r];
        for (int64_t i = 0; i < n; i++) {
            usable[i] = (root[i] > floor) & (gr[i] != 0);
            any_usable |= usable[i];
        }
        if (!any_usable)
            continue;
        int any_y = yr && any_nonzero(yr, n);
        double u_norm = __builtin_sqrt(squares[3 * r + 1]);
        double lam = 0.0;
        for (int round = 0; round < 3; round++) {
            if (yr && lam != 0) { /* the denominator each element shows: g / (u - lam y) */
                for (int64_t i = 0; i < n; i++) {
                    double decay = yr[i] * lam;
                    double ratio = gr[i] / (ur[i] - decay);
                    work[i] = ratio / root[i];
                }
            } else {
                for (int64_t i = 0; i < n; i++) {
                    double ratio = gr[i] / ur[i];
                    work[i] = ratio / root[i];
                }
            }
            int64_t count = 0; /* the usable, finite ratios, packed */
            for (int64_t i = 0; i < n; i++) {
                ratios[count] = work[i];
                count += usable[i] & (__builtin_isfinite(work[i]) != 0);
            }
            if (!count)
                break;
            double k = median(ratios, count);
            if (!(k > 0))
                break;
            for (int64_t i = 0; i < n; i++) { /* rest: u - g / (root k + eps) */
                double scaled = root[i] * k;
                double denominator = scaled + eps[r];
                rest[i] = ur[i] - gr[i] / denominator;
            }
            if (yr) {
                if (any_y) {
                    double yy = squares[3 * r + 2];
                    lam = yy > 0 ? dot(yr, rest, n) / yy : 0.0;
                }
                for (int64_t i = 0; i < n; i++) {
                    double decay = yr[i] * lam;
                    rest[i] = rest[i] - decay;
                }
            }
            if (__builtin_sqrt(dot(rest, rest, n)) < fit_tol[r] * u_norm) {
                kinds[r] = ADAM;
                break;
            }
        }
    }
}

/* The rows no fit named: the sign of the grad (u == sign(g) element for element, some g
 * nonzero), else unknown. */
void sfdiag_fit_sign(int64_t rows, int64_t n, const double *g, const double *u, int8_t *kinds) {
    for (int64_t r = 0; r < rows; r++) {
        if (kinds[r] != OPEN)
            continue;
        const double *gr = g + r * n, *ur = u + r * n;
        int sign = any_nonzero(gr, n);
        for (int64_t i = 0; i < n && sign; i++) {
            double expected = gr[i] > 0 ? 1.0 : (gr[i] < 0 ? -1.0 : 0.0);
            sign = ur[i] == expected;
        }
        kinds[r] = sign ? SIGN : UNKNOWN;
    }
}

typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));

#define TINY 2.2250738585072014e-308 /* np.finfo(np.float64).tiny */

/* |b - a| / max(|a|, tiny) of 8 elements, numpy's arithmetic (np.maximum keeps a NaN) */
static inline v8d rel_change8(const double *pa, const double *pb) {
    const v8l magnitude = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX,
                           INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    const v8d tiny = {TINY, TINY, TINY, TINY, TINY, TINY, TINY, TINY};
    v8d a, b;
    memcpy(&a, pa, sizeof a);
    memcpy(&b, pb, sizeof b);
    v8d change = (v8d)((v8l)(b - a) & magnitude);
    v8d size = (v8d)((v8l)a & magnitude);
    v8l small = size < tiny;
    size = (v8d)(((v8l)size & ~small) | ((v8l)tiny & small));
    return change / size;
}

static inline double rel_change(double a, double b) {
    double size = __builtin_fabs(a);
    return __builtin_fabs(b - a) / (size < TINY ? TINY : size);
}

/* verdict.max_rel_change_rows: each row's max over its elements of rel_change, an element
 * the same before and after (NaN and NaN, Inf and Inf) 0, a NaN that appeared or went inf.
 * Eight lanes of maxima over the quotients, which leave a NaN out; a row with one is taken
 * again, element by element. The same bits as numpy's (a max picks, it does not round). */
void sfdiag_max_rel_change_rows(int64_t rows, int64_t n, const double *pre, const double *post,
                                double *out) {
    for (int64_t r = 0; r < rows; r++) {
        const double *a = pre + r * n, *b = post + r * n;
        v8d most = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        v8l odd = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            v8d rel = rel_change8(a + i, b + i);
            odd |= rel != rel;
            v8l larger = rel > most; /* (false for a NaN: it is left out) */
            most = (v8d)(((v8l)rel & larger) | ((v8l)most & ~larger));
        }
        double top = 0.0;
        int any_odd = 0;
        for (int j = 0; j < 8; j++) {
            top = most[j] > top ? most[j] : top;
            any_odd |= odd[j] != 0;
        }
        for (; i < n; i++) {
            double rel = rel_change(a[i], b[i]);
            any_odd |= rel != rel;
            top = rel > top ? rel : top;
        }
        if (any_odd) /* an Inf or NaN element: the same (0), or a NaN that came or went */
            for (i = 0; i < n; i++) {
                double rel = rel_change(a[i], b[i]);
                if (rel != rel && !(a[i] == b[i] || (a[i] != a[i] && b[i] != b[i])))
                    top = __builtin_inf();
            }
        out[r] = top;
    }
}
