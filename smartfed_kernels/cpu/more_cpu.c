/* MoRE CPU kernels: top-k selection, gates and the sparse expand of every token in one pass over
 * its logits, accumulated onto the base product (docs/kernels.md, "CPU kernels"). Built at first
 * use by smartfed_kernels/cpu/build.py; called through ctypes by smartfed_kernels/cpu/kernels.py,
 * after smartfed_kernels/cpu/abi.py has checked more_abi() against its mirror of the problem. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever the meaning of a field or an entry point changes without its layout changing. */
#define MORE_ABI_VERSION 2
#define MORE_OK 0
#define MORE_NON_FINITE 1
#define MORE_NO_MEMORY 2
#define DOT_LANES 32

/* The gates, numbered in the order of smartfed_kernels.options.GATES (the loader checks it). */
#define MORE_GATES(GATE) GATE(TOPK_SOFTMAX, topk_softmax) GATE(SOFTMAX_TOPK, softmax_topk)
#define GATE_ENUM(name, text) GATE_##name,
enum more_gate { MORE_GATES(GATE_ENUM) };

/* struct more_problem, filled by kernels.py as an array of 8-byte values (pointers included):
 * one list gives the struct, the field names and the offsets that more_abi() reports. */
#define MORE_PROBLEM_FIELDS(FIELD)                                                                \
    FIELD(int64_t, tokens)                                                                        \
    FIELD(int64_t, num_experts)                                                                   \
    FIELD(int64_t, top_k)                                                                         \
    FIELD(int64_t, d_out)                                                                         \
    FIELD(const void *, logits)                                                                   \
    FIELD(int64_t, logits_stride)                                                                 \
    FIELD(const void *, router_bias) /* added to the logits, or NULL */                           \
    FIELD(const void *, shrink) /* [T, N], or NULL: A x is computed from x for the selected k */ \
    FIELD(int64_t, shrink_stride)                                                                 \
    FIELD(const void *, expert_bt) /* B^T [N, d_out]: (i, o) at i * bt_stride + o * bt_column_stride */ \
    FIELD(int64_t, bt_stride)                                                                     \
    FIELD(int64_t, bt_column_stride)                                                              \
    FIELD(void *, out) /* [T, d_out] accumulated into */                                          \
    FIELD(int64_t, out_stride)                                                                    \
    FIELD(int64_t *, indices) /* [T, k] or NULL */                                                \
    FIELD(void *, gates) /* [T, k] or NULL (set together with indices) */                         \
    FIELD(int64_t, gate) /* an enum more_gate */                                                  \
    FIELD(int64_t, threads) /* at most this many threads */                                       \
    FIELD(int64_t, grain) /* and at least this many multiply-adds per thread */                   \
    /* x [T, d_in] and A [N, d_in], read when shrink is NULL; more_tokens also reads the router */ \
    /* weight (rows strided, unit columns) */                                                     \
    FIELD(const void *, x)                                                                        \
    FIELD(int64_t, x_stride)                                                                      \
    FIELD(const void *, router_weight)                                                            \
    FIELD(int64_t, router_weight_stride)                                                          \
    FIELD(const void *, expert_a)                                                                 \
    FIELD(int64_t, expert_a_stride)                                                               \
    FIELD(int64_t, d_in)                                                                          \
    FIELD(int64_t, expert_space)                                                                  \
    FIELD(double, gamma) /* set by the entry points from their argument */

#define DECLARE_FIELD(type, name) type name;
struct more_problem { MORE_PROBLEM_FIELDS(DECLARE_FIELD) };

_Static_assert(sizeof(void *) == sizeof(int64_t), "more_problem is filled as an int64 array");

#define FIELD_NAME(type, name) #name ","
#define FIELD_OFFSET(type, name) (int64_t)offsetof(struct more_problem, name),
#define GATE_NAME(name, text) #text ","
static const int64_t field_offsets[] = { MORE_PROBLEM_FIELDS(FIELD_OFFSET) };
#define STRINGIFY(value) #value
#define VERSION_TEXT(value) STRINGIFY(value)

/* The layout the loader checks before any other call: writes sizeof(struct more_problem), then
 * the offset of each field in order, into layout (at most capacity values), and returns
 * "<version>;<field>,<field>,...,;<gate>,<gate>,...," (names in struct and enum order). */
const char *more_abi(int64_t *layout, int64_t capacity)
{
    const int64_t count = (int64_t)(sizeof field_offsets / sizeof field_offsets[0]);
    if (capacity > 0)
        layout[0] = (int64_t)sizeof(struct more_problem);
    for (int64_t i = 0; i < count && i + 1 < capacity; ++i)
        layout[i + 1] = field_offsets[i];
    return VERSION_TEXT(MORE_ABI_VERSION) ";" MORE_PROBLEM_FIELDS(FIELD_NAME) ";" MORE_GATES(GATE_NAME);
}

/* How many threads a call of this many tokens gets: one unless every thread has at least
 * `grain` multiply-adds (PyTorch's grain size, in work rather than elements) and a token of its
 * own. A parallel region costs a barrier whose threads may be descheduled by another process on
 * the same cores (16 ms a call measured beside a PyTorch neighbour): small calls never open one. */
int64_t more_threads_for(int64_t tokens, int64_t work_per_token, int64_t threads, int64_t grain)
{
    const int64_t least = grain < 1 ? 1 : grain;
    const int64_t by_work = tokens * (work_per_token < 1 ? 1 : work_per_token) / least;
    int64_t chosen = threads;
    if (chosen > by_work)
        chosen = by_work;
    if (chosen > tokens)
        chosen = tokens;
    return chosen < 1 ? 1 : chosen;
}

/* Whether this build can run on more than one thread (built with OpenMP). */
int64_t more_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Parallel regions opened since the library loaded: what the tests read to see that a call
 * stayed in the caller's thread. */
static int64_t parallel_regions;

int64_t more_parallel_regions(void)
{
    return __atomic_load_n(&parallel_regions, __ATOMIC_RELAXED);
}

typedef void (*rows_fn)(const struct more_problem *, int64_t, int64_t, void *);

/* Runs fn over the tokens: in the caller's thread, or split into contiguous blocks over the
 * threads more_threads_for allows. Built with -fopenmp, this library shares the OpenMP runtime
 * PyTorch has loaded (the same libgomp.so.1), so its threads are the ones PyTorch's own ops just
 * used, not rivals for the same cores. */
static int run_rows(const struct more_problem *p, rows_fn fn, size_t scratch_bytes, int64_t work_per_token)
{
#ifdef _OPENMP
    const int64_t threads = more_threads_for(p->tokens, work_per_token, p->threads, p->grain);
#else
    const int64_t threads = 1;
#endif
    char *scratch = malloc(scratch_bytes * (size_t)threads);
    if (!scratch)
        return MORE_NO_MEMORY;
    if (threads == 1) {
        fn(p, 0, p->tokens, scratch);
    } else {
#ifdef _OPENMP
        __atomic_add_fetch(&parallel_regions, 1, __ATOMIC_RELAXED);
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t worker = omp_get_thread_num(), workers = omp_get_num_threads();
            fn(p, p->tokens * worker / workers, p->tokens * (worker + 1) / workers,
               scratch + scratch_bytes * (size_t)worker);
        }
#endif
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
