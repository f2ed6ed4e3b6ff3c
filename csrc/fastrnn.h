/* fastrnn C kernels: fused pointwise cell updates (forward and backward) of
 * the Elman RNN (tanh, relu, sigmoid), the LSTM (gates i, f, g, o) and the
 * GRU (gates r, z, n), the
 * time loop of one direction of one layer, the read-out loss, and the
 * clipping + optimizer update over the flat parameter buffer; float32 (_f32)
 * and float64 (_f64).
 *
 * Conventions (shapes are row-major and contiguous; G = 4 for the LSTM, 3 for
 * the GRU, else 1):
 *   W_hh      (G*H, H) as stored by the layer; the forward takes its
 *             transpose W_hh^T (H, G*H) so that every product is an axpy
 *             over contiguous rows
 *   HX        (T+2, B, H): h_t at HX[t+1]; h_0 at HX[0] (forward direction)
 *             or HX[T+1] (reverse direction)
 *   lengths   (B,): row b has lengths[b] valid steps, in [1, T]; padding
 *             steps keep the state, output 0, and get no gradient
 * Kernels only index arrays through these dimensions; user-supplied
 * indices (token ids, class ids) are bounds-checked where they are used.
 *
 * Everything between the cdef markers is plain C that cffi parses
 * (csrc/build_ffi.py); keep it free of preprocessor directives.
 */
#ifndef FASTRNN_H
#define FASTRNN_H

#include <stdint.h>

/* cdef-begin */
/* dimensions and options of one direction of one layer */
typedef struct {
    int64_t T, B, H;          /* steps, batch rows, hidden size */
    int64_t mode;             /* 0 tanh, 1 relu, 2 sigmoid, 3 lstm, 4 gru */
    int64_t rev;              /* 1: reverse direction (forward runs t = T-1 .. 0) */
    int64_t ldo;              /* row stride of out: D*H */
    int64_t use_sclip;        /* backward: clamp dL/dh_t to [-sclip, sclip] */
    double sclip;
    int64_t want_flow;        /* backward: flow[t] += |dL/dh_t|^2 (valid rows) */
    const int64_t *lengths;   /* (B,) */
    double *flow;             /* (T,) */
} fr_dims;

typedef struct {
    fr_dims d;
    const float *W;   /* forward: W_hh^T (H, G*H); backward: W_hh (G*H, H) */
    const float *b_ih; /* forward: (G*H,) biases added at each step, or NULL */
    const float *b_hh;
    float *HX;        /* (T+2, B, H); RNN: HX[1..T] hold W_ih x_t on entry */
    float *CX;        /* LSTM: (T+2, B, H) cell states, like HX */
    float *GATES;     /* LSTM, GRU: (T, B, G*H): W_ih x_t on entry, gate activations after */
    float *TC;        /* LSTM: (T, B, H) tanh(c_t) */
    float *out;       /* forward: layer output (T, B, ldo) at this direction's
                         first column; backward: its gradient */
    float *HN;        /* GRU: (T, B, H) W_hn h_{t-1} + b_hn (r multiplies it) */
    float *DELTA;     /* backward: (T, B, G*H) dL/da_t (0 at padding steps); GRU:
                         of the input side W_ih x_t + b_ih */
    float *DELTAH;    /* backward, GRU: (T, B, 3H) dL/d(W_hh h_{t-1} + b_hh) */
    float *dh;        /* backward: (B, H) dL/dh carried back: in dL/dh_T, out dL/dh_0 */
    float *dc;        /* backward, LSTM: (B, H) dL/dc likewise */
    float *scratch;   /* (B, G*H) */
} fr_seq_f32;

typedef struct {
    fr_dims d;
    const double *W;
    const double *b_ih;
    const double *b_hh;
    double *HX;
    double *CX;
    double *GATES;
    double *TC;
    double *out;
    double *HN;
    double *DELTA;
    double *DELTAH;
    double *dh;
    double *dc;
    double *scratch;
} fr_seq_f64;

/* read-out loss over R rows of O outputs */
typedef struct {
    int64_t R, O, B;          /* rows, outputs, batch; row r is step r / B of sequence r % B */
    int64_t kind;             /* 0 cross-entropy (softmax, NLL), 1 mse (mean over O) */
    int64_t all_valid;        /* 1: every row counts (readout "last"); else t < lengths[b] */
    const int64_t *lengths;   /* (B,) */
    int64_t bad;              /* out: number of class ids outside [0, O) */
} fr_loss_args;

/* clipping and optimizer update over the flat parameter buffer */
typedef struct {
    int64_t opt;              /* 0 sgd, 1 adam, 2 adagrad */
    int64_t clip;             /* 0 none, 1 global norm, 2 value */
    int64_t step;             /* 1-based count of this update (Adam's bias correction) */
    double lr, momentum, beta1, beta2, eps, limit;
    double loss;              /* in: the step's loss, checked by the guard */
    double grad_norm;         /* out: L2 norm of grad before clipping */
    int64_t clipped, skipped; /* out */
} fr_update_args;

/* Steps s in [s0, s0+n) of one direction's forward. prod == NULL: the
 * recurrent product h_{t-1} W_hh^T by explicit loops; else prod (B, G*H) is
 * that product for the single step s0 (n must be 1), computed by the caller.
 * A call outside [0, T], or with prod and n > 1, does nothing. */
void fr_forward_f32(const fr_seq_f32 *q, const float *prod, int64_t s0, int64_t n);
void fr_forward_f64(const fr_seq_f64 *q, const double *prod, int64_t s0, int64_t n);

/* Steps s in [s0, s0+n) of one direction's BPTT (s = 0 is the last step
 * processed by the forward). prod == NULL: dL/dh_{t-1} = delta_t W_hh by
 * explicit loops; else prod (B, H) is delta W_hh of step s0-1, computed by
 * the caller and merged first (s0 = T, n = 0: merge only), and n <= 1. */
void fr_backward_f32(const fr_seq_f32 *q, const float *prod, int64_t s0, int64_t n);
void fr_backward_f64(const fr_seq_f64 *q, const double *prod, int64_t s0, int64_t n);

/* Loss summed over the valid rows and divided by B; dz (R, O) receives its
 * gradient (0 at padding rows). yi: (R,) class ids (cross-entropy), yf:
 * (R, O) targets (mse); the unused one may be NULL. */
double fr_loss_f32(fr_loss_args *q, const float *z, const int64_t *yi, const float *yf, float *dz);
double fr_loss_f64(fr_loss_args *q, const double *z, const int64_t *yi, const double *yf, double *dz);

/* z (R, O) += b at valid rows, z = 0 at padding rows (q->kind unused) */
void fr_bias_rows_f32(const fr_loss_args *q, const float *b, float *z);
void fr_bias_rows_f64(const fr_loss_args *q, const double *b, double *z);

/* Global norm, non-finite guard, clipping and update of P parameters;
 * m, v: optimizer moments (v used by Adam only). Nothing is written to
 * params, m or v (q->skipped = 1) when the loss or the norm is not finite,
 * or when the update would make any parameter or moment non-finite. */
void fr_update_f32(fr_update_args *q, int64_t P, float *params, float *grad, float *m, float *v);
void fr_update_f64(fr_update_args *q, int64_t P, double *params, double *grad, double *m, double *v);

/* dst[idx[r], :] += src[r, :] for r < n (rows of ncol); ids outside
 * [0, nrow) are skipped and counted (the return value). */
int64_t fr_scatter_add_f32(int64_t n, int64_t ncol, const int64_t *idx, const float *src, int64_t nrow, float *dst);
int64_t fr_scatter_add_f64(int64_t n, int64_t ncol, const int64_t *idx, const double *src, int64_t nrow, double *dst);

/* In-place activation of n values: mode 0 tanh, 1 relu, 2 sigmoid (the
 * kernels the cells use; exposed for tests). */
void fr_activate_f32(int64_t mode, int64_t n, float *a);
void fr_activate_f64(int64_t mode, int64_t n, double *a);

/* 1 when the kernels were built with run-time dispatch to AVX2+FMA clones */
int fr_has_clones(void);
/* cdef-end */

#endif
