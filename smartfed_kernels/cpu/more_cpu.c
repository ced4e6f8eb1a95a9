/* MoRE CPU kernels: top-k selection, gates and the sparse expand of every token in one pass over
 * its logits, accumulated onto the base product (docs/kernels.md, "CPU kernels"). Built at first
 * use by smartfed_kernels/cpu/build.py; called through ctypes by smartfed_kernels/cpu/kernels.py. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GATE_TOPK_SOFTMAX 0
#define GATE_SOFTMAX_TOPK 1
#define MORE_OK 0
#define MORE_NON_FINITE 1
#define MORE_NO_MEMORY 2
#define DOT_LANES 32
/* One token's router dot products split over threads from this many multiply-adds. */
#define TOKEN_PARALLEL_MIN (1 << 14)

/* Filled by kernels.py as an array of int64 (every field is 8 bytes wide, pointers included). */
struct more_problem {
    int64_t tokens, num_experts, top_k, d_out;
    const void *logits;
    int64_t logits_stride;
    const void *router_bias; /* added to the logits, or NULL */
    const void *shrink; /* [T, N], or NULL: A x is computed from x for the selected experts */
    int64_t shrink_stride;
    const void *expert_bt; /* B^T [N, d_out]: element (i, o) at i * bt_stride + o * bt_column_stride */
    int64_t bt_stride;
    int64_t bt_column_stride;
    void *out; /* [T, d_out] accumulated into */
    int64_t out_stride;
    int64_t *indices; /* [T, k] or NULL */
    void *gates;      /* [T, k] or NULL (set together with indices) */
    int64_t gate;
    int64_t threads;
    int64_t rows_per_thread_min; /* fewer rows than this per thread run on fewer threads */
    /* x [T, d_in] and A [N, d_in], read when shrink is NULL; more_token also reads the router
     * weight (rows strided, unit columns) */
    const void *x;
    int64_t x_stride;
    const void *router_weight;
    int64_t router_weight_stride;
    const void *expert_a;
    int64_t expert_a_stride;
    int64_t d_in;
    int64_t expert_space;
    double gamma; /* set by the entry points from their argument */
};

_Static_assert(sizeof(void *) == sizeof(int64_t), "more_problem is filled as an int64 array");

typedef void (*rows_fn)(const struct more_problem *, int64_t, int64_t, void *);

/* Splits the tokens into contiguous blocks over up to p->threads OpenMP threads. Built with
 * -fopenmp, this library shares the OpenMP runtime PyTorch has loaded (the same libgomp.so.1), so
 * its threads are the ones PyTorch's own ops just used, not rivals for the same cores. */
static int run_rows(const struct more_problem *p, rows_fn fn, size_t scratch_bytes)
{
    int64_t threads = p->threads < 1 ? 1 : p->threads;
    const int64_t least = p->rows_per_thread_min < 1 ? 1 : p->rows_per_thread_min;
    if (threads > p->tokens / least)
        threads = p->tokens / least > 0 ? p->tokens / least : 1;
    char *scratch = malloc(scratch_bytes * (size_t)threads);
    if (!scratch)
        return MORE_NO_MEMORY;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads) if (threads > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t worker = omp_get_thread_num(), workers = omp_get_num_threads();
#else
        const int64_t worker = 0, workers = 1;
#endif
        fn(p, p->tokens * worker / workers, p->tokens * (worker + 1) / workers,
           scratch + scratch_bytes * (size_t)worker);
    }
    free(scratch);
    return MORE_OK;
}

#define SCALAR float
#define EXP expf
#define FN(name) name##_f32
#include "more_cpu_body.h"
#undef SCALAR
#undef EXP
#undef FN

#define SCALAR double
#define EXP exp
#define FN(name) name##_f64
#include "more_cpu_body.h"
#undef SCALAR
#undef EXP
#undef FN
