/* One scalar type's MoRE CPU kernels; more_cpu.c includes this once per type with SCALAR (the
 * element type), EXP (its exp) and FN (the name suffixer) defined. docs/kernels.md §CPU. */

/* A thread's working memory, reused token after token; carved by FN(scratch_at). */
struct FN(scratch) {
    SCALAR *values;      /* k: the selected logits, then their exponentials */
    SCALAR *biased;      /* n: logits plus router bias */
    int32_t *chosen;     /* k */
    int32_t *candidates; /* n */
};

static size_t FN(scratch_bytes)(const struct more_problem *p)
{
    const size_t bytes = (size_t)(p->top_k + p->num_experts) * (sizeof(SCALAR) + sizeof(int32_t));
    return (bytes + 63) / 64 * 64; /* whole cache lines: threads never share one */
}

static struct FN(scratch) FN(scratch_at)(const struct more_problem *p, void *memory)
{
    struct FN(scratch) s;
    s.values = (SCALAR *)memory;
    s.biased = s.values + p->top_k;
    s.chosen = (int32_t *)(s.biased + p->num_experts);
    s.candidates = s.chosen + p->top_k;
    return s;
}

/* The k largest of n finite values z into s->values and s->chosen, largest first, ties to the
 * lower index: the first k of a stable descending sort, as in the reference.
 * The k-th largest is at least the smallest maximum of k disjoint groups, so only values
 * reaching that bound are candidates; a pass without branches gathers them in index order and
 * only they go through insertion, whose branches random logits mispredict so often that they
 * cost more than all else per token (a third of its candidates, measured at N = 64, k = 8).
 * Insertion keeps equal values in index order. */
static void FN(select_top)(const SCALAR *z, int64_t n, int64_t k, const struct FN(scratch) *s)
{
    SCALAR *values = s->values;
    int32_t *chosen = s->chosen;
    SCALAR *maxima = values; /* free until insertion starts */
    for (int64_t g = 0; g < k; ++g)
        maxima[g] = z[g];
    for (int64_t start = k; start + k <= n; start += k) {
#pragma omp simd
        for (int64_t g = 0; g < k; ++g)
            maxima[g] = maxima[g] > z[start + g] ? maxima[g] : z[start + g];
    }
    SCALAR bound = maxima[0];
    for (int64_t g = 1; g < k; ++g)
        bound = maxima[g] < bound ? maxima[g] : bound;
    int64_t found = 0;
    for (int32_t i = 0; i < (int32_t)n; ++i) {
        s->candidates[found] = i;
        found += z[i] >= bound;
    }
    int64_t filled = 0;
    for (int64_t c = 0; c < found; ++c) {
        const int32_t i = s->candidates[c];
        const SCALAR v = z[i];
        if (filled == k && !(v > values[k - 1]))
            continue;
        int64_t p = filled < k ? filled++ : k - 1;
        while (p > 0 && values[p - 1] < v) {
            values[p] = values[p - 1];
            chosen[p] = chosen[p - 1];
            --p;
        }
        values[p] = v;
        chosen[p] = i;
    }
}

/* Partial sums in DOT_LANES independent lanes: one accumulator would wait on each add's latency.
 * The lanes are then added pairwise, halving their number each step: every step is independent
 * adds that vectorise, where summing them one by one into a scalar was a chain of DOT_LANES
 * dependent adds (half the C time of a d=576 token's 64 router dot products). */
static SCALAR FN(dot)(const SCALAR *restrict a, const SCALAR *restrict b, int64_t n)
{
    SCALAR partial[DOT_LANES] = {0};
    int64_t i = 0;
    for (; i + DOT_LANES <= n; i += DOT_LANES) {
#pragma omp simd
        for (int j = 0; j < DOT_LANES; ++j)
            partial[j] += a[i + j] * b[i + j];
    }
    for (; i < n; ++i)
        partial[i % DOT_LANES] += a[i] * b[i];
    for (int width = DOT_LANES / 2; width > 0; width /= 2) {
#pragma omp simd
        for (int j = 0; j < width; ++j)
            partial[j] += partial[j + width];
    }
    return partial[0];
}

/* Selection, gates and expand of one token whose logits z (bias included) are all finite:
 * out += sum_j gamma g_j h[i_j] B^T[i_j, :], with h the token's shrink row or, where that is
 * NULL, h[i] = A[i, :] . x for the k selected experts alone. Gate sums run in double. */
static void FN(route_row)(const struct more_problem *p, const SCALAR *z, const SCALAR *shrink,
                          const SCALAR *x, SCALAR *out, const struct FN(scratch) *s,
                          int64_t *indices_out, SCALAR *gates_out)
{
    const int64_t k = p->top_k, n = p->num_experts, d_out = p->d_out;
    const int32_t *chosen = s->chosen;
    SCALAR *values = s->values;
    FN(select_top)(z, n, k, s);
    const SCALAR peak = values[0];
    double total = 0.0;
    if (p->gate == GATE_SOFTMAX_TOPK) {
        for (int64_t i = 0; i < n; ++i)
            total += EXP(z[i] - peak);
    }
    for (int64_t j = 0; j < k; ++j) {
        values[j] = EXP(values[j] - peak);
        if (p->gate == GATE_TOPK_SOFTMAX)
            total += values[j];
    }
    const SCALAR *bt = (const SCALAR *)p->expert_bt;
    const double inverse_total = 1.0 / total;
    for (int64_t j = 0; j < k; ++j) {
        const SCALAR gate = (SCALAR)(values[j] * inverse_total);
        const SCALAR response = shrink ? shrink[chosen[j]]
                                       : FN(dot)((const SCALAR *)p->expert_a + chosen[j] * p->expert_a_stride,
                                                 x, p->d_in);
        const SCALAR coefficient = (SCALAR)(p->gamma * gate * response);
        if (indices_out) {
            indices_out[j] = chosen[j];
            gates_out[j] = gate;
        }
        const SCALAR *column = bt + chosen[j] * p->bt_stride;
        if (p->bt_column_stride == 1) {
#pragma omp simd
            for (int64_t o = 0; o < d_out; ++o)
                out[o] += coefficient * column[o];
        } else {
            for (int64_t o = 0; o < d_out; ++o)
                out[o] += coefficient * column[o * p->bt_column_stride];
        }
    }
}

/* Whether every logit of every token (plus the router bias) is finite: a NaN or an infinity is
 * left to the general path, which handles them as the reference does. */
static int FN(all_finite)(const struct more_problem *p)
{
    const SCALAR *logits = (const SCALAR *)p->logits, *bias = (const SCALAR *)p->router_bias;
    int bad = 0;
    for (int64_t t = 0; t < p->tokens; ++t) {
        const SCALAR *z = logits + t * p->logits_stride;
        for (int64_t i = 0; i < p->num_experts; ++i) {
            const SCALAR v = bias ? z[i] + bias[i] : z[i];
            bad |= !(v - v == 0);
        }
    }
    return !bad;
}

static void FN(route_rows)(const struct more_problem *p, int64_t begin, int64_t end, void *scratch)
{
    const int64_t n = p->num_experts, k = p->top_k;
    const struct FN(scratch) s = FN(scratch_at)(p, scratch);
    const SCALAR *logits = (const SCALAR *)p->logits, *shrink = (const SCALAR *)p->shrink;
    const SCALAR *bias = (const SCALAR *)p->router_bias, *x = (const SCALAR *)p->x;
    SCALAR *out = (SCALAR *)p->out, *gates = (SCALAR *)p->gates;
    for (int64_t t = begin; t < end; ++t) {
        const SCALAR *z = logits + t * p->logits_stride;
        if (bias) {
            for (int64_t i = 0; i < n; ++i)
                s.biased[i] = z[i] + bias[i];
            z = s.biased;
        }
        FN(route_row)(p, z, shrink ? shrink + t * p->shrink_stride : NULL, x ? x + t * p->x_stride : NULL,
                      out + t * p->out_stride, &s, p->indices ? p->indices + t * k : NULL,
                      gates ? gates + t * k : NULL);
    }
}

int FN(more_route_expand)(struct more_problem *p, double gamma)
{
    p->gamma = gamma;
    if (!FN(all_finite)(p))
        return MORE_NON_FINITE;
    /* Per token: k expand rows, and k shrink dot products where they are computed here. */
    const int64_t work_per_token = p->top_k * (p->d_out + (p->shrink ? 0 : p->d_in));
    return run_rows(p, FN(route_rows), FN(scratch_bytes)(p), work_per_token);
}

/* A few tokens end to end but for the base product: their logits (and, for the expert_space
 * router, every A x) by dot products into scratch of their own, then as more_route_expand. All in
 * the caller's thread: a decode call then runs no multi-threaded operation but the base product,
 * whose parallel region nn.Linear has too (a second GEMM for the logits was a second region to
 * wait in beside a busy neighbour). */
int FN(more_tokens)(struct more_problem *p, double gamma)
{
    const SCALAR *router_weight = (const SCALAR *)p->router_weight;
    const SCALAR *expert_a = (const SCALAR *)p->expert_a, *bias = (const SCALAR *)p->router_bias;
    const int64_t n = p->num_experts, tokens = p->tokens;
    if (tokens < 1)
        return MORE_OK;
    SCALAR *logits = malloc(2 * (size_t)(tokens * n) * sizeof(SCALAR));
    if (!logits)
        return MORE_NO_MEMORY;
    SCALAR *shrink = p->expert_space ? logits + tokens * n : NULL;
    for (int64_t t = 0; t < tokens; ++t) {
        const SCALAR *x = (const SCALAR *)p->x + t * p->x_stride;
        SCALAR *z = logits + t * n, *h = shrink ? shrink + t * n : NULL;
        if (h) {
            for (int64_t i = 0; i < n; ++i)
                h[i] = FN(dot)(expert_a + i * p->expert_a_stride, x, p->d_in);
        }
        const SCALAR *router_input = h ? h : x;
        const int64_t router_width = h ? n : p->d_in;
        for (int64_t i = 0; i < n; ++i)
            z[i] = FN(dot)(router_weight + i * p->router_weight_stride, router_input, router_width)
                   + (bias ? bias[i] : 0);
    }
    p->logits = logits;
    p->shrink = shrink;
    p->logits_stride = p->shrink_stride = n;
    p->router_bias = NULL;
    const int status = FN(more_route_expand)(p, gamma);
    free(logits);
    return status;
}
